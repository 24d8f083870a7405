"""Few-step pipelines: stock diffusers pipelines for students, and the digits pipeline."""

from .few_step import (
    PIPELINES_BY_ARCHITECTURE,
    FewStepFluxPipeline,
    FewStepPipelineMixin,
    FewStepStableDiffusion3Pipeline,
    FewStepStableDiffusionPipeline,
    FewStepStableDiffusionXLPipeline,
    architecture_of,
)
from .loading import _install_diffusers_hook
from .pipeline_digits import DigitsPipeline

_install_diffusers_hook()

__all__ = [
    "PIPELINES_BY_ARCHITECTURE",
    "DigitsPipeline",
    "FewStepFluxPipeline",
    "FewStepPipelineMixin",
    "FewStepStableDiffusion3Pipeline",
    "FewStepStableDiffusionPipeline",
    "FewStepStableDiffusionXLPipeline",
    "architecture_of",
]
