"""Memory and speed of the data side with a prompt-embedding cache, at 10 thousand and 1 million prompts.

For each size the script writes a cache in the format of ``onestep-train cache`` (``training/cache.py``), with rows the
size of a tiny config's embeddings (synthetic values: the reader does not look at them), then, in a fresh Python
process, opens it as ``distill --cache`` does and draws batches of random rows: it prints the start time, the
process's own memory (``RssAnon``: what it allocated; the cache's file pages it maps are the kernel's page cache, which
the kernel drops under pressure), its peak RSS with those pages, and the batches per second, next to what holding the
same embeddings in memory takes. Written to a temporary folder unless ``--folder`` is given.

    python benchmarks/cache_memory.py [--sizes 10000,1000000] [--batch-size 64] [--batches 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import save_file

ROW = {"prompt_embeds": ((8, 16), torch.float16)}  # a tiny config's row (8 tokens x 16 channels)
SHARD_ROWS = 4096

READER = r"""
import json, resource, sys, time
start = time.perf_counter()
import torch
from onestep_pipelines.training.cache import PromptCache
cache = PromptCache(sys.argv[1])
column = cache.columns["prompt_embeds"].to("cpu")
opened = time.perf_counter() - start
batch, batches = int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
t = time.perf_counter()
for _ in range(batches):
    rows = column[torch.randint(len(cache.prompts) + 1, (batch,), generator=g)]
    prompts = [cache.prompts[i] for i in torch.randint(len(cache.prompts), (4,), generator=g).tolist()]
rate = batches / (time.perf_counter() - t)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
anon = int(status.get("RssAnon", "0 kB").split()[0]) / 1024
print(json.dumps({"open_s": opened, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "anon_mb": anon, "batches_per_s": rate}))
"""


RUN = r"""
import json, resource, sys, time
start = time.perf_counter()
from onestep_pipelines.training.cli import main
code = main(sys.argv[1:])
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "anon_mb": int(status["RssAnon"].split()[0]) / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_synthetic_cache(folder: str, count: int, rows: dict | None = None, teacher: str = "synthetic", architecture: str = "sd",
                          resolution: int = 32) -> None:
    """A cache of ``count`` prompts (and the unconditional row) in ``onestep-train cache``'s format; ``rows``:
    ``{key: (row shape, dtype)}`` (default ``ROW``), ``teacher`` / ``architecture`` / ``resolution`` as recorded."""
    rows_spec = rows or ROW
    os.makedirs(folder, exist_ok=True)
    shards, offsets, position = [], [], 0
    with open(os.path.join(folder, "prompts.txt"), "w", encoding="utf-8") as f:
        for i in range(count):
            line = f"a photo of prompt number {i}\n"
            offsets.append(position)
            position += len(line.encode())
            f.write(line)
    offsets.append(position)
    np.save(os.path.join(folder, "prompts.offsets.npy"), np.asarray(offsets, dtype=np.int64))
    total = count + 1
    for start in range(0, total, SHARD_ROWS):
        n = min(SHARD_ROWS, total - start)
        name = f"embeddings-{len(shards):05d}.safetensors"
        save_file({k: torch.zeros(n, *shape, dtype=dtype) for k, (shape, dtype) in rows_spec.items()}, os.path.join(folder, name))
        shards.append(name)
    keys = {k: {"dtype": str(dtype).removeprefix("torch."), "row_shape": list(shape)} for k, (shape, dtype) in rows_spec.items()}
    record = {"format": 1, "teacher": teacher, "architecture": architecture, "resolution": resolution, "source": "synthetic", "column": "",
              "shard_rows": SHARD_ROWS, "count": count, "shards": shards, "keys": keys}
    with open(os.path.join(folder, "cache.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--folder", default="")
    parser.add_argument("--teacher", default="", help="also run `onestep-train distill --cache` of this teacher folder (a tiny one: "
                                                      "`python -c 'from onestep_pipelines.testing import tiny_pipeline; tiny_pipeline(\"sd\").save_pretrained(\"T\")'`) "
                                                      "from caches of its embedding shape at each size")
    parser.add_argument("--updates", type=int, default=20)
    args = parser.parse_args()
    if args.teacher:
        return run_from_caches(args)
    root = args.folder or tempfile.mkdtemp(prefix="onestep-cache-bench-")
    row_bytes = sum(np.prod(shape) * torch.tensor([], dtype=dtype).element_size() for shape, dtype in ROW.values())
    print("| prompts | cache on disk | write | open | reader's own memory (RssAnon) | peak RSS (with mapped file pages) | batches of 64 / s | "
          "the same embeddings in memory |")
    print("|---|---|---|---|---|---|---|---|")
    for count in (int(n) for n in args.sizes.split(",")):
        folder = os.path.join(root, f"cache-{count}")
        start = time.perf_counter()
        write_synthetic_cache(folder, count)
        written = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 2**20
        out = subprocess.run([sys.executable, "-c", READER, folder, str(args.batch_size), str(args.batches)], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {count:,} | {size:.0f} MB | {written:.1f} s | {result['open_s']:.2f} s | {result['anon_mb']:.0f} MB | {result['peak_rss_mb']:.0f} MB | "
              f"{result['batches_per_s']:.0f} | {count * row_bytes / 2**20:.0f} MB (+ the prompts' strings) |")


def run_from_caches(args) -> None:
    """A DMD2 LoRA run of ``args.teacher`` from a cache of each size (rows of its own embedding shapes): its total
    time, its own memory and its peak RSS, in a fresh process each."""
    from onestep_pipelines.training.teachers import encode_prompts, load_teacher

    teacher = load_teacher(args.teacher, resolution=32)
    with torch.no_grad():
        shapes = {k: (tuple(v.shape[1:]), v.dtype) for k, v in encode_prompts(teacher, [""]).items()}
    root = args.folder or tempfile.mkdtemp(prefix="onestep-cache-run-")
    print(f"| prompts | cache on disk | distill --cache: {args.updates} updates, in all | its own memory (RssAnon) | peak RSS |")
    print("|---|---|---|---|---|")
    for count in (int(n) for n in args.sizes.split(",")):
        folder = os.path.join(root, f"run-cache-{count}")
        write_synthetic_cache(folder, count, shapes, teacher.source, teacher.architecture, teacher.resolution)
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 2**20
        argv = ["distill", "--teacher", args.teacher, "--cache", folder, "--resolution", "32", "--lora-rank", "4", "--fake-lora-rank", "4",
                "--batch-size", "8", "--max-train-steps", str(args.updates), "--preview-every", "0", "--no-evaluate",
                "--checkpoint-every", str(args.updates), "--output-dir", os.path.join(root, f"run-{count}"), "--cpu-threads", "1"]
        out = subprocess.run([sys.executable, "-c", RUN, *argv], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [line for line in out.stdout.strip().splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            raise SystemExit(out.stderr[-3000:] + out.stdout[-1000:])
        result = json.loads(lines[-1])
        print(f"| {count:,} | {size:.0f} MB | {result['seconds']:.1f} s | {result['anon_mb']:.0f} MB | {result['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
