"""Speed: what the package adds on top of the network (prints tables; not a timed test).

    python benchmarks/speed.py                      # tiny models, SD 1.5-sized UNet, SD3-style transformer, digits
    python benchmarks/speed.py --models tiny,digits --reps 5

For each model, at 1, 2 and 4 steps, the median wall time (after one warm-up) of
- ``raw``: the bare network forwards plus one VAE decode (the floor),
- ``stock``: the stock diffusers pipeline with its own few-step scheduler (SD: LCMScheduler; SD3: FlowMatchEuler),
- ``stock + ours``: the same stock pipeline with our ConsistencyScheduler (``from_config``),
- ``ours``: our few-step pipeline (FewStep...Pipeline with student metadata) and ConsistencyScheduler,
with ratios against ``raw``. Prompt embeddings are computed once outside the timings (text encoders excluded),
random weights, batch 1. Realistic sizes: an SD 1.5 UNet (860 M parameters) at 512x512 and an SD3-style MMDiT of
comparable cost (24 joint blocks, 500 M parameters) at 512x512, both decoded with a TAESD-sized AutoencoderTiny. Digits: the teacher at its usual 32
Euler steps against a 1-step student (same network), images per second at batch 1, 4 and 16. ``scheduler``: the cost
of one ``step`` call, stock against ours, without the network's timing noise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onestep_pipelines import ConsistencyScheduler, StudentMetadata  # noqa: E402
from onestep_pipelines.pipelines import FewStepStableDiffusion3Pipeline, FewStepStableDiffusionPipeline  # noqa: E402
from onestep_pipelines.testing import tiny_pipeline  # noqa: E402

STEPS = (1, 2, 4)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, reps: int, device="cpu", warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``reps`` runs after ``warmup`` runs (CUDA-synchronised on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ models
def sd_setup(size: str, device="cpu", dtype=torch.float32):
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    stock = tiny_pipeline("sd")
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they run (fast on a GPU)
        if size == "tiny":
            unet, vae, width, ctx = stock.unet.to(device), stock.vae.to(device), 32, stock.unet.config.cross_attention_dim
        else:
            unet, vae, width, ctx = UNet2DConditionModel(cross_attention_dim=768).eval(), AutoencoderTiny().eval(), 512, 768
    unet, vae = unet.to(dtype), vae.to(dtype)
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    parts = {**stock.components, "unet": unet, "vae": vae, "scheduler": scheduler}
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False).to(device)
    ours = FewStepStableDiffusionPipeline(**parts, requires_safety_checker=False).to(device)
    embeds = {"prompt_embeds": torch.zeros(1, 77, ctx, device=device, dtype=dtype)}
    latent = torch.randn(1, 4, width // 8, width // 8, device=device, dtype=dtype)
    times = [torch.tensor(999 - 250 * i, device=device) for i in range(4)]

    def raw(n):
        x = latent
        for i in range(n):
            x = unet(x, times[i], encoder_hidden_states=embeds["prompt_embeds"]).sample
        return vae.decode(x / vae.config.scaling_factor).sample

    return pipe, ours, raw, embeds, width, {"gamma": 1.0, "timestep_preset": "lcm"}


def sd3_setup(size: str, device="cpu", dtype=torch.float32):
    from diffusers import AutoencoderTiny, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    stock = tiny_pipeline("sd3")
    torch.manual_seed(0)
    with torch.device(device):
        if size == "tiny":
            transformer, vae, width = stock.transformer.to(device), stock.vae.to(device), 32
        else:
            transformer = SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                                                num_attention_heads=12, joint_attention_dim=768, caption_projection_dim=768, pooled_projection_dim=768).eval()
            vae, width = AutoencoderTiny(latent_channels=16).eval(), 512
            vae.register_to_config(shift_factor=0.0)
    transformer, vae = transformer.to(dtype), vae.to(dtype)
    parts = {**stock.components, "transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}
    pipe, ours = StableDiffusion3Pipeline(**parts).to(device), FewStepStableDiffusion3Pipeline(**parts).to(device)
    cfg = transformer.config
    embeds = {"prompt_embeds": torch.zeros(1, 77, cfg.joint_attention_dim, device=device, dtype=dtype),
              "pooled_prompt_embeds": torch.zeros(1, cfg.pooled_projection_dim, device=device, dtype=dtype)}
    latent = torch.randn(1, cfg.in_channels, width // 8, width // 8, device=device, dtype=dtype)
    times = [torch.tensor([1000.0 - 250 * i], device=device) for i in range(4)]

    def raw(n):
        x = latent
        for i in range(n):
            x = transformer(hidden_states=x, timestep=times[i], encoder_hidden_states=embeds["prompt_embeds"],
                            pooled_projections=embeds["pooled_prompt_embeds"]).sample
        return vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample

    return pipe, ours, raw, embeds, width, {"gamma": 0.0}


def pipeline_rows(name: str, setup, size: str, reps: int, device="cpu", dtype=torch.float32, steps=STEPS, warmup: int = 1) -> list[dict]:
    """Wall time of the bare forwards + decode, the stock pipeline with its scheduler and with ours, and our pipeline
    (NaN / inf check on, and off)."""
    stock, ours, raw, embeds, width, knobs = setup(size, device, dtype)
    own_scheduler = stock.scheduler
    our_scheduler = ConsistencyScheduler.from_config(own_scheduler.config, check_finite=True, **knobs)
    unchecked = ConsistencyScheduler.from_config(own_scheduler.config, check_finite=False, **knobs)
    metadata = StudentMetadata.from_scheduler(our_scheduler, method="benchmark", architecture="sd3" if "SD3" in name else "sd",
                                              num_inference_steps=1, guidance_baked=True)
    ours.set_student(metadata, set_scheduler=False)
    ours.scheduler = our_scheduler
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    call = dict(embeds, guidance_scale=1.0, height=width, width=width, output_type="pt")
    rows = []
    with torch.no_grad():
        for n in steps:
            generator = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731  (on the device: no host copy of the noise)
            t_raw = median_time(lambda: raw(n), reps, device, warmup)
            stock.scheduler = own_scheduler
            t_stock = median_time(lambda: stock(**call, num_inference_steps=n, generator=generator()), reps, device, warmup)
            stock.scheduler = our_scheduler
            t_stock_ours = median_time(lambda: stock(**call, num_inference_steps=n, generator=generator()), reps, device, warmup)
            t_ours = median_time(lambda: ours(**call, num_inference_steps=n, generator=generator()), reps, device, warmup)
            ours.scheduler = unchecked
            t_unchecked = median_time(lambda: ours(**call, num_inference_steps=n, generator=generator()), reps, device, warmup)
            ours.scheduler = our_scheduler
            rows.append({"model": name, "steps": n, "raw": t_raw, "stock": t_stock, "stock + ours": t_stock_ours, "ours": t_ours,
                         "ours, no NaN check": t_unchecked})
            print(f"  {name} {n} steps: raw {t_raw:.4f} s, stock {t_stock:.4f}, stock + ours {t_stock_ours:.4f}, ours {t_ours:.4f}, "
                  f"ours unchecked {t_unchecked:.4f}", file=sys.stderr)
    return rows


def scheduler_rows(calls: int = 300, device="cpu", dtype=torch.float32) -> list[dict]:
    """Host microseconds per ``step`` call on an SD-sized latent (1x4x64x64), ``set_timesteps`` of each 4-step generation
    included: the stock few-step schedulers against ours (NaN / inf check on, and off), free of the network's noise.
    On a GPU this is the time the host spends queueing the work (the device is synchronised once, at the end)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    pairs = {
        "LCM (gamma 1), 4 steps": (LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), {"gamma": 1.0, "timestep_preset": "lcm"}),
        "FlowMatchEuler (gamma 0), 4 steps": (FlowMatchEulerDiscreteScheduler(shift=3.0), {"gamma": 0.0, "timestep_preset": "linspace"}),
    }
    rows = []
    x, out = torch.randn(1, 4, 64, 64, device=device, dtype=dtype), torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
    for name, (stock, knobs) in pairs.items():
        row = {"scheduler": name}
        contenders = (("stock", stock), ("ours", ConsistencyScheduler.from_config(stock.config, **knobs)),
                      ("ours, no NaN check", ConsistencyScheduler.from_config(stock.config, check_finite=False, **knobs)))
        for label, scheduler in contenders:
            generator = torch.Generator(device).manual_seed(0)

            def run():
                scheduler.set_timesteps(4, device=device)
                sample = x
                for t in scheduler.timesteps:
                    sample = scheduler.step(out, t, sample, generator=generator).prev_sample

            for _ in range(3):
                run()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            row[label] = (time.perf_counter() - start) / (4 * calls) * 1e6  # per step, set_timesteps included
            synchronize(device)
        rows.append(row)
    return rows


