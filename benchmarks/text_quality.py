"""Quality of the shipped text-to-image digits teachers (steps x guidance) and of their students.

    python benchmarks/text_quality.py                        # every teacher: 8, 16, 32 steps x guidance 1, 1.5, 2, 3, 5, 7.5
    python benchmarks/text_quality.py --quick                # every teacher at 8 steps and its best guidance (< 5 min on 2 cores)
    python benchmarks/text_quality.py --student dmd2=runs/dmd2/lora --student runs/tdm

A teacher is sampled with its own scheduler; a student (a run folder, a pipeline folder or a LoRA folder) at its own
step count and guidance (its metadata). Scores: FD-digits of 898 images (decoded, back to 8x8 grey digits) against
half B, and prompt accuracy (the shipped classifier's digit equals the prompt's). Writes
benchmarks/results/text_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from onestep_pipelines.benchmark import TEXT_TEACHERS, teacher_folder
from onestep_pipelines.benchmark.text_digits import TEACHER_SETTINGS, TextDigitsMetric, score_text_digits

STEPS = (8, 16, 32)
GUIDANCE = (1.0, 1.5, 2.0, 3.0, 5.0, 7.5)  # 7.5: the SD pipelines' default
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def teacher_rows(name: str, settings, metric) -> list[dict]:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(teacher_folder(name))
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for steps, guidance in settings:
        start = time.time()
        (row,), _ = score_text_digits(pipe, [steps], metric, name=f"{name} (cfg {guidance:g})", guidance_scale=guidance)
        row |= {"guidance": guidance, "seconds": round(time.time() - start, 1)}
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def student_rows(spec: str) -> list[dict]:
    from onestep_pipelines.training.cli import _run_part
    from onestep_pipelines.training.evaluate import evaluate_student

    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, os.path.basename(os.path.normpath(spec))
    rows = evaluate_student(_run_part(path, ("lora", "student")), name=name, device="cpu")
    for row in rows:
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    return (f"{row['model']:34s} steps {row.get('steps', row['NFE']):3d}  NFE {row['NFE']:3d}  FD-digits {row['FD-digits']:7.2f}  "
            f"accuracy {row['accuracy']:.3f}  copies {row['copies']:.3f}  nearer-A {row['nearer-A']:.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one setting per teacher: 8 steps at its best guidance (TEACHER_SETTINGS)")
    parser.add_argument("--teacher", action="append", choices=sorted(TEXT_TEACHERS), help="only these teachers (default: all)")
    parser.add_argument("--no-teachers", action="store_true", help="score the --student folders only")
    parser.add_argument("--student", action="append", default=[], help="NAME=FOLDER or FOLDER (a run, pipeline or LoRA folder); repeatable")
    parser.add_argument("--out", default=os.path.join(RESULTS, "text_quality.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    metric = TextDigitsMetric()
    report = {"teachers": {}, "students": []}
    for name in [] if args.no_teachers else (args.teacher or sorted(TEXT_TEACHERS)):
        _, guidance = TEACHER_SETTINGS[name]
        settings = [(8, guidance)] if args.quick else [(s, g) for s in STEPS for g in GUIDANCE]
        rows = teacher_rows(name, settings, metric)
        best = min(rows, key=lambda r: r["FD-digits"] if r["accuracy"] >= 0.9 else float("inf"))
        report["teachers"][name] = {"rows": rows, "best": best}
        print(f"{name}: best {best['FD-digits']:.2f} (accuracy {best['accuracy']:.3f}) at {best['steps']} steps, guidance {best['guidance']:g}")
    for spec in args.student:
        report["students"] += student_rows(spec)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
