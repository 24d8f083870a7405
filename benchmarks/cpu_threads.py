"""Seconds per update of the default digits run (DMD2, batch 128) by CPU thread count, idle and beside a busy process.

    python benchmarks/cpu_threads.py [--updates 10] [--threads 1,2,0] [--busy 0,1]

``--threads 0`` is auto (training/threads.py); ``--busy N`` starts N processes that each keep one core busy for the
whole run. Prints one row per (busy, threads): seconds per update, the counts auto chose ([update, count] at each
change) and the checksum of the trained weights (the same at every count). Numbers measured with it are in
training/threads.py; other work on the machine counts too, so note the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def run(threads: int, updates: int, busy: int) -> dict:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "run")
            command = [sys.executable, "-m", "onestep_pipelines.training.cli", "distill", "--cpu-threads", str(threads), "--max-train-steps",
                       str(updates), "--no-evaluate", "--preview-every", "0", "--checkpoint-every", str(updates), "--output-dir", out]
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            subprocess.run(command, check=True, capture_output=True, env=env)
            with open(os.path.join(out, "summary.json")) as f:
                return json.load(f)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--threads", default="1,2,0", help="thread counts (0 = auto)")
    parser.add_argument("--busy", default="0,1", help="numbers of busy processes beside the run")
    args = parser.parse_args()
    print(f"{'busy':>4} {'threads':>7} {'s/update':>9}  {'chosen':<20} checksum")
    for busy in (int(b) for b in args.busy.split(",")):
        for threads in (int(t) for t in args.threads.split(",")):
            summary = run(threads, args.updates, busy)
            chosen = json.dumps(summary["cpu_threads"]["changes"])
            label = "auto" if threads == 0 else str(threads)
            print(f"{busy:>4} {label:>7} {summary['seconds_per_step']:>9.3f}  {chosen:<20} {summary['rank_checksums'][0]:.10g}", flush=True)


if __name__ == "__main__":
    main()
