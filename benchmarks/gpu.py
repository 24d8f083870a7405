"""Every GPU number of the README in one run: one-step inference against the bare network, host synchronisations,
the scheduler step, the digits main job's training throughput and real-size training memory (prints tables; writes
``gpu.json`` after every section, so a run stopped early keeps what it finished). Sized to finish in under 8
minutes on one H200-class GPU (not yet timed on one).

    python benchmarks/gpu.py                                   # every section, on cuda
    python benchmarks/gpu.py --sections inference,scheduler    # some of them
    python benchmarks/gpu.py --tiny --device cpu               # the same code on tiny models (a smoke test)

Sections:
- ``inference``: batch 1, 512x512, an SD 1.5-size UNet (fp16) and an SD3-style MMDiT (24 blocks, bf16), each decoded by a
  TAESD-size AutoencoderTiny: the bare forwards + decode, the stock pipeline with its own scheduler, with our
  ConsistencyScheduler, and our few-step pipeline (NaN / inf check on and off); median of 20 after 3 warm-ups,
  CUDA-synchronised; 1 and 4 steps.
- ``compiled``: the SD 1.5-size UNet and decoder under ``torch.compile`` (inductor) and under
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs): our 1-step pipeline against the same compiled bare forward +
  decode; graphs made after warm-up across 1 / 2 / 4 steps.
- ``syncs``: host synchronisations per call (``torch.cuda.set_sync_debug_mode("warn")``), stock LCM against ours; and our
  denoising loop under ``set_sync_debug_mode("error")``.
- ``scheduler``: host microseconds per ``step`` on a CUDA fp16 1x4x64x64 latent, ``set_timesteps`` amortised over 4 steps.
- ``training``: the README main job (``onestep-train distill`` defaults: DMD2, 1000 updates, digits) on the GPU: time, FD.
- ``memory``: one DMD2 / consistency update with a LoRA student of an SDXL-size UNet and a Flux-size transformer (random
  weights, the real configs) at 1024 px, gradient checkpointing, bf16: peak GPU memory and seconds per update.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import speed  # noqa: E402  (benchmarks/speed.py)

SECTIONS = ("inference", "compiled", "syncs", "scheduler", "training", "memory")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.6 B parameters)
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def environment(device: str) -> dict:
    import diffusers

    info = {"machine": platform.machine(), "torch": torch.__version__, "diffusers": diffusers.__version__, "device": device}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------ inference
def inference(args) -> dict:
    size, reps, warmup = ("tiny", 3, 1) if args.tiny else ("full", 20, 3)
    fp16 = torch.float16 if torch.device(args.device).type == "cuda" else torch.float32
    bf16 = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    rows = speed.pipeline_rows("SD 1.5-size UNet, fp16", speed.sd_setup, size, reps, args.device, fp16, steps=(1, 4), warmup=warmup)
    rows += speed.pipeline_rows("SD3-style MMDiT, bf16", speed.sd3_setup, size, reps, args.device, bf16, steps=(1, 4), warmup=warmup)
    print(speed.pipeline_table(rows))
    return {"rows": rows}


def compiled(args) -> dict:
    """Our 1-step pipeline against the compiled bare forward + decode, with inductor and with CUDA graphs."""
    size, reps = ("tiny", 3) if args.tiny else ("full", 20)
    dtype = torch.float16 if torch.device(args.device).type == "cuda" else torch.float32
    out = {}
    for mode in ("default", "reduce-overhead"):
        if mode == "reduce-overhead" and torch.device(args.device).type != "cuda":
            continue
        torch._dynamo.reset()
        stock, ours, raw, embeds, width, knobs = speed.sd_setup(size, args.device, dtype)
        ours.scheduler = speed.ConsistencyScheduler.from_config(stock.scheduler.config, **knobs)
        ours.set_progress_bar_config(disable=True)
        unet, decode = ours.unet, ours.vae.decode
        ours.unet = torch.compile(unet, mode=mode)
        ours.vae.decode = torch.compile(decode, mode=mode)
        raw_unet = ours.unet  # the bare loop with the same compiled modules

        def bare(n):
            x = torch.randn(1, 4, width // 8, width // 8, device=args.device, dtype=dtype)
            for i in range(n):
                x = raw_unet(x, torch.full((), 999 - 250 * i, device=args.device), encoder_hidden_states=embeds["prompt_embeds"]).sample
            return ours.vae.decode(x / ours.vae.config.scaling_factor).sample

        call = dict(embeds, guidance_scale=1.0, height=width, width=width, output_type="pt")
        with torch.no_grad():
            for n in (1, 2, 4, 1):  # warm-up: the graphs of every step count
                ours(**call, num_inference_steps=n)
                bare(n)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            t_bare = speed.median_time(lambda: bare(1), reps, args.device, warmup=2)
            t_ours = speed.median_time(lambda: ours(**call, num_inference_steps=1), reps, args.device, warmup=2)
            for n in (1, 2, 4):
                ours(**call, num_inference_steps=n)
            new_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        out[mode] = {"bare forward + decode (s)": t_bare, "our 1-step pipeline (s)": t_ours, "ratio": t_ours / t_bare,
                     "graphs made after warm-up": new_graphs}
        print(f"compiled ({mode}): bare {t_bare:.4f} s, ours {t_ours:.4f} s, ratio {t_ours / t_bare:.3f}, new graphs {new_graphs}")
    return out


# ------------------------------------------------------------------------------------------ syncs
def syncs(args) -> dict:
    if torch.device(args.device).type != "cuda":
        return {"skipped": "CUDA only"}
    size = "tiny" if args.tiny else "full"
    stock, ours, raw, embeds, width, knobs = speed.sd_setup(size, args.device, torch.float16)
    own = stock.scheduler
    theirs = speed.ConsistencyScheduler.from_config(own.config, **knobs)
    ours.scheduler = speed.ConsistencyScheduler.from_config(own.config, **knobs)
    call = dict(embeds, guidance_scale=1.0, height=width, width=width, output_type="pt", generator=torch.Generator(args.device).manual_seed(0))
    out = {}

    def count(pipe, n):
        pipe(**call, num_inference_steps=n)  # warm: schedules on the device
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pipe(**call, num_inference_steps=n)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    with torch.no_grad():
        for n in (1, 4):
            stock.scheduler = own
            out[f"stock + LCMScheduler, {n} steps"] = count(stock, n)
            stock.scheduler = theirs
            out[f"stock + ours, {n} steps"] = count(stock, n)
            out[f"our pipeline, {n} steps"] = count(ours, n)
        # the denoising loop alone, in "error" mode: from the first UNet forward to the last scheduler step
        handle = ours.unet.register_forward_pre_hook(lambda module, a: torch.cuda.set_sync_debug_mode("error") if module._first else None)
        ours.unet._first = True

        def after_step(pipe, i, t, tensors):
            pipe.unet._first = False
            if i == pipe.num_timesteps - 1:
                torch.cuda.set_sync_debug_mode("default")
            return {}

        try:
            ours(**call, num_inference_steps=4, callback_on_step_end=after_step)
            out["our denoising loop under set_sync_debug_mode('error')"] = "no synchronisation"
        except RuntimeError as error:
            out["our denoising loop under set_sync_debug_mode('error')"] = f"synchronised: {error}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
            handle.remove()
    for key, value in out.items():
        print(f"syncs: {key}: {value}")
    return out


def scheduler(args) -> dict:
    dtype = torch.float16 if torch.device(args.device).type == "cuda" else torch.float32
    rows = speed.scheduler_rows(calls=50 if args.tiny else 500, device=args.device, dtype=dtype)
    print(speed.scheduler_table(rows))
    return {"rows": rows}


# ------------------------------------------------------------------------------------------ training
def training(args) -> dict:
    from onestep_pipelines.training.config import DistillConfig
    from onestep_pipelines.training.trainer import distill

    with tempfile.TemporaryDirectory() as folder:
        config = DistillConfig(output_dir=os.path.join(folder, "run"), max_train_steps=3 if args.tiny else 1000, evaluate=not args.tiny,
                               device="cpu" if torch.device(args.device).type == "cpu" else "auto", preview_every=0, log_with="none")
        start = time.time()
        result = distill(config)
        total = time.time() - start
    out = {"updates": result["steps"], "training seconds": result["seconds"], "seconds per update": result["seconds_per_step"],
           "whole command seconds": total, "device": result["device"], "precision": result["precision"], "peak memory MB": result["peak_memory_mb"],
           "scores": result.get("scores", [])}
    print(f"training: {result['steps']} DMD2 updates in {result['seconds']:.1f} s ({result['seconds_per_step'] * 1000:.1f} ms each) on "
          f"{result['device']}, {total:.1f} s in all; " + ", ".join(f"{r['model']} {r['NFE']} NFE FD {r['FD-digits']:.2f}" for r in out["scores"]))
    return out


class RandomLatents:
    """Batches of random latents and prompt indices, for methods that train on images (no VAE, no dataset)."""

    def __init__(self, shape, prompts: int, device):
        self.shape, self.prompts, self.device = shape, prompts, device

    def batch(self, rng) -> dict:
        return {"images": rng.normal(*self.shape), "conditions": {"prompt_index": rng.integers(self.prompts)}}


def random_teacher(arch: str, tiny: bool, device, latent_size: int):
    """A Teacher of the real SDXL / Flux denoiser config with random weights built on ``device`` in bf16; text
    encoders and VAE are the tiny kit's (prompt embeddings are random tensors of the real shapes)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from onestep_pipelines.testing import tiny_pipeline
    from onestep_pipelines.training.teachers import Teacher
    from onestep_pipelines.training.trainer import cast

    stock = tiny_pipeline(arch)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    name = "unet" if arch == "sdxl" else "transformer"
    if tiny:
        model = getattr(stock, name)
    else:
        with torch.device(device):
            model = UNet2DConditionModel(**SDXL_UNET) if arch == "sdxl" else FluxTransformer2DModel()
    model.to(device)
    cast(model, dtype)
    pipe = type(stock)(**{**stock.components, name: model})
    teacher = Teacher(pipe, source=f"random-weight {arch}", resolution=latent_size * pipe.vae_scale_factor)
    cfg, n, g = model.config, 3, torch.Generator(device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    if arch == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        size = latent_size * 8
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype).repeat(n, 1)
        teacher.embeddings = {"prompt_embeds": randn(n, 77, cfg.cross_attention_dim), "pooled_prompt_embeds": randn(n, pooled), "time_ids": time_ids}
    else:
        tokens = 32 if tiny else 512
        teacher.embeddings = {"prompt_embeds": randn(n, tokens, cfg.joint_attention_dim), "pooled_prompt_embeds": randn(n, cfg.pooled_projection_dim),
                              "text_ids": torch.zeros(n, tokens, 3, device=device, dtype=dtype)}
    teacher.prompts = [f"prompt {i}" for i in range(n - 1)]  # the last row is the unconditional one
    return teacher


