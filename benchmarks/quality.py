"""Quality per NFE on the embedded digits benchmark (FD-digits, FD-pixels, precision / recall, class accuracy).

    python benchmarks/quality.py                      # teacher at 1, 2, 4, 8, 16, 32, 64 Euler steps
    python benchmarks/quality.py --quick              # no 32-step teacher row, < 1 minute on 2 cores
    python benchmarks/quality.py --student dmd2=out/dmd2-student --student out/meanflow
    python benchmarks/quality.py --draws 5 --student out/sid   # each cell the mean of 5 noise draws (and their sd)

Students are pipeline folders; each is sampled at 1, 2 and 4 steps with the scheduler saved in it.
Writes benchmarks/results/quality.json, an FD-vs-NFE plot and sample grids (PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from onestep_pipelines.benchmark.digits import DigitsMetric
from onestep_pipelines.benchmark.evaluate import (
    NUM_EVAL_SAMPLES,
    load_digits_pipeline,
    load_digits_teacher,
    save_grid,
    score_digits,
)

TEACHER_NFE = (1, 2, 4, 8, 16, 32, 64)
STUDENT_NFE = (1, 2, 4)
COLUMNS = {"fd": "FD-digits", "acc": "accuracy", "fd_pixels": "FD-pixels", "precision": "precision", "recall": "recall", "copies": "copies", "nearer_a": "nearer-A",
           "fd_sd": "FD-digits sd", "fd_pixels_sd": "FD-pixels sd"}  # quality.json's keys: the rows' columns
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _parse_student(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, os.path.basename(os.path.normpath(spec))
    return name, path


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    teacher = results["teacher"]
    ax.plot([int(k) for k in teacher], [v["fd"] for v in teacher.values()], "o-", label="teacher (Euler)")
    for name, scores in results["students"].items():
        ax.plot([int(k) for k in scores], [v["fd"] for v in scores.values()], "s-", label=name)
    ax.axhline(results["real_vs_real_fd"], color="grey", ls="--", label="real vs real")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("FD-digits")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(students: list[str], quick: bool, out_dir: str, teacher_dir: str | None = None, device: str = "cpu", draws: int = 1) -> dict:
    num_samples = NUM_EVAL_SAMPLES  # same in both modes, so quick numbers compare with full ones
    start = time.time()
    metric = DigitsMetric(device=device)
    floor = metric.real_vs_real()
    teacher = load_digits_teacher(teacher_dir).to(device)
    results = {"real_vs_real_fd": floor.fd, "real_vs_real_acc": floor.acc, "real_vs_real_fd_pixels": floor.fd_pixels, "num_samples": num_samples, "draws": draws,
               "teacher": {}, "students": {}}
    rows, grids = [], {}

    def measure(name: str, pipe, nfe: int, scores: dict, **kwargs) -> None:
        (row,), grid = score_digits(pipe, [nfe], metric, name=name, draws=draws, **kwargs)
        scores[str(nfe)] = {key: row[column] for key, column in COLUMNS.items() if column in row}
        rows.append((name, nfe, scores[str(nfe)]))
        grids[f"{name.split()[0]}_nfe{nfe}"] = grid

    for nfe in TEACHER_NFE[:-2] + TEACHER_NFE[-1:] if quick else TEACHER_NFE:
        measure("teacher (Euler)", teacher, nfe, results["teacher"], euler_grid=True)
    for spec in students:
        name, path = _parse_student(spec)
        pipe = load_digits_pipeline(path).to(device)
        results["students"][name] = {}
        for nfe in STUDENT_NFE:
            measure(name, pipe, nfe, results["students"][name])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "quality.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, os.path.join(out_dir, "quality_fd_vs_nfe.png"))
    for key, images in grids.items():
        save_grid(images, os.path.join(out_dir, f"grid_{key}.png"))

    width = max(len(r[0]) for r in rows)
    print(f"{num_samples} samples, fixed seeds{f', mean of {draws} noise draws (FD: mean ± sd)' if draws > 1 else ''}; "
          f"real-vs-real floor (half A against half B): FD-digits {floor.fd:.3f}, "
          f"FD-pixels {floor.fd_pixels:.3f}, precision {floor.precision:.3f}, recall {floor.recall:.3f}, accuracy {floor.acc:.3f}")
    fd_width = 15 if draws > 1 else 9
    print(f"{'model':<{width}}  NFE  {'FD-digits':>{fd_width}}  {'FD-pixels':>{fd_width}}  precision  recall  accuracy  copies  nearer-A")
    for name, nfe, s in rows:
        fd, fd_pixels = (f"{s[k]:.3f}" + (f" ± {s[k + '_sd']:.3f}" if draws > 1 else "") for k in ("fd", "fd_pixels"))
        print(f"{name:<{width}}  {nfe:>3}  {fd:>{fd_width}}  {fd_pixels:>{fd_width}}  {s['precision']:9.3f}  {s['recall']:6.3f}  {s['acc']:8.3f}  "
              f"{s['copies']:6.3f}  {s['nearer_a']:8.3f}")
    print(f"wrote {os.path.join(out_dir, 'quality.json')} and PNGs in {time.time() - start:.0f} s ({device})")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", action="append", default=[], metavar="[NAME=]DIR", help="a student pipeline folder (repeatable)")
    parser.add_argument("--quick", action="store_true", help="skip the 32-step teacher row (about 30 s on 2 cores)")
    parser.add_argument("--teacher", default=None, help="teacher folder (default: the shipped one)")
    parser.add_argument("--draws", type=int, default=1, help="noise draws per cell (each cell: their mean; FDs: also their sd)")
    parser.add_argument("--out", default=RESULTS, help="results folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps... (the initial noise comes from the same CPU generator, so "
                                                         "numbers compare across devices up to float rounding)")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws {args.draws}: the number of noise draws is a positive integer.")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        run(args.student, args.quick, args.out, args.teacher, args.device, args.draws)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
