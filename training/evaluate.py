"""``onestep-train evaluate STUDENT_DIR``: a digits student on the embedded benchmark (FD-digits and accuracy)."""

from __future__ import annotations

import json
import os

import torch

from onestep_pipelines.benchmark.digits import DigitsMetric
from onestep_pipelines.benchmark.evaluate import load_digits_pipeline, load_digits_teacher, score_digits
from onestep_pipelines.hub import DIFFUSERS_WEIGHT_NAME
from onestep_pipelines.pipelines.loading import write_atomically


def pick_device(choice: str = "auto") -> torch.device:
    """``auto``: CUDA, else MPS, else the CPU."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_student(folder: str):
    """A digits student pipeline from a pipeline folder, or the digits teacher with a LoRA student folder applied."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return load_digits_pipeline(folder)
    if os.path.isfile(os.path.join(folder, DIFFUSERS_WEIGHT_NAME)):
        from onestep_pipelines.students import load_student_lora

        pipe = load_digits_teacher()
        if load_student_lora(pipe, folder, fuse=True) is None:
            raise ValueError(f"{folder}: the LoRA records no sampling metadata; evaluate a student written by onestep-train.")
        return pipe
    raise ValueError(f"{folder} is neither a pipeline folder (model_index.json) nor a LoRA student folder ({DIFFUSERS_WEIGHT_NAME}).")


def evaluate_student(folder: str, steps: list[int] | None = None, device: str = "auto", json_path: str | None = None,
                     name: str | None = None) -> list[dict]:
    """Rows ``{"model", "NFE", "FD-digits", "accuracy", "copies"}`` at ``steps`` (default: the student's recommended
    steps); ``name`` (the rows' model, default: the folder's name)."""
    pipe = load_student(folder)
    if getattr(pipe, "student", None) is None and steps is None:
        raise ValueError(f"{folder} records no student metadata (a teacher?): pass --steps, e.g. --steps 4,8,16.")
    steps = steps or sorted(set(pipe.student.recommended_steps) | {pipe.student.num_inference_steps})
    where = pick_device(device)
    pipe.to(where)
    rows, _ = score_digits(pipe, steps, DigitsMetric(device=where), name=(name or os.path.basename(os.path.normpath(folder)))[:22])
    if json_path:
        write_atomically(json_path, json.dumps({"student": folder, "rows": rows}, indent=2) + "\n")
    return rows
