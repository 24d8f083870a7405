"""Few-step pipelines: stock diffusers pipelines for students, and the digits pipeline.

The SD / SDXL / SD3 / Flux / Qwen-Image / FLUX.2 / Z-Image classes import the stock pipelines (and with them transformers' text and image
processors) on first use, so the digits pipeline and the trainer's digits job load without them.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING

from .mixin import FewStepPipelineMixin, architecture_of
from .pipeline_digits import DigitsPipeline

PIPELINE_NAMES = {  # architecture -> class name, without importing the classes
    "sd": "FewStepStableDiffusionPipeline",
    "sdxl": "FewStepStableDiffusionXLPipeline",
    "sd3": "FewStepStableDiffusion3Pipeline",
    "flux": "FewStepFluxPipeline",
    "qwen_image": "FewStepQwenImagePipeline",
    "flux2": "FewStepFlux2Pipeline",
    "z_image": "FewStepZImagePipeline",
    "digits": "DigitsPipeline",
}
KLEIN_PIPELINE_NAME = "FewStepFlux2KleinPipeline"  # FLUX.2 [klein]: the flux2 transformer in a pipeline with CFG and a Qwen3 encoder
_LAZY = {*PIPELINE_NAMES.values(), KLEIN_PIPELINE_NAME, "PIPELINES_BY_ARCHITECTURE"} - {"DigitsPipeline"}

if TYPE_CHECKING:
    from .few_step import (
        PIPELINES_BY_ARCHITECTURE,
        FewStepFlux2KleinPipeline,
        FewStepFlux2Pipeline,
        FewStepFluxPipeline,
        FewStepQwenImagePipeline,
        FewStepStableDiffusion3Pipeline,
        FewStepStableDiffusionPipeline,
        FewStepStableDiffusionXLPipeline,
        FewStepZImagePipeline,
    )

__all__ = sorted(_LAZY | {"DigitsPipeline", "FewStepPipelineMixin", "PIPELINE_NAMES", "architecture_of", "pipeline_class_for", "student_pipeline"})


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".few_step", __name__), name)
    globals()[name] = value
    return value


def pipeline_class_for(teacher) -> type:
    """The few-step pipeline class for ``teacher`` (a pipeline): by its denoiser's architecture, and FLUX.2 [klein]
    (:class:`FewStepFlux2KleinPipeline`) by its pipeline class."""
    architecture = architecture_of(teacher)
    if architecture == "digits":
        return DigitsPipeline
    if architecture == "flux2" and "Klein" in type(teacher).__name__:
        return __getattr__(KLEIN_PIPELINE_NAME)
    return __getattr__(PIPELINE_NAMES[architecture])


def student_pipeline(teacher, denoiser=None, scheduler=None):
    """The few-step pipeline of ``teacher``'s architecture holding the teacher's components, with ``denoiser`` and
    ``scheduler`` in place of its own (None: the teacher's; a LoRA student then loads on it with
    :func:`~onestep_pipelines.students.load_student_lora`). Options of the class that are not components keep the teacher's recorded values
    instead of the class defaults (SD's ``requires_safety_checker``, SDXL's ``force_zeros_for_empty_prompt``): a
    student of a teacher without a safety checker records ``requires_safety_checker`` as the teacher did (False), so
    loading it does not warn about the missing checker. Guidance is the student's own (its metadata), not copied."""
    cls = pipeline_class_for(teacher)
    components = {**teacher.components}
    if denoiser is not None:
        components[cls._denoiser] = denoiser
    if scheduler is not None:
        components["scheduler"] = scheduler
    own = {"self", "student", "default_guidance_scale"}  # the student's metadata and the digits pipeline's guidance
    options = {
        name: teacher.config[name]
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in components and name not in own and name in teacher.config and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return cls(**components, **options)