def digits_rows(reps: int) -> list[dict]:
    from onestep_pipelines import load_digits_teacher

    pipe = load_digits_teacher()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    with torch.no_grad():
        for batch in (1, 4, 16):
            labels = [i % 10 for i in range(batch)]
            for label, steps in (("teacher, 32 Euler steps", 32), ("1-step student (same network)", 1)):
                t = median_time(lambda: pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=1.0, output_type="pt"), reps)
                rows.append({"model": label, "batch": batch, "seconds": t, "images/s": batch / t})
    return rows


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pipeline_table(rows: list[dict]) -> str:
    lines = ["| model | steps | raw forward + decode (s) | stock pipeline (ratio) | stock + our scheduler (ratio) | our pipeline (ratio) | "
             "ours, no NaN check (ratio) | stock + ours / stock |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = lambda key: f"{r[key]:.4f} ({r[key] / r['raw']:.3f})"  # noqa: E731
        lines.append(f"| {r['model']} | {r['steps']} | {r['raw']:.4f} | {ratio('stock')} | {ratio('stock + ours')} | {ratio('ours')} | "
                     f"{ratio('ours, no NaN check')} | {r['stock + ours'] / r['stock']:.3f} |")
    return "\n".join(lines)


def scheduler_table(rows: list[dict]) -> str:
    lines = ["| scheduler step (1x4x64x64 latent) | stock (us / step) | ours (us / step) | ours, no NaN check | ours / stock |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['scheduler']} | {r['stock']:.0f} | {r['ours']:.0f} | {r['ours, no NaN check']:.0f} | {r['ours'] / r['stock']:.3f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15,sd3,scheduler,digits", help="comma-separated: tiny, sd15, sd3, scheduler, digits")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per cell (median), after one warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu.py runs every GPU table at once)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and latents of the pipeline models")
    args = parser.parse_args()
    chosen = {m.strip() for m in args.models.split(",")}
    device, dtype = args.device, DTYPES[args.dtype]
    torch.set_grad_enabled(False)
    rows = []
    if "tiny" in chosen:
        rows += pipeline_rows("tiny SD UNet", sd_setup, "tiny", max(args.reps, 5), device, dtype)
        rows += pipeline_rows("tiny SD3 MMDiT", sd3_setup, "tiny", max(args.reps, 5), device, dtype)
    if "sd15" in chosen:
        rows += pipeline_rows("SD 1.5 UNet 512px", sd_setup, "full", args.reps, device, dtype)
    if "sd3" in chosen:
        rows += pipeline_rows("SD3-style MMDiT 512px", sd3_setup, "full", args.reps, device, dtype)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}, {device}, {args.dtype}, batch 1; "
          f"median of {args.reps} runs after a warm-up (tiny models: {max(args.reps, 5)})")
    if rows:
        print(pipeline_table(rows))
    if "scheduler" in chosen:
        print()
        print(scheduler_table(scheduler_rows(device=device, dtype=dtype)))
    if "digits" in chosen:
        print("\n| digits | batch | seconds | images/s |")
        print("| --- | --- | --- | --- |")
        for r in digits_rows(max(args.reps, 5)):
            print(f"| {r['model']} | {r['batch']} | {r['seconds']:.4f} | {r['images/s']:.1f} |")


if __name__ == "__main__":
    main()