def memory(args) -> dict:
    from accelerate.state import AcceleratorState

    from onestep_pipelines.training.config import DistillConfig
    from onestep_pipelines.training.trainer import distill

    cuda = torch.device(args.device).type == "cuda"
    latent = 8 if args.tiny else 128  # 1024 px
    runs = [("sdxl", "dmd2", {"lora_rank": 16}), ("sdxl", "dmd2", {"lora_rank": 16, "fake_lora_rank": 16}),
            ("sdxl", "consistency", {"lora_rank": 16}), ("flux", "dmd2", {"lora_rank": 16, "fake_lora_rank": 16}),
            ("flux", "consistency", {"lora_rank": 16})]
    out = []
    for arch, method, options in runs:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        AcceleratorState._reset_state(reset_partial_state=True)
        row = {"model": arch, "method": method, **options, "resolution": latent * 8, "batch": 1}
        try:
            teacher = random_teacher(arch, args.tiny, args.device, latent)
            data = RandomLatents(teacher.sample_shape, len(teacher.prompts), args.device) if method == "consistency" else None
            with tempfile.TemporaryDirectory() as folder:
                config = DistillConfig(method=method, teacher="in-memory", output_dir=os.path.join(folder, "run"), prompts="in-memory",
                                       resolution=teacher.resolution, batch_size=1, max_train_steps=3, gradient_checkpointing=True,
                                       mixed_precision="bf16" if cuda else "no", device="auto" if cuda else "cpu", ema_decay=0.0,
                                       evaluate=False, preview_every=0, log_with="none", log_every=1, **options)
                result = distill(config, teacher=teacher, data=data or _PromptBatches(teacher), export=False)
            row.update({"peak GPU memory GB": result["peak_memory_mb"] / 1024 if cuda else None,
                        "seconds per update": result["this_part"]["seconds"] / result["this_part"]["steps"]})
        except torch.cuda.OutOfMemoryError as error:
            row["error"] = f"out of memory: {str(error)[:160]}"
        except Exception as error:  # noqa: BLE001  (a benchmark row reports what went wrong and the run goes on)
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        finally:
            teacher = data = None
        out.append(row)
        print(f"memory: {row}")
    return {"rows": out}


class _PromptBatches:
    def __init__(self, teacher):
        self.teacher = teacher

    def batch(self, rng) -> dict:
        return {"conditions": self.teacher.sample_conditions(rng)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few repetitions (checks the script, not the numbers)")
    parser.add_argument("--out", default=RESULTS, help="folder of gpu.json")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (run with --device cpu --tiny to check the script)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu.json" if not args.tiny else "gpu-tiny.json")
    report = {"environment": environment(args.device), "tiny": args.tiny}
    print(json.dumps(report["environment"]))
    for section in chosen:
        start = time.time()
        try:
            report[section] = globals()[section](args)
        except Exception as error:  # noqa: BLE001  (keep the other sections)
            report[section] = {"error": f"{type(error).__name__}: {error}"[:1000]}
            print(f"{section}: failed: {report[section]['error']}", file=sys.stderr)
        report[section + " seconds"] = time.time() - start
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2, default=str)
        os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 1 if any(isinstance(report.get(s), dict) and "error" in report[s] for s in chosen) else 0


if __name__ == "__main__":
    sys.exit(main())
