"""Leaderboard: every method of the trainer distils the digits teacher with the same training wall time, and each
student is scored at 1, 2, 4 and 8 steps (FD-digits, FD-pixels and class accuracy, 898 samples from fixed seeds).

    python benchmarks/leaderboard.py                 # 15 minutes of training per method
    python benchmarks/leaderboard.py --quick         # 1 minute per method: about 35 minutes in all on 2 cores
    python benchmarks/leaderboard.py --minutes 30    # any budget per method

Equal compute means equal wall time on the machine that runs it: each method's seconds per update are measured first
(a short run) and its update count is the budget divided by them, so a method with cheaper updates gets more of them.
Each method runs its best recipe from README's students table. Resumable: finished methods are kept, a method whose
training stopped continues from its last checkpoint with the same update count, and the plan (update counts) is fixed
once measured. Writes ``benchmarks/results/leaderboard/``: ``leaderboard.json``, ``leaderboard.md`` (the table) and
``leaderboard.png`` (FD against NFE, one line per method; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "leaderboard")
NFE = (1, 2, 4, 8)
RECIPES = {  # name -> options (README's students table; every other option at its default)
    "dmd2": {"method": "dmd2", "num_steps": 1},
    "consistency (PCM, 4 phases)": {"method": "consistency", "num_steps": 4, "phases": 4},
    "tdm": {"method": "tdm", "num_steps": 4},
    "meanflow": {"method": "meanflow", "target_ema": 0.99, "learning_rate": 2e-4, "endpoint_fraction": 0.5},
    "flowmap": {"method": "flowmap", "target_ema": 0.95, "ode_steps": 16, "learning_rate": 2e-4, "endpoint_fraction": 0.5},
    "sid": {"method": "sid", "num_steps": 1},
    "scm": {"method": "scm", "learning_rate": 3e-5, "tangent_warmup": 500},
    "meanflow (jvp)": {"method": "meanflow", "target": "jvp", "target_ema": 0.99, "learning_rate": 2e-4, "endpoint_fraction": 0.5},
    "flowmap (jvp)": {"method": "flowmap", "target": "jvp", "target_ema": 0.95, "learning_rate": 2e-4, "endpoint_fraction": 0.5},
    "shortcut": {"method": "meanflow", "target": "shortcut", "target_ema": 0.99, "learning_rate": 2e-4},
    "piflow": {"method": "piflow", "num_steps": 1},
    "progressive": {"method": "progressive", "num_steps": 4, "ode_steps": 32},
    "phased-dmd": {"method": "phased-dmd", "num_steps": 4, "phases": 2},
    "tdd": {"method": "tdd", "num_steps": 4},
    "hyper-sd": {"method": "hyper-sd", "num_steps": 4},
    "twinflow": {"method": "twinflow", "source": "data", "target_ema": 0.99, "learning_rate": 2e-4, "endpoint_fraction": 0.5},
    "twinflow (teacher)": {"method": "twinflow", "source": "teacher", "target_ema": 0.99, "learning_rate": 2e-4, "endpoint_fraction": 0.5},
    "uni-instruct": {"method": "sid", "uni_instruct": True, "divergence": "forward-kl", "gan_weight": 0.3, "num_steps": 1},
    "diff-instruct": {"method": "dmd2", "diff_instruct": True, "num_steps": 1},
}  # (reflow is left out: most of its cost is generating its teacher couplings once, which a per-update budget misses)
CALIBRATION_UPDATES = 12
QUICK_MINUTES = 1.0  # x 19 methods, plus calibration and scoring (about 40 s per method): about 35 minutes on 2 cores


def _folder(name: str) -> str:
    """``"meanflow (jvp)"`` -> ``meanflow-jvp``, ``"twinflow (teacher)"`` -> ``twinflow-teacher``, ``"consistency (PCM, 4
    phases)"`` -> ``consistency``."""
    return name.split()[0] + "".join(f"-{tag}" for tag in ("jvp", "teacher") if f"({tag})" in name)


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write(path: str, data: dict) -> None:
    from onestep_pipelines.pipelines.loading import write_atomically

    write_atomically(path, json.dumps(data, indent=2) + "\n")


def plan(out: str, minutes: float, device: str, teacher: str, threads: int = 0) -> dict:
    """``{name: {"updates", "seconds_per_update"}}``: each method's update count for ``minutes`` of training, from its
    measured seconds per update (kept in ``plan.json`` so a resumed leaderboard trains the same students)."""
    from onestep_pipelines.training.config import DistillConfig
    from onestep_pipelines.training.trainer import distill

    path = os.path.join(out, "plan.json")
    saved = _read(path)
    if saved and saved.get("minutes") != minutes:
        raise ValueError(f"{out} holds a leaderboard planned for {saved['minutes']} minutes per method; use --out for another budget.")
    methods = saved.get("methods", {})
    for name, recipe in RECIPES.items():
        if name in methods:
            continue
        scratch = os.path.join(out, "calibration", _folder(name))
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(os.path.dirname(scratch), exist_ok=True)
        config = DistillConfig(teacher=teacher, output_dir=scratch, max_train_steps=CALIBRATION_UPDATES, preview_every=0,
                               evaluate=False, log_with="none", device=device, cpu_threads=threads, **recipe)
        summary = distill(config, export=False)
        per_update = summary["seconds_per_step"]
        methods[name] = {"updates": max(50, int(minutes * 60 / per_update)), "seconds_per_update": per_update}
        _write(path, {"minutes": minutes, "methods": methods})
        print(f"{name}: {per_update:.3f} s per update -> {methods[name]['updates']} updates", flush=True)
    shutil.rmtree(os.path.join(out, "calibration"), ignore_errors=True)
    return methods


