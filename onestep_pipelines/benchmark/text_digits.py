"""Text-to-image digits: the embedded digits benchmark seen through a text-to-image pipeline.

The same real digits and the same halves as :mod:`.digits` (A to train on, B the reference), each digit with a
caption ("a handwritten digit seven", a few phrasings per digit, chosen by the image's index so the data are fixed)
and upscaled to an RGB image (grey in all three channels). The upscaling is nearest-neighbour: every digit pixel
becomes a ``factor x factor`` block, so :func:`to_digits` (the channel mean, then the mean of each block) gives the
8x8 digit back exactly, and the benchmark's real-vs-real floor is the digits benchmark's (a smooth upscaling would
not survive the way back: bilinear up and block mean down measure FD 55 against the original digits).

A text-to-image student is scored by :class:`TextDigitsMetric`: its decoded images go back to 8x8 grey digits, FD-digits
against half B, and **prompt accuracy**, the share of images whose digit (by the shipped classifier) is the one the
prompt names.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from .digits import DIGIT_NAMES, DigitsMetric, Score, real_halves
from .evaluate import EVAL_SEED, NUM_EVAL_SAMPLES, check_draws, mean_over_draws

CAPTIONS = (
    "a handwritten digit {name}",
    "the number {digit}, handwritten",
    "a scan of a handwritten {name}",
    "digit {digit}",
)
DIGIT_SIZE = 8
DEFAULT_SIZE = 32
# Each shipped teacher's best setting on this benchmark, (steps, guidance scale) with its own scheduler, measured by
# benchmarks/text_quality.py over 8 / 16 / 32 steps x guidance 1 / 1.5 / 2 / 3 / 5 / 7.5 (README, docs/benchmarks.md).
TEACHER_SETTINGS = {"text-digits-sd": (16, 2.0), "text-digits-sd3": (32, 1.5)}


def caption(label: int, index: int) -> str:
    """The caption of digit ``label`` at position ``index`` of its half (the phrasings in turn)."""
    return CAPTIONS[index % len(CAPTIONS)].format(name=DIGIT_NAMES[int(label)], digit=int(label))


def upscale(digits: torch.Tensor, size: int = DEFAULT_SIZE) -> torch.Tensor:
    """8x8 grey digits ``(N, 1, 8, 8)`` in ``[-1, 1]`` as RGB images ``(N, 3, size, size)``, each pixel a block."""
    if size % DIGIT_SIZE:
        raise ValueError(f"size must be a multiple of {DIGIT_SIZE}, got {size}.")
    return F.interpolate(digits, scale_factor=size // DIGIT_SIZE, mode="nearest").expand(-1, 3, -1, -1).contiguous()


def to_digits(images: torch.Tensor) -> torch.Tensor:
    """Images ``(N, C, H, W)`` in ``[-1, 1]`` (RGB or grey, H and W multiples of 8) as 8x8 grey digits: the channel
    mean, then the mean of each block. The inverse of :func:`upscale`."""
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[2] % DIGIT_SIZE or images.shape[3] % DIGIT_SIZE:
        raise ValueError(f"images must have shape (N, C, H, W) with H and W multiples of {DIGIT_SIZE}, got {tuple(images.shape)}.")
    return F.adaptive_avg_pool2d(images.float().mean(dim=1, keepdim=True), DIGIT_SIZE).clamp(-1.0, 1.0)


def text_halves(size: int = DEFAULT_SIZE) -> tuple[tuple[torch.Tensor, torch.Tensor, list[str]], tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Halves A and B of the digits as ``(RGB images (N, 3, size, size) in [-1, 1], labels, captions)``."""
    return tuple((upscale(images, size), labels, [caption(y, i) for i, y in enumerate(labels.tolist())]) for images, labels in real_halves())


_NAMED = re.compile(r"\b(" + "|".join(DIGIT_NAMES) + r"|[0-9])\b")


def prompt_digit(prompt: str) -> int:
    """The digit a prompt names ("a handwritten digit seven", "digit 7"); a clear error when it names none or two."""
    found = {DIGIT_NAMES.index(m) if m in DIGIT_NAMES else int(m) for m in _NAMED.findall(prompt.lower())}
    if len(found) != 1:
        raise ValueError(f"prompt {prompt!r} names {'no digit' if not found else 'the digits ' + str(sorted(found))}; "
                         "the text-to-image digits benchmark needs exactly one (a name such as 'seven' or a numeral).")
    return found.pop()


class TextDigitsMetric(DigitsMetric):
    """FD-digits and prompt accuracy of text-to-image samples (decoded images in ``[-1, 1]``) against half B."""

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> Score:
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts.")
        digits = to_digits(images)
        return self.score(digits, torch.tensor([prompt_digit(p) for p in prompts]))


