"""Wall time of the node pack's consistency sampler against ComfyUI's built-in ``lcm`` sampler, inside a real ComfyUI
server, on the same model, sigmas and latent size (prints a table; not a timed test).

    COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/python] python benchmarks/comfy_speed.py --runs 5

Both samplers run in the same SamplerCustom workflow on a random SD 1.5-shaped checkpoint (the shapes ComfyUI detects;
see onestep_pipelines.testing.comfyui). Each run changes the seed so that ComfyUI re-executes the sampler; the time
is ComfyUI's own execution time of the prompt (execution_start to execution_success), runs alternate between the two
samplers, and the table reports medians after one warm-up run each.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onestep_pipelines.testing.comfyui import ComfyServer, comfyui_dir, execution_error, sd15_unet, write_sd15_checkpoint  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per sampler (after one warm-up each)")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if comfyui_dir() is None:
        sys.exit("set COMFYUI_DIR to a ComfyUI checkout")
    samplers = {
        "ComfyUI lcm": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}},
        "onestep consistency (gamma 1)": {"class_type": "OneStepConsistencySampler", "inputs": {"gamma": 1.0}},
    }
    times: dict[str, list[float]] = {name: [] for name in samplers}
    with tempfile.TemporaryDirectory() as base:
        os.makedirs(os.path.join(base, "models", "checkpoints"))
        os.makedirs(os.path.join(base, "custom_nodes"))
        os.symlink(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.join(base, "custom_nodes", "onestep-pipelines"))
        write_sd15_checkpoint(os.path.join(base, "models", "checkpoints", "bench_sd15.safetensors"), sd15_unet(0))
        with ComfyServer(base) as server:
            for run in range(args.runs + 1):
                for name, sampler in samplers.items():
                    entry = server.run(workflow(sampler, args.size, args.steps, seed=10 * run + list(samplers).index(name)))
                    if execution_error(entry):
                        sys.exit(f"{name}: {execution_error(entry)}")
                    if run > 0:  # the first run of each warms up
                        times[name].append(execution_seconds(entry))
    base_name = "ComfyUI lcm"
    reference = statistics.median(times[base_name])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, CPU only; "
          f"SD 1.5-shaped random UNet, {args.size}x{args.size}, {args.steps} steps, {args.runs} runs each")
    print(f"{'sampler':34s} {'median s':>9s} {'min s':>7s} {'ratio':>6s}")
    for name, values in times.items():
        print(f"{name:34s} {statistics.median(values):9.3f} {min(values):7.3f} {statistics.median(values) / reference:6.3f}")


if __name__ == "__main__":
    main()
