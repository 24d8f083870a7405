"""Published few-step LoRAs of other projects, and how each must be sampled.

Files such as lightx2v's Qwen-Image-Lightning carry no sampling metadata: their model cards and example scripts say
which schedule, steps and guidance they need, and the wrong ones give poor images without an error (Qwen-Image's Hub
scheduler has a dynamic shift and ``shift_terminal`` 0.02, ComfyUI's Qwen-Image default is shift 1.15; Lightning was
distilled at a static shift 3). This table records each recipe as a :class:`~onestep_pipelines.StudentMetadata`;
:func:`~onestep_pipelines.load_student_lora` and the ComfyUI node pack apply it when a file's name matches, as if the
file carried our metadata, and say so.

The recipes, with their sources:

- **Qwen-Image-Lightning** (``lightx2v/Qwen-Image-Lightning``, also the Edit / Edit-2509 / 2511 / 2512 files): ModelTC's
  ``generate_with_diffusers.py`` sets ``base_shift = max_shift = ln 3`` (a constant ``mu``: static shift 3), no
  ``shift_terminal``; 4 or 8 steps as the file name says; ``true_cfg_scale`` 1.
- **FLUX.2-dev-Turbo** (``fal/FLUX.2-dev-Turbo``): 8 steps on fal's custom sigmas through FLUX.2-dev's own scheduler
  (which applies its dynamic shift to them, as diffusers 0.42 does with a call's ``sigmas``), guidance embedding 2.5.
- **Z-Image-Fun-Lora-Distill** (``alibaba-pai/Z-Image-Fun-Lora-Distill``, for base Z-Image): 8 steps (or as the file
  name says), no CFG, Z-Image's static shift 3, LoRA strength 0.8 (the card: 0.7-0.8).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..metadata import StudentMetadata
from ..schedulers import ConsistencyScheduler

_STATIC_SHIFT_3 = dict(time_type="flow", prediction_type="flow", gamma=0.0, shift=3.0, use_dynamic_shifting=False)
_FLUX2_DEV = dict(time_type="flow", prediction_type="flow", gamma=0.0, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
FLUX2_TURBO_SIGMAS = (1.0, 0.6509, 0.4374, 0.2932, 0.1893, 0.1108, 0.0495, 0.00031)  # fal/FLUX.2-dev-Turbo README


@dataclass(frozen=True)
class PublishedLora:
    """A published few-step LoRA: how to recognise its files and how to sample it.

    Args:
        name: short name, used as the student's ``method``.
        repo: the Hub repository that publishes it.
        pattern: regular expression matched against the file name (``search``, case-insensitive); a group ``steps``
            reads the step count from the name.
        architecture: the model family it fits (``StudentMetadata.architecture``).
        scheduler_config: :class:`ConsistencyScheduler` config of its schedule (gamma 0: the Euler update).
        steps: step count when the name gives none.
        guidance_scale: classifier-free guidance in the usual convention (1 = none).
        strength: the LoRA scale its authors recommend.
        sigmas: custom sigmas of its recipe, if any.
        guidance_embedding: distilled-guidance embedding value (FLUX.2 [dev]), if any.
    """

    name: str
    repo: str
    pattern: str
    architecture: str
    scheduler_config: dict
    steps: int
    guidance_scale: float = 1.0
    strength: float = 1.0
    sigmas: tuple[float, ...] | None = None
    guidance_embedding: float | None = None

    def matches(self, filename: str) -> re.Match | None:
        return re.search(self.pattern, os.path.basename(filename), flags=re.IGNORECASE)

    def metadata(self, filename: str = "") -> StudentMetadata:
        """The sampling metadata for one of its files (the step count from the name where it has one)."""
        match = self.matches(filename)
        steps = int(match["steps"]) if match and match.groupdict().get("steps") else self.steps
        return StudentMetadata(
            method=self.name, architecture=self.architecture, scheduler_class="ConsistencyScheduler",
            scheduler_config=dict(ConsistencyScheduler(**self.scheduler_config).config), num_inference_steps=steps,
            recommended_steps=[steps], guidance_scale=self.guidance_scale, base_model=self.repo,
            sigmas=list(self.sigmas) if self.sigmas else None, guidance_embedding=self.guidance_embedding,
        )


PUBLISHED_LORAS = (
    PublishedLora("qwen-image-lightning", "lightx2v/Qwen-Image-Lightning", r"qwen-image.*lightning.*?(?P<steps>\d+)-?steps", "qwen_image",
                  _STATIC_SHIFT_3, steps=8),
    PublishedLora("flux2-dev-turbo", "fal/FLUX.2-dev-Turbo", r"flux[._-]?2.*turbo", "flux2", _FLUX2_DEV, steps=len(FLUX2_TURBO_SIGMAS),
                  sigmas=FLUX2_TURBO_SIGMAS, guidance_embedding=2.5),
    PublishedLora("z-image-fun-distill", "alibaba-pai/Z-Image-Fun-Lora-Distill", r"z-image.*distill(?:.*?(?P<steps>\d+)-steps)?", "z_image",
                  _STATIC_SHIFT_3, steps=8, strength=0.8),
)


def published_lora(filename: str, architecture: str | None = None) -> PublishedLora | None:
    """The published LoRA a file name belongs to (of ``architecture`` when given), or None."""
    for entry in PUBLISHED_LORAS:
        if entry.matches(filename) and architecture in (None, entry.architecture):
            return entry
    return None
