"""What the node pack costs inside a real ComfyUI server (prints tables; not a timed test):

1. start: the time loading the pack adds to every ComfyUI start, as ComfyUI measures it ("Import times for custom
   nodes": import, ``comfy_entrypoint``, node list and every schema), in fresh processes that have imported what the
   server imports before custom nodes, plus the modules the pack imported (none of diffusers, transformers, peft... may
   be among them), and the number the started server itself prints;
2. sampling: the pack's consistency sampler against ComfyUI's built-in ``lcm`` sampler, on the same model, sigmas and
   latent size (skipped with ``--start-only``).

    COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/python] python benchmarks/comfy_speed.py --runs 5

The pack is this checkout in ``custom_nodes``. Sampling runs both samplers in the same SamplerCustom workflow on a
random SD 1.5-shaped checkpoint (the shapes ComfyUI detects; see onestep_pipelines.testing.comfyui). Each run changes
the seed so that ComfyUI re-executes the sampler; the time is ComfyUI's own execution time of the prompt
(execution_start to execution_success), runs alternate between the two samplers, and the table reports medians after
one warm-up run each.

Start cost measured on 2 CPU cores (2026-12): 2.5-3.4 s before the nodes imported the library lazily (diffusers,
transformers, peft and accelerate loaded at start; the server printed 2.6 s and 3.4 s), 0.02-0.05 s after (the server
prints 0.0 s).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onestep_pipelines.testing.comfyui import (  # noqa: E402
    ComfyServer, comfyui_dir, execution_error, node_pack_start_cost, sd15_unet, write_sd15_checkpoint,
)


def workflow(sampler: dict, size: int, steps: int, seed: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "bench_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "4": sampler,
        "5": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": steps, "denoise": 1.0}},
        "6": {"class_type": "SamplerCustom", "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": seed, "cfg": 1.0, "positive": ["2", 0],
              "negative": ["2", 0], "sampler": ["4", 0], "sigmas": ["5", 0], "latent_image": ["3", 0]}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "bench"}},
    }


def execution_seconds(entry: dict) -> float:
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"] if kind in ("execution_start", "execution_success")}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def start_cost(pack: str, runs: int) -> None:
    """Print what loading ``pack`` adds to a ComfyUI start, over ``runs`` fresh processes."""
    results = [node_pack_start_cost(pack) for _ in range(runs)]
    seconds = [r["seconds"] for r in results]
    ours = [n for n in results[0]["nodes"] if n.startswith("OneStep")]
    heavy = sorted({m.split(".")[0] if not m.startswith("onestep_pipelines") else ".".join(m.split(".")[:2]) for m in results[0]["heavy"]})
    print(f"node pack start cost (nodes.load_custom_node: import + comfy_entrypoint + node list + schemas; {len(ours)} nodes), "
          f"{runs} fresh processes: median {statistics.median(seconds):.3f} s, min {min(seconds):.3f} s, max {max(seconds):.3f} s")
    print(f"heavy modules imported at start: {', '.join(heavy) or 'none'}")


def sampling(server: ComfyServer, runs: int, size: int, steps: int) -> dict[str, list[float]]:
    """ComfyUI's execution times of the built-in lcm sampler and ours, alternating, after one warm-up run each."""
    samplers = {
        "ComfyUI lcm": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}},
        "onestep consistency (gamma 1)": {"class_type": "OneStepConsistencySampler", "inputs": {"gamma": 1.0}},
    }
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for run in range(runs + 1):
        for name, sampler in samplers.items():
            entry = server.run(workflow(sampler, size, steps, seed=10 * run + list(samplers).index(name)))
            if execution_error(entry):
                sys.exit(f"{name}: {execution_error(entry)}")
            if run > 0:  # the first run of each warms up
                times[name].append(execution_seconds(entry))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per sampler (after one warm-up each)")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--start-runs", type=int, default=5, help="fresh processes measuring the start cost")
    parser.add_argument("--start-only", action="store_true", help="measure the start cost only (no sampling)")
    args = parser.parse_args()
    if comfyui_dir() is None:
        sys.exit("set COMFYUI_DIR to a ComfyUI checkout")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, CPU only")
    with tempfile.TemporaryDirectory() as base:
        os.makedirs(os.path.join(base, "models", "checkpoints"))
        os.makedirs(os.path.join(base, "custom_nodes"))
        pack = os.path.join(base, "custom_nodes", "onestep-pipelines")
        os.symlink(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), pack)
        start_cost(pack, args.start_runs)
        if not args.start_only:
            write_sd15_checkpoint(os.path.join(base, "models", "checkpoints", "bench_sd15.safetensors"), sd15_unet(0))
        with ComfyServer(base) as server:
            printed = {os.path.basename(path): s for path, s in server.custom_node_import_seconds().items()}
            print(f"the server's own 'Import times for custom nodes' line for the pack: {printed.get('onestep-pipelines', 'missing')} s")
            if args.start_only:
                return
            times = sampling(server, args.runs, args.size, args.steps)
    reference = statistics.median(times["ComfyUI lcm"])
    print(f"sampling: SD 1.5-shaped random UNet, {args.size}x{args.size}, {args.steps} steps, {args.runs} runs each")
    print(f"{'sampler':34s} {'median s':>9s} {'min s':>7s} {'ratio':>6s}")
    for name, values in times.items():
        print(f"{name:34s} {statistics.median(values):9.3f} {min(values):7.3f} {statistics.median(values) / reference:6.3f}")


if __name__ == "__main__":
    main()
