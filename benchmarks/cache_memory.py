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


def write_synthetic_cache(folder: str, count: int) -> None:
    """A cache of ``count`` prompts (and the unconditional row) in ``onestep-train cache``'s format."""
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
    rows = count + 1
    for start in range(0, rows, SHARD_ROWS):
        n = min(SHARD_ROWS, rows - start)
        name = f"embeddings-{len(shards):05d}.safetensors"
        save_file({k: torch.zeros(n, *shape, dtype=dtype) for k, (shape, dtype) in ROW.items()}, os.path.join(folder, name))
        shards.append(name)
    keys = {k: {"dtype": str(dtype).removeprefix("torch."), "row_shape": list(shape)} for k, (shape, dtype) in ROW.items()}
    record = {"format": 1, "teacher": "synthetic", "architecture": "sd", "resolution": 32, "source": "synthetic", "column": "",
              "shard_rows": SHARD_ROWS, "count": count, "shards": shards, "keys": keys}
    with open(os.path.join(folder, "cache.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--folder", default="")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
