"""Wall time per update and peak memory of the trainer's methods on the digits teacher, each in a fresh process
(prints a table; not a timed test). The main use: the JVP targets of MeanFlow, flow-map distillation and sCM against
their JVP-free counterparts (and the exact JVP against the time-smoothed one).

    python benchmarks/training_cost.py --updates 40 --batch-size 128

Peak memory is the process's peak resident set (CPU) or ``torch.cuda.max_memory_allocated`` (GPU), read from the
run's summary.json; times are the run's own seconds per update (model loading excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

RUNS = [
    ("meanflow", "split", []),
    ("meanflow", "jvp", []),  # JVP in z, central difference in t (--tangent-time-step 0.01, the default)
    ("meanflow", "jvp", ["--tangent-time-step", "0"]),  # the exact JVP in (z, t)
    ("flowmap", "euler", []),  # the default --jump-fraction 0.5
    ("flowmap", "euler", ["--jump-fraction", "0"]),  # one teacher Euler step per target
    ("flowmap", "jvp", []),
    ("flowmap", "jvp", ["--tangent-time-step", "0"]),
    ("scm", "", []),
    ("scm", "", ["--tangent-time-step", "0"]),
    ("scm", "", ["--dmd-weight", "0.1"]),  # rCM
    ("dmd2", "", []),
    ("sid", "", []),
    ("consistency", "", []),
]


def run(method: str, target: str, extra: list[str], updates: int, batch_size: int, folder: str) -> dict:
    out = os.path.join(folder, "-".join([method, target or "default"] + [a.strip("-") for a in extra]))
    args = [sys.executable, "-m", "onestep_pipelines.training.cli", "distill", "--method", method, "--output-dir", out,
            "--max-train-steps", str(updates), "--batch-size", str(batch_size), "--no-evaluate", "--preview-every", "0",
            "--checkpoint-every", str(10 * updates)] + (["--target", target] if target else []) + extra
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--methods", default="", help="comma-separated subset of: " + ", ".join(sorted({m for m, _, _ in RUNS})))
    args = parser.parse_args()
    chosen = {m.strip() for m in args.methods.split(",") if m.strip()}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for method, target, extra in RUNS:
            if chosen and method not in chosen:
                continue
            summary = run(method, target, extra, args.updates, args.batch_size, folder)
            label = " ".join([target or "-"] + extra)
            rows.append((method, label, summary["seconds_per_step"], summary["peak_memory_mb"]))
            print(f"  {method} {label}: {summary['seconds_per_step']:.3f} s/update, {summary['peak_memory_mb']:.0f} MB", file=sys.stderr)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU threads; digits teacher, batch {args.batch_size}, {args.updates} updates each")
    print(f"{'method':12s} {'target':26s} {'s/update':>9s} {'peak MB':>8s}")
    for method, target, seconds, memory in rows:
        print(f"{method:12s} {target:26s} {seconds:9.3f} {memory:8.0f}")


if __name__ == "__main__":
    main()
