"""What a training batch is made of: the embedded digits, a prompt list, or captioned images.

A batch is ``{"images": (B, C, H, W) on the training device (when the method needs data), "conditions": {...}}``.
Conditions are small index tensors (``class_labels`` for the digits teacher, ``prompt_index`` into prompt embeddings
computed once for text-to-image teachers), so batches stay cheap and checkpoints small. Indices come from the
micro-batch's :class:`~onestep_pipelines.training.draws.Draws`, so a batch does not depend on the number of processes.
"""

from __future__ import annotations

import torch

from onestep_pipelines.benchmark.digits import real_halves


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

    def __init__(self, teacher, source: str = "", column: str = "", cache=None):
        if cache is not None:  # an opened PromptCache
            teacher.use_cache(cache)
        else:
            from .cache import iter_prompts

            teacher.set_prompts(list(iter_prompts(source, column)))
        self.teacher = teacher

    def batch(self, rng) -> dict:
        return {"conditions": self.teacher.sample_conditions(rng)}


class ImageFolderData:
    """Images with captions (a folder of ``name.png`` + ``name.txt``, or a parquet / WebDataset / saved or Hub dataset:
    :func:`~onestep_pipelines.training.cache.iter_image_captions`), encoded once by the teacher's VAE and kept in host
    memory (pinned on CUDA, so a batch moves to the device without stopping the host); or the latents and caption
    embeddings of an image cache (``onestep-train cache --data``), read from disk as batches draw them."""

    def __init__(self, teacher, source: str, device, caption_column: str = "", image_column: str = "", cache=None):
        self.device = torch.device(device)
        if cache is not None:
            teacher.use_cache(cache)
            self.images, self.count = cache.images.to(self.device), len(cache.prompts)
            return
        from .cache import image_latents, iter_image_captions

        captions, latents = [], []
        with torch.no_grad():
            for image, caption in iter_image_captions(source, image_column, caption_column):
                captions.append(caption)
                latents.append(image_latents(teacher, image))
        if not captions:
            raise ValueError(f"--data {source} holds no image with a caption.")
        teacher.set_prompts(captions)
        self.images, self.count = torch.cat(latents).float().cpu(), len(captions)
        if self.device.type == "cuda":
            self.images = self.images.pin_memory()

    def batch(self, rng) -> dict:
        idx = rng.host_integers(self.count)
        images = self.images[idx]  # (a cache's rows come on the device)
        if self.device.type == "cuda" and not images.is_cuda:
            images = images.pin_memory()
        return {"images": images.to(self.device, non_blocking=True), "conditions": {"prompt_index": idx.to(self.device, non_blocking=True)}}


def make_data(teacher, config, device):
    """The batches of a run (options were checked by :meth:`DistillConfig.check_paths`)."""
    if teacher.architecture == "digits":
        return DigitsData(device)
    if config.data:
        return ImageFolderData(teacher, config.data, device, config.prompt_column, config.image_column)
    if config.cache:
        from .cache import PromptCache

        cache = PromptCache(config.cache)
        if cache.images is not None:  # an image cache: latents and caption embeddings
            return ImageFolderData(teacher, "", device, cache=cache)
        return PromptData(teacher, cache=cache)
    return PromptData(teacher, config.prompts, config.prompt_column)
