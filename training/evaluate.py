"""``onestep-train evaluate STUDENT_DIR``: a student on its embedded benchmark (FD-digits and accuracy): a digits
student, or a student of a shipped text-to-image digits teacher (prompt accuracy)."""

from __future__ import annotations

import json
import os

import torch

from onestep_pipelines.benchmark.digits import DigitsMetric
from onestep_pipelines.benchmark.evaluate import load_digits_pipeline, load_digits_teacher, score_digits
from onestep_pipelines.benchmark.text_digits import TextDigitsMetric, score_text_digits
from onestep_pipelines.hub import DIFFUSERS_WEIGHT_NAME
from onestep_pipelines.pipelines.loading import write_atomically

from .config import is_digits_pipeline


def pick_device(choice: str = "auto") -> torch.device:
    """``auto``: CUDA, else MPS, else the CPU."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _lora_metadata(folder: str):
    from onestep_pipelines.metadata import read_student_metadata

    metadata, _ = read_student_metadata(os.path.join(folder, DIFFUSERS_WEIGHT_NAME), "student")
    if metadata is None:
        raise ValueError(f"{folder}: the LoRA records no sampling metadata; evaluate a student written by onestep-train.")
    return metadata


def load_student(folder: str):
    """``(pipeline, benchmark)``: a student pipeline folder, or a LoRA student folder applied (fused) to its base
    model, the digits teacher or a shipped text-to-image digits teacher; ``benchmark`` is ``"digits"`` or
    ``"text-digits"``."""
    from diffusers import DiffusionPipeline

    from onestep_pipelines.benchmark import TEXT_TEACHERS, teacher_folder
    from onestep_pipelines.pipelines import student_pipeline
    from onestep_pipelines.students import load_student_lora

    if os.path.isfile(os.path.join(folder, "model_index.json")):
        if is_digits_pipeline(folder, folder):
            return load_digits_pipeline(folder), "digits"
        pipe = DiffusionPipeline.from_pretrained(folder)
        metadata = getattr(pipe, "student", None)
        if metadata is None or metadata.base_model not in TEXT_TEACHERS:
            raise ValueError(f"{folder} is not a student of a shipped teacher ('digits', {', '.join(TEXT_TEACHERS)}): there is no benchmark to score it on.")
        return pipe, "text-digits"
    if not os.path.isfile(os.path.join(folder, DIFFUSERS_WEIGHT_NAME)):
        raise ValueError(f"{folder} is neither a pipeline folder (model_index.json) nor a LoRA student folder ({DIFFUSERS_WEIGHT_NAME}).")
    metadata = _lora_metadata(folder)
    if metadata.architecture == "digits":
        pipe, benchmark = load_digits_teacher(), "digits"
    elif metadata.base_model in TEXT_TEACHERS:
        teacher = DiffusionPipeline.from_pretrained(teacher_folder(metadata.base_model))
        pipe, benchmark = student_pipeline(teacher), "text-digits"
    else:
        raise ValueError(f"{folder}: a LoRA of {metadata.base_model!r}, not of a shipped teacher ('digits', {', '.join(TEXT_TEACHERS)}): "
                         "there is no benchmark to score it on.")
    load_student_lora(pipe, folder, fuse=True)
    return pipe, benchmark


def evaluate_student(folder: str, steps: list[int] | None = None, device: str = "auto", json_path: str | None = None,
                     name: str | None = None, draws: int = 1) -> list[dict]:
    """Rows ``{"model", "NFE", "FD-digits", "FD-pixels", "precision", "recall", "accuracy", "copies", "nearer-A"}`` at
    ``steps`` (default: the student's recommended steps); ``name`` (the rows' model, default: the folder's name).
    Text-to-image students are sampled at their own guidance default (the metadata's) for the balanced evaluation
    prompts. ``draws`` > 1: each row the mean of that many noise draws, with the FDs' sd
    (:func:`~onestep_pipelines.benchmark.evaluate.score_digits`)."""
    pipe, benchmark = load_student(folder)
    if getattr(pipe, "student", None) is None and steps is None:
        raise ValueError(f"{folder} records no student metadata (a teacher?): pass --steps, e.g. --steps 4,8,16.")
    steps = steps or sorted(set(pipe.student.recommended_steps) | {pipe.student.num_inference_steps})
    where = pick_device(device)
    pipe.to(where)
    pipe.set_progress_bar_config(disable=True)
    name = (name or os.path.basename(os.path.normpath(folder)))[:22]
    if benchmark == "digits":
        rows, _ = score_digits(pipe, steps, DigitsMetric(device=where), name=name, draws=draws)
    else:
        rows, _ = score_text_digits(pipe, steps, TextDigitsMetric(device=where), name=name, draws=draws)
    if json_path:
        write_atomically(json_path, json.dumps({"student": folder, "rows": rows}, indent=2) + "\n")
    return rows
