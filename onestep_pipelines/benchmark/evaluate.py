"""Sampling and scoring helpers shared by benchmarks/quality.py and the trainer's reports."""

from __future__ import annotations

import os

import numpy as np
import torch

from .digits import TEACHER_DIR, eval_labels

EVAL_SEED = 1234
NUM_EVAL_SAMPLES = 898  # the size of the real reference half, so FD is compared at equal sample counts


def load_digits_teacher(path: str | None = None):
    """The shipped digits teacher as a :class:`DigitsPipeline` (offline, one call)."""
    return load_digits_pipeline(path or TEACHER_DIR)


def load_digits_pipeline(path: str):
    """Load a digits pipeline folder (teacher or student) with a clear error for anything else."""
    from ..pipelines.pipeline_digits import DigitsPipeline

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"{path!r} is not a pipeline folder (no model_index.json).")
    try:
        pipe = DigitsPipeline.from_pretrained(path)
    except (ValueError, RuntimeError) as err:
        if "shape" in str(err) or "size" in str(err):
            raise ValueError(f"the weights in {path!r} do not match the model config: {err}") from err
        raise
    pipe.set_progress_bar_config(disable=True)
    return pipe


def euler_sigmas(num_steps: int) -> list[float]:
    """Trailing Euler grid 1, (n-1)/n, ..., 1/n (then 0): the fair few-step grid for the teacher."""
    return np.linspace(1.0, 1.0 / num_steps, num_steps).tolist()


@torch.no_grad()
def sample_digits(
    pipe,
    num_steps: int,
    num_samples: int = NUM_EVAL_SAMPLES,
    seed: int = EVAL_SEED,
    batch_size: int = 1024,
    euler_grid: bool = False,
    **call_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` balanced class-conditional samples (``(N, 1, 8, 8)`` in [-1, 1]) and their labels.

    The noise comes from one generator seeded with ``seed``, so results repeat exactly.
    """
    labels = eval_labels(num_samples)
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for part in labels.split(batch_size):
        kwargs = dict(call_kwargs, class_labels=part.tolist(), generator=generator, output_type="latent")
        if euler_grid:
            kwargs["sigmas"] = euler_sigmas(num_steps)
        else:
            kwargs["num_inference_steps"] = num_steps
        chunks.append(pipe(**kwargs).images.float().clamp(-1, 1))
    return torch.cat(chunks), labels


@torch.no_grad()
def trajectory_straightness(pipe, num_steps: int = 32, num_samples: int = NUM_EVAL_SAMPLES, seed: int = EVAL_SEED, batch_size: int = 512, **call_kwargs) -> float:
    """Straightness of a digits flow pipeline's ODE (Liu et al. 2022, "Flow Straight and Fast", eq. 9):
    ``S = int_0^1 E || (x_1 - x_0) - v(x_t, t) ||^2 dt``, per pixel, on its ``num_steps``-step Euler trajectories from
    noise ``x_1`` to sample ``x_0`` (each step's velocity is its displacement over its time step). 0 is a straight
    path, which one Euler step integrates exactly."""
    sigmas = euler_sigmas(num_steps) + [0.0]
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for part in eval_labels(num_samples).split(batch_size):
        states = []
        noise = torch.randn((len(part), 1, 8, 8), generator=generator)
        record = lambda p, i, t, tensors: states.append(tensors["latents"].float().cpu())  # noqa: E731
        pipe(class_labels=part.tolist(), latents=noise, sigmas=sigmas[:-1], output_type="latent", callback_on_step_end=record, **call_kwargs)
        path = torch.stack([noise.float(), *states])  # (steps + 1, B, 1, 8, 8)
        straight = path[0] - path[-1]  # x_1 - x_0 over the whole unit of time
        for i in range(num_steps):
            dt = sigmas[i] - sigmas[i + 1]
            velocity = (path[i] - path[i + 1]) / dt
            total += dt * ((velocity - straight) ** 2).mean(dim=(1, 2, 3)).sum().item()
    return total / num_samples


def check_draws(draws) -> int:
    """``draws`` (the number of evaluation noise draws), checked: a positive integer."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}.")
    return draws


def mean_over_draws(scores: list[dict]) -> dict:
    """One row from the same columns scored on several noise draws: each column's mean, and for more than one draw
    the FDs' standard deviation over the draws (``FD-digits sd``, ``FD-pixels sd``) and ``draws``."""
    row = {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
    if len(scores) > 1:
        row |= {f"{key} sd": float(np.std([s[key] for s in scores], ddof=1)) for key in ("FD-digits", "FD-pixels")} | {"draws": len(scores)}
    return row


def score_digits(pipe, steps: list[int], metric, name: str = "student", euler_grid: bool = False, grid_steps: int | None = None,
                 draws: int = 1, **call_kwargs):
    """FD-digits and accuracy of ``pipe`` at each step count: ``(rows, grid)`` with rows ``{"model", "NFE",
    "FD-digits", "FD-pixels", "precision", "recall", "accuracy", "copies", "nearer-A"}`` (:meth:`DigitsMetric.row`,
    :meth:`DigitsMetric.memorisation`) and the first 100
    samples at ``grid_steps`` (default: the first).

    ``draws`` > 1 scores that many independent noise draws (seeds ``EVAL_SEED``, ``EVAL_SEED + 1``, ...) of the same
    898 labels: each column is their mean (:func:`mean_over_draws`, with the FDs' sd over the draws). One draw of 898
    samples moves FD-digits by about 0.5 on the digits teacher (its sd over 10 draws), more than many gaps between models,
    so a claim that one model beats another needs several draws."""
    rows, grid = [], None
    for nfe in steps:
        scores = []
        for k in range(check_draws(draws)):
            images, labels = sample_digits(pipe, nfe, euler_grid=euler_grid, seed=EVAL_SEED + k, **call_kwargs)
            scores.append({**metric.row(metric.score(images, labels)), **metric.memorisation(images)})
            if k == 0 and nfe == (grid_steps or steps[0]):
                grid = images[:100]
        rows.append({"model": name, "NFE": nfe, **mean_over_draws(scores)})
    return rows, grid


def save_grid(images: torch.Tensor, path: str, nrow: int = 10, scale: int = 4) -> None:
    """Save ``(N, C, H, W)`` images in [-1, 1] (C = 1 or 3) as one PNG grid (nearest-neighbour upscaled)."""
    from PIL import Image

    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 64, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = img
    array = grid.numpy()[..., 0] if c == 1 else grid.numpy()
    picture = Image.fromarray(array, mode="L" if c == 1 else "RGB").resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)