def eval_prompts(num_samples: int) -> list[str]:
    """Balanced evaluation prompts: digits 0, 1, ..., 9, 0, ... in the caption phrasings in turn."""
    return [caption(i % 10, i // 10) for i in range(num_samples)]


@torch.no_grad()
def sample_text_digits(pipe, num_steps: int, num_samples: int = NUM_EVAL_SAMPLES, seed: int = EVAL_SEED, batch_size: int = 128,
                       size: int = DEFAULT_SIZE, **call_kwargs) -> tuple[torch.Tensor, list[str]]:
    """``num_samples`` images of a text-to-image pipeline (teacher or student) for the balanced
    :func:`eval_prompts`, as ``(images (N, 3, size, size) in [-1, 1] on the CPU, prompts)``. The noise comes from one
    generator seeded with ``seed``, so results repeat exactly; ``call_kwargs`` go to the pipeline (``guidance_scale``...)."""
    prompts = eval_prompts(num_samples)
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, num_samples, batch_size):
        out = pipe(prompt=prompts[start:start + batch_size], num_inference_steps=num_steps, height=size, width=size,
                   generator=generator, output_type="pt", **call_kwargs).images
        chunks.append(out.float().cpu() * 2.0 - 1.0)  # the image processor's [0, 1] back to [-1, 1]
    return torch.cat(chunks).clamp(-1, 1), prompts


def score_text_digits(pipe, steps: list[int], metric: TextDigitsMetric, name: str = "student", grid_steps: int | None = None,
                      num_samples: int = NUM_EVAL_SAMPLES, draws: int = 1, **call_kwargs) -> tuple[list[dict], torch.Tensor | None]:
    """FD-digits and prompt accuracy of a text-to-image pipeline at each step count: ``(rows, grid)`` with rows
    ``{"model", "NFE", "FD-digits", "FD-pixels", ..., "copies", "nearer-A"}`` (as :func:`.evaluate.score_digits`; ``NFE`` counts
    denoiser calls per image, twice the steps under classifier-free guidance) and the first 100 images at
    ``grid_steps`` (default: the first) as 8x8 digits; ``draws``: as :func:`.evaluate.score_digits`."""
    rows, grid = [], None
    guided = call_kwargs.get("guidance_scale", 1.0) > 1.0 and not getattr(getattr(pipe, "student", None), "guidance_baked", False)
    for steps_ in steps:
        scores = []
        for k in range(check_draws(draws)):
            images, prompts = sample_text_digits(pipe, steps_, num_samples=num_samples, seed=EVAL_SEED + k, **call_kwargs)
            digits = to_digits(images)
            scores.append({**metric.row(metric.score_images(images, prompts)), **metric.memorisation(digits)})
            if k == 0 and steps_ == (grid_steps or steps[0]):
                grid = digits[:100]
        rows.append({"model": name, "steps": steps_, "NFE": steps_ * (2 if guided else 1), **mean_over_draws(scores)})
    return rows, grid


def write_captioned_folder(folder: str, half: str = "A", size: int = DEFAULT_SIZE) -> int:
    """Write one half as PNG images with a ``.txt`` caption each (the trainer's ``--data FOLDER`` format) and
    ``prompts.txt`` (its ``--prompts FILE``: the captions, one per line); returns the number of images. Files are
    written to a temporary name and renamed, so a stopped call leaves no half-written image."""
    from PIL import Image

    from ..pipelines.loading import atomic_path, write_atomically

    if half not in ("A", "B"):
        raise ValueError(f"half must be 'A' (training) or 'B' (the reference), got {half!r}.")
    images, _, captions = text_halves(size)[0 if half == "A" else 1]
    os.makedirs(folder, exist_ok=True)
    pixels = ((images.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    for i, (image, text) in enumerate(zip(pixels, captions)):
        with atomic_path(os.path.join(folder, f"{i:04d}.png")) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        write_atomically(os.path.join(folder, f"{i:04d}.txt"), text + "\n")
    write_atomically(os.path.join(folder, "prompts.txt"), "\n".join(captions) + "\n")
    return len(captions)


def main(argv=None) -> None:
    """``python -m onestep_pipelines.benchmark.text_digits FOLDER [--half A] [--size 32]``: write a captioned half."""
    import argparse

    parser = argparse.ArgumentParser(description="Write half A (training) or B (the reference) of the text-to-image digits as "
                                                 "PNG images with .txt captions and a prompts.txt (the trainer's --data and --prompts).",
                                     allow_abbrev=False)
    parser.add_argument("folder")
    parser.add_argument("--half", default="A", choices=("A", "B"))
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image size, a multiple of {DIGIT_SIZE} (default {DEFAULT_SIZE})")
    args = parser.parse_args(argv)
    try:
        count = write_captioned_folder(args.folder, args.half, args.size)
    except ValueError as error:
        parser.error(str(error))
    print(f"{count} captioned {args.size}x{args.size} digits of half {args.half} in {args.folder} (prompts: {os.path.join(args.folder, 'prompts.txt')})")


if __name__ == "__main__":
    main()
