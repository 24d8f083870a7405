"""``onestep-train``: the distillation command.

``onestep-train distill`` with no options distils the embedded digits teacher into a 1-step student with DMD2
(about 6 minutes on 2 CPU cores) and prints teacher-vs-student FD-digits; every option of
:class:`~onestep_pipelines.training.trainer.DistillConfig` is a flag (``--help``). Under
``accelerate launch -m onestep_pipelines.training.cli distill ...`` it runs on several GPUs (DDP, or FSDP /
DeepSpeed from accelerate's config); several CPU processes start with
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m onestep_pipelines.training.cli distill ...`` (gloo).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .methods import TrainingDiverged
from .trainer import DistillConfig, distill


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onestep-train", description="Distil a diffusion teacher into a 1-4 step student.")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser(
        "distill",
        help="distil a teacher into a few-step student",
        description="Distil a teacher into a 1-4 step student. Defaults: the embedded digits teacher, DMD2, 1 step.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            sub.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            sub.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    return parser


def _table(rows: list[dict]) -> str:
    lines = [f"{'model':<22} {'NFE':>4} {'FD-digits':>10} {'accuracy':>9}"]
    lines += [f"{r['model']:<22} {r['NFE']:>4} {r['FD-digits']:>10.2f} {r['accuracy']:>9.3f}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    args.pop("command")
    try:
        config = DistillConfig(**args)
        result = distill(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"onestep-train: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"onestep-train: training diverged at {error}", file=sys.stderr)
        return 3
    if "student_dir" not in result:  # not the main process of a distributed run
        return 0
    if "scores" in result:
        print(_table(result["scores"]))
    print(f"student: {result['student_dir']}  ({result['steps']} updates in {result['seconds']:.0f} s)")
    if "lora_dir" in result:
        print(f"LoRA: {result['lora_dir']}")
    return 0


def _exit(code: int) -> None:
    """Exit; a worker of a distributed run (torchrun) skips interpreter teardown once its work is saved and flushed:
    gloo's threads can abort the process there ("terminate called without an active exception", about one CPU run
    in two with torch 2.13), which torchrun reports as a failed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
