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


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ models
def sd_setup(size: str):
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    stock = tiny_pipeline("sd")
    if size == "tiny":
        unet, vae, width, ctx = stock.unet, stock.vae, 32, stock.unet.config.cross_attention_dim
    else:
        torch.manual_seed(0)
        unet, vae, width, ctx = UNet2DConditionModel(cross_attention_dim=768).eval(), AutoencoderTiny().eval(), 512, 768
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    parts = {**stock.components, "unet": unet, "vae": vae, "scheduler": scheduler}
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    ours = FewStepStableDiffusionPipeline(**parts, requires_safety_checker=False)
    embeds = {"prompt_embeds": torch.zeros(1, 77, ctx)}
    latent = torch.randn(1, 4, width // 8, width // 8)

    def raw(n):
        x = latent
        for i in range(n):
            x = unet(x, torch.tensor(999 - 250 * i), encoder_hidden_states=embeds["prompt_embeds"]).sample
        return vae.decode(x / vae.config.scaling_factor).sample

    return pipe, ours, raw, embeds, width, {"gamma": 1.0, "timestep_preset": "lcm"}


def sd3_setup(size: str):
    from diffusers import AutoencoderTiny, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    stock = tiny_pipeline("sd3")
    if size == "tiny":
        transformer, vae, width = stock.transformer, stock.vae, 32
    else:
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                                            num_attention_heads=12, joint_attention_dim=768, caption_projection_dim=768, pooled_projection_dim=768).eval()
        vae, width = AutoencoderTiny(latent_channels=16).eval(), 512
        vae.register_to_config(shift_factor=0.0)
    parts = {**stock.components, "transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}
    pipe, ours = StableDiffusion3Pipeline(**parts), FewStepStableDiffusion3Pipeline(**parts)
    cfg = transformer.config
    embeds = {"prompt_embeds": torch.zeros(1, 77, cfg.joint_attention_dim), "pooled_prompt_embeds": torch.zeros(1, cfg.pooled_projection_dim)}
    latent = torch.randn(1, cfg.in_channels, width // 8, width // 8)

    def raw(n):
        x = latent
        for i in range(n):
            x = transformer(hidden_states=x, timestep=torch.tensor([1000.0 - 250 * i]), encoder_hidden_states=embeds["prompt_embeds"],
                            pooled_projections=embeds["pooled_prompt_embeds"]).sample
        return vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample

    return pipe, ours, raw, embeds, width, {"gamma": 0.0}


def pipeline_rows(name: str, setup, size: str, reps: int) -> list[dict]:
    stock, ours, raw, embeds, width, knobs = setup(size)
    own_scheduler = stock.scheduler
    our_scheduler = ConsistencyScheduler.from_config(own_scheduler.config, check_finite=True, **knobs)
    metadata = StudentMetadata.from_scheduler(our_scheduler, method="benchmark", architecture="sd3" if "SD3" in name else "sd",
                                              num_inference_steps=1, guidance_baked=True)
    ours.set_student(metadata)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    call = dict(embeds, guidance_scale=1.0, height=width, width=width, output_type="pt")
    rows = []
    with torch.no_grad():
        for n in STEPS:
            generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
            t_raw = median_time(lambda: raw(n), reps)
            stock.scheduler = own_scheduler
            t_stock = median_time(lambda: stock(**call, num_inference_steps=n, generator=generator()), reps)
            stock.scheduler = our_scheduler
            t_stock_ours = median_time(lambda: stock(**call, num_inference_steps=n, generator=generator()), reps)
            t_ours = median_time(lambda: ours(**call, num_inference_steps=n, generator=generator()), reps)
            rows.append({"model": name, "steps": n, "raw": t_raw, "stock": t_stock, "stock + ours": t_stock_ours, "ours": t_ours})
            print(f"  {name} {n} steps: raw {t_raw:.3f} s, stock {t_stock:.3f}, stock + ours {t_stock_ours:.3f}, ours {t_ours:.3f}", file=sys.stderr)
    return rows


def scheduler_rows(calls: int = 300) -> list[dict]:
    """Microseconds per ``step`` call on an SD-sized latent (1x4x64x64): the stock few-step schedulers against ours
    with the same knobs; free of the network's timing noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    pairs = {
        "LCM (gamma 1), 4 steps": (LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), {"gamma": 1.0, "timestep_preset": "lcm"}),
        "FlowMatchEuler (gamma 0), 4 steps": (FlowMatchEulerDiscreteScheduler(shift=3.0), {"gamma": 0.0}),
    }
    rows = []
    x, out = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64)
    for name, (stock, knobs) in pairs.items():
        ours = ConsistencyScheduler.from_config(stock.config, **knobs)
        row = {"scheduler": name}
        for label, scheduler in (("stock", stock), ("ours", ours)):
            generator = torch.Generator().manual_seed(0)

            def run():
                scheduler.set_timesteps(4)
                sample = x
                for t in scheduler.timesteps:
                    sample = scheduler.step(out, t, sample, generator=generator).prev_sample

            run()
            start = time.perf_counter()
            for _ in range(calls):
                run()
            row[label] = (time.perf_counter() - start) / (4 * calls) * 1e6  # per step, set_timesteps included
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15,sd3,scheduler,digits", help="comma-separated: tiny, sd15, sd3, scheduler, digits")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per cell (median), after one warm-up")
    args = parser.parse_args()
    chosen = {m.strip() for m in args.models.split(",")}
    torch.set_grad_enabled(False)
    rows = []
    if "tiny" in chosen:
        rows += pipeline_rows("tiny SD UNet", sd_setup, "tiny", max(args.reps, 5))
        rows += pipeline_rows("tiny SD3 MMDiT", sd3_setup, "tiny", max(args.reps, 5))
    if "sd15" in chosen:
        rows += pipeline_rows("SD 1.5 UNet 512px", sd_setup, "full", args.reps)
    if "sd3" in chosen:
        rows += pipeline_rows("SD3-style MMDiT 512px", sd3_setup, "full", args.reps)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__} (CPU), float32, batch 1; "
          f"median of {args.reps} runs after a warm-up (tiny models: {max(args.reps, 5)})")
    if rows:
        print(f"| model | steps | raw forward + decode (s) | stock pipeline (ratio) | stock + our scheduler (ratio) | our pipeline (ratio) | ours / stock |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['model']} | {r['steps']} | {r['raw']:.3f} | {r['stock']:.3f} ({r['stock'] / r['raw']:.3f}) | "
                  f"{r['stock + ours']:.3f} ({r['stock + ours'] / r['raw']:.3f}) | {r['ours']:.3f} ({r['ours'] / r['raw']:.3f}) | "
                  f"{r['stock + ours'] / r['stock']:.3f} |")
    if "scheduler" in chosen:
        print("\n| scheduler step (1x4x64x64 latent) | stock (us / step) | ours (us / step) | ours / stock |")
        print("| --- | --- | --- | --- |")
        for r in scheduler_rows():
            print(f"| {r['scheduler']} | {r['stock']:.0f} | {r['ours']:.0f} | {r['ours'] / r['stock']:.3f} |")
    if "digits" in chosen:
        print("\n| digits | batch | seconds | images/s |")
        print("| --- | --- | --- | --- |")
        for r in digits_rows(max(args.reps, 5)):
            print(f"| {r['model']} | {r['batch']} | {r['seconds']:.4f} | {r['images/s']:.1f} |")


if __name__ == "__main__":
    main()
