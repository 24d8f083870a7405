"""What a training batch is made of: the embedded digits, a prompt list, or captioned images.

A batch is ``{"images": (B, C, H, W) on the training device (when the method needs data), "conditions": {...}}``.
Conditions are small index tensors (``class_labels`` for the digits teacher, ``prompt_index`` into prompt embeddings
computed once for text-to-image teachers), so batches stay cheap and checkpoints small. Indices come from the
micro-batch's :class:`~onestep_pipelines.training.draws.Draws`, so a batch does not depend on the number of processes.
"""

from __future__ import annotations

import os

import torch

from onestep_pipelines.benchmark.digits import real_halves

from .config import captioned_images
from .families import to_latents


class DigitsData:
    """Real digits and their labels, kept on the training device; data-free methods use the labels only.

    Only half A of the digits (899): half B is FD-digits' reference, which no student may see (a discriminator or a
    data-trained student would otherwise be scored on its own training images)."""

    def __init__(self, device):
        (images, labels), _ = real_halves()
        self.images, self.labels = images.to(device), labels.to(device)

    def batch(self, rng) -> dict:
        idx = rng.integers(len(self.images))
        return {"images": self.images[idx], "conditions": {"class_labels": self.labels[idx]}}


class PromptData:
    """Data-free batches: prompts drawn from a list (no images): ``--prompts`` (read and encoded at the start, held in
    memory) or ``--cache`` (embeddings written by ``onestep-train cache``, read from disk as batches draw them)."""

    def __init__(self, teacher, source: str = "", column: str = "", cache: str = ""):
        if cache:
            from .cache import PromptCache

            teacher.use_cache(PromptCache(cache))
        else:
            from .cache import iter_prompts

            teacher.set_prompts(list(iter_prompts(source, column)))
        self.teacher = teacher

    def batch(self, rng) -> dict:
        return {"conditions": self.teacher.sample_conditions(rng)}


class ImageFolderData:
    """Images with captions (``name.png`` + ``name.txt``), encoded once by the teacher's VAE and kept in host memory
    (pinned on CUDA, so a batch moves to the device without stopping the host)."""

    def __init__(self, teacher, folder: str, device):
        from PIL import Image

        names = captioned_images(folder)
        captions = []
        for name in names:
            with open(os.path.join(folder, os.path.splitext(name)[0] + ".txt"), encoding="utf-8") as f:
                captions.append(f.read().strip() or " ")
        teacher.set_prompts(captions)
        pipe, size = teacher.pipeline, teacher.resolution
        latents = []
        with torch.no_grad():
            for name in names:
                image = Image.open(os.path.join(folder, name)).convert("RGB").resize((size, size))
                pixels = pipe.image_processor.preprocess(image).to(pipe.vae.device, pipe.vae.dtype)
                latents.append(to_latents(pipe, teacher.architecture, pixels))
        self.device = torch.device(device)
        self.images = torch.cat(latents).float().cpu()
        if self.device.type == "cuda":
            self.images = self.images.pin_memory()

    def batch(self, rng) -> dict:
        idx = rng.host_integers(len(self.images))
        images = self.images[idx]
        if self.device.type == "cuda":
            images = images.pin_memory()
        return {"images": images.to(self.device, non_blocking=True), "conditions": {"prompt_index": idx.to(self.device, non_blocking=True)}}


def make_data(teacher, config, device):
    """The batches of a run (options were checked by :meth:`DistillConfig.check_paths`)."""
    if teacher.architecture == "digits":
        return DigitsData(device)
    if config.data:
        return ImageFolderData(teacher, config.data, device)
    return PromptData(teacher, config.prompts, config.prompt_column, config.cache)
