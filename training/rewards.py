"""Reward plug-ins of reward post-training: ``reward(images, conditions) -> scores``.

One interface for every reward. ``images`` are the student's samples decoded to pixels, ``(B, C, H, W)`` float in
``[-1, 1]`` (the digits' own 8x8 pixels; a text-to-image student's latents through its VAE); ``conditions`` is a dict
with ``"class_labels"`` (a ``(B,)`` long tensor, digits) or ``"prompts"`` (a list of ``B`` strings, text-to-image).
The reward returns one float score per image, shape ``(B,)``, higher is better. A reward that returns scores with a
gradient in ``images`` is followed along that gradient; one without (a non-differentiable scorer, a call into another
process, or ``differentiable = False`` on the callable) through a policy-gradient surrogate (see :mod:`.methods.reward`).

``--reward`` names one:

- ``digits``: the log-probability of the requested class under the shipped reward classifier
  (:class:`~onestep_pipelines.benchmark.digits.DigitsRewardClassifier`, not the FD-digits classifier);
- ``clip:FOLDER``: CLIP score, the cosine similarity of image and prompt embeddings of a transformers CLIP model
  folder (``CLIPModel`` + its tokenizer), times 100 as in Hessel et al. 2021 (no clipping at 0);
- ``MODULE:NAME``: any importable callable with the signature above (or a class / factory called with no arguments
  that returns one); aesthetic or PickScore-style scorers plug in this way.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .config import check_reward_spec

class DigitsClassReward:
    """``log p(class | image)`` under the shipped reward classifier (differentiable)."""

    differentiable = True

    def __init__(self, device="cpu"):
        from onestep_pipelines.benchmark.digits import REWARD_CLASSIFIER_DIR, DigitsRewardClassifier

        self.model = DigitsRewardClassifier.from_pretrained(REWARD_CLASSIFIER_DIR).to(device).eval().requires_grad_(False)

    def __call__(self, images: torch.Tensor, conditions: dict) -> torch.Tensor:
        if "class_labels" not in conditions:
            raise ValueError("the digits reward needs class labels: it scores class-conditional digits.")
        logits = self.model(images.float())
        return logits.log_softmax(dim=1).gather(1, conditions["class_labels"].view(-1, 1)).squeeze(1)


class ClipScore:
    """CLIP score ``100 cos(E_img(image), E_txt(prompt))`` of a local transformers CLIP folder (differentiable:
    images are resized and normalised in torch)."""

    differentiable = True

    def __init__(self, folder: str, device="cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        try:
            self.model = CLIPModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ValueError(f"--reward clip:{folder} could not be loaded as a CLIP model and tokenizer: {error}") from None
        vision = self.model.config.vision_config
        self.size = vision.image_size
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)  # CLIP's preprocessing
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, conditions: dict) -> torch.Tensor:
        if "prompts" not in conditions:
            raise ValueError("the CLIP reward needs prompts: it scores text-to-image samples.")
        pixels = (images.float() + 1) / 2
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bicubic", align_corners=False)
        pixels = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        tokens = self.tokenizer(conditions["prompts"], padding="max_length", truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings).to(pixels.device)
        image_embeds = _embedding(self.model.get_image_features(pixel_values=pixels))
        text_embeds = _embedding(self.model.get_text_features(**tokens))
        return 100 * F.cosine_similarity(image_embeds, text_embeds, dim=-1)


def _embedding(output) -> torch.Tensor:
    """The projected embedding (transformers 5 returns a model output with ``pooler_output``; 4 returned the tensor)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_reward(spec: str, device="cpu"):
    """The reward callable ``--reward`` names (see the module docstring)."""
    check_reward_spec(spec)
    if spec == "digits":
        return DigitsClassReward(device)
    kind, _, rest = spec.partition(":")
    if kind == "clip":
        return ClipScore(rest, device)
    try:
        found = getattr(importlib.import_module(kind), rest)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--reward {spec}: cannot import {rest} from {kind} ({error}).") from None
    if isinstance(found, type) or getattr(found, "reward_factory", False):
        found = found()
    if not callable(found):
        raise ValueError(f"--reward {spec}: {rest} is not callable; a reward is called as reward(images, conditions) -> scores.")
    return found


def checked_scores(scores, images: torch.Tensor, name: str) -> torch.Tensor:
    """The reward's scores as a float ``(B,)`` tensor on the images' device, or an error naming what is wrong with
    their type or shape."""
    batch = len(images)
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"--reward {name} returned {type(scores).__name__}; it must return a tensor of {batch} scores, shape ({batch},).")
    if tuple(scores.shape) != (batch,):
        raise ValueError(f"--reward {name} returned scores of shape {tuple(scores.shape)}; it must return one score per image, shape ({batch},).")
    return scores.to(images.device).float()  # (NaN / inf: the run's NaN guard stops it, naming the reward, without a sync)
