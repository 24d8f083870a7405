"""Few-step pipelines: stock diffusers pipelines for students, and the digits pipeline.

The SD / SDXL / SD3 / Flux classes import the stock pipelines (and with them transformers' text and image
processors) on first use, so the digits pipeline and the trainer's digits job load without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .mixin import FewStepPipelineMixin, architecture_of
from .pipeline_digits import DigitsPipeline

PIPELINE_NAMES = {  # architecture -> class name, without importing the classes
    "sd": "FewStepStableDiffusionPipeline",
    "sdxl": "FewStepStableDiffusionXLPipeline",
    "sd3": "FewStepStableDiffusion3Pipeline",
    "flux": "FewStepFluxPipeline",
    "digits": "DigitsPipeline",
}
_LAZY = {*PIPELINE_NAMES.values(), "PIPELINES_BY_ARCHITECTURE"} - {"DigitsPipeline"}

if TYPE_CHECKING:
    from .few_step import (
        PIPELINES_BY_ARCHITECTURE,
        FewStepFluxPipeline,
        FewStepStableDiffusion3Pipeline,
        FewStepStableDiffusionPipeline,
        FewStepStableDiffusionXLPipeline,
    )

__all__ = sorted(_LAZY | {"DigitsPipeline", "FewStepPipelineMixin", "PIPELINE_NAMES", "architecture_of"})


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".few_step", __name__), name)
    globals()[name] = value
    return value