def train_and_score(name: str, updates: int, out: str, device: str, teacher: str, threads: int = 0) -> dict:
    """Train (or continue) one method's student and score it at every NFE of the table."""
    from onestep_pipelines.training import checkpoint
    from onestep_pipelines.training.config import DistillConfig
    from onestep_pipelines.training.evaluate import evaluate_student
    from onestep_pipelines.training.trainer import distill

    run = os.path.join(out, "runs", _folder(name))
    started = list(checkpoint.list_checkpoints(os.path.join(run, "checkpoints")))
    if os.path.isdir(run) and not started:  # stopped before its first checkpoint: nothing to keep
        shutil.rmtree(run)
    os.makedirs(os.path.dirname(run), exist_ok=True)
    config = DistillConfig(teacher=teacher, output_dir=run, max_train_steps=updates, checkpoint_every=max(25, updates // 5), preview_every=0,
                           evaluate=False, log_with="none", device=device, cpu_threads=threads, resume="latest" if started else "", **RECIPES[name])
    summary = distill(config)
    rows = evaluate_student(summary["student_dir"], list(NFE), device)
    return {"recipe": RECIPES[name], "updates": updates, "train_seconds": summary["seconds"],
            "seconds_per_update": summary["seconds_per_step"], "scores": _scores(rows)}


def _scores(rows: list[dict]) -> dict:
    return {str(r["NFE"]): {"fd": r["FD-digits"], "fd_pixels": r["FD-pixels"], "acc": r["accuracy"]} for r in rows}


def teacher_scores(device: str, teacher: str) -> dict:
    from onestep_pipelines.benchmark.digits import DigitsMetric
    from onestep_pipelines.benchmark.evaluate import load_digits_teacher, score_digits
    from onestep_pipelines.training.evaluate import pick_device

    where = pick_device(device)
    rows, _ = score_digits(load_digits_teacher(None if teacher == "digits" else teacher).to(where), list(NFE) + [32], DigitsMetric(device=where), name="teacher", euler_grid=True)
    return _scores(rows)


def table(results: dict, plan: dict) -> str:
    """The markdown table (cells: FD-digits / FD-pixels); ``s / update`` is the calibrated cost the update counts come
    from (``plan``)."""
    teacher = results["teacher"]
    cell = lambda s: f"{s['fd']:.2f} / {s['fd_pixels']:.3f}" if "fd_pixels" in s else f"{s['fd']:.2f}"  # noqa: E731
    head = ["method", "updates", "s / update"] + [f"{n} step{'s' * (n > 1)}" for n in NFE] + ["accuracy (trained steps)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines.append("| teacher (Euler) | | | " + " | ".join(cell(teacher[str(n)]) for n in NFE) + f" | (32 steps: {cell(teacher['32'])}) |")
    for name, entry in results["methods"].items():
        trained = str(entry["recipe"].get("num_steps", 1))
        cells = [cell(entry["scores"][str(n)]) for n in NFE]
        lines.append(f"| {name} | {entry['updates']} | {plan[name]['seconds_per_update']:.3f} | " + " | ".join(cells) +
                     f" | {entry['scores'][trained]['acc']:.3f} ({trained}) |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("fd", "FD-digits")] + ([("fd_pixels", "FD-pixels")] if all("fd_pixels" in e["scores"]["1"] for e in results["methods"].values()) else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics) + 4, 4.5), squeeze=False)
    colours = plt.cm.tab20.colors
    for ax, (key, label) in zip(axes[0], metrics):
        ax.plot(NFE, [results["teacher"][str(n)][key] for n in NFE], "o--", color="black", label="teacher (Euler)")
        for i, (name, entry) in enumerate(results["methods"].items()):
            ax.plot(NFE, [entry["scores"][str(n)][key] for n in NFE], "s-" if i < 10 else "^-", color=colours[(2 * i) % 20 + (i >= 10)], label=name)
        ax.axhline(results["teacher"]["32"][key], color="black", ls=":", label="teacher, 32 steps")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(NFE, [str(n) for n in NFE])
        ax.set_xlabel("NFE (student steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['minutes']:g} min of training per method")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall time per method")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_MINUTES:g} minute per method (about 35 minutes in all on 2 CPU cores)")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results/leaderboard[-quick])")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu"))
    parser.add_argument("--teacher", default="digits", help="the shipped digits teacher, or another digits teacher folder")
    parser.add_argument("--cpu-threads", type=int, default=0, help="CPU threads of every run (0: the trainer's auto); fix it when other work shares the machine")
    args = parser.parse_args(argv)
    minutes = QUICK_MINUTES if args.quick else args.minutes
    if minutes <= 0:
        parser.error("--minutes must be positive")
    out = args.out or RESULTS + ("-quick" if args.quick else "")
    os.makedirs(out, exist_ok=True)
    started = time.time()
    try:
        steps = plan(out, minutes, args.device, args.teacher, args.cpu_threads)
        path = os.path.join(out, "leaderboard.json")
        results = _read(path) or {"minutes": minutes, "methods": {}}
        if "teacher" not in results:
            results["teacher"] = teacher_scores(args.device, args.teacher)
            _write(path, results)
        for name in RECIPES:
            if name not in results["methods"]:
                results["methods"][name] = train_and_score(name, steps[name]["updates"], out, args.device, args.teacher, args.cpu_threads)
                _write(path, results)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = table(results, steps)
    with open(os.path.join(out, "leaderboard.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    drawn = plot(results, os.path.join(out, "leaderboard.png"))
    print(text)
    print(f"wrote {out}/leaderboard.json, leaderboard.md{', leaderboard.png' if drawn else ' (no plot: matplotlib missing)'} "
          f"in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
