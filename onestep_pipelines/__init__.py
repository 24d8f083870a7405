"""onestep-pipelines: one-step and few-step generation for diffusers and ComfyUI.

The names below are imported on first use (PEP 562), so ``import onestep_pipelines``, the sampling core and the
``onestep-train`` command start without loading diffusers; ``DiffusionPipeline.from_pretrained`` learns this
package's pipelines as soon as diffusers loads it (below).
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import TYPE_CHECKING

from ._import_hooks import call_when_imported

__version__ = "0.1.0"

_EXPORTS = {
    "ConsistencyScheduler": "schedulers",
    "FewStepSchedulerOutput": "schedulers",
    "FlowMapScheduler": "schedulers",
    "PolicyScheduler": "schedulers",
    "TDMScheduler": "schedulers",
    "DigitsPipeline": "pipelines",
    "FewStepFlux2KleinPipeline": "pipelines",
    "FewStepFlux2Pipeline": "pipelines",
    "FewStepFluxPipeline": "pipelines",
    "FewStepQwenImagePipeline": "pipelines",
    "FewStepZImagePipeline": "pipelines",
    "FewStepStableDiffusion3Pipeline": "pipelines",
    "FewStepStableDiffusionPipeline": "pipelines",
    "FewStepStableDiffusionXLPipeline": "pipelines",
    "DigitsTransformer2DModel": "models",
    "TwoTimeFlux2Transformer2DModel": "models",
    "TwoTimeFluxTransformer2DModel": "models",
    "TwoTimeQwenImageTransformer2DModel": "models",
    "TwoTimeSD3Transformer2DModel": "models",
    "TwoTimeUNet2DConditionModel": "models",
    "add_r_conditioning": "models",
    "StudentMetadata": "metadata",
    "load_student_lora": "students",
    "save_student_lora": "students",
    "write_model_card": "students",
    "push_student": "hub",
    "load_digits_teacher": "benchmark.evaluate",
}
__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from .benchmark.evaluate import load_digits_teacher
    from .hub import push_student
    from .metadata import StudentMetadata
    from .models import (
        DigitsTransformer2DModel,
        TwoTimeFlux2Transformer2DModel,
        TwoTimeFluxTransformer2DModel,
        TwoTimeQwenImageTransformer2DModel,
        TwoTimeSD3Transformer2DModel,
        TwoTimeUNet2DConditionModel,
        add_r_conditioning,
    )
    from .pipelines import (
        DigitsPipeline,
        FewStepFlux2KleinPipeline,
        FewStepFlux2Pipeline,
        FewStepFluxPipeline,
        FewStepQwenImagePipeline,
        FewStepStableDiffusion3Pipeline,
        FewStepStableDiffusionPipeline,
        FewStepStableDiffusionXLPipeline,
        FewStepZImagePipeline,
    )
    from .schedulers import ConsistencyScheduler, FewStepSchedulerOutput, FlowMapScheduler, PolicyScheduler, TDMScheduler
    from .students import load_student_lora, save_student_lora, write_model_card


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'onestep_pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_PIPELINES = {name for name, module in _EXPORTS.items() if module == "pipelines"}


def _own_pipeline(config: dict) -> str | None:
    """The name of our pipeline class that a ``model_index.json`` names (``["pipeline", "<Class>"]``, see
    ``pipelines/loading.py``), if any."""
    name = config.get("_class_name")
    if isinstance(name, (list, tuple)) and len(name) == 2 and name[0] == "pipeline":
        name = name[1]
    return name if isinstance(name, str) and name in _PIPELINES else None


def _learn_our_pipelines(pipeline_utils) -> None:
    """Wrap ``DiffusionPipeline.from_pretrained``: a folder or repo naming one of our pipeline classes loads through
    that class (our installed code; the folder's ``pipeline.py`` is not run); anything else is diffusers' own call,
    after binding transformers' PIL image processors when the pipeline has transformers components (no torchvision
    notice; see ``_image_processors.py``)."""
    pipeline_cls = pipeline_utils.DiffusionPipeline
    original = pipeline_cls.from_pretrained.__func__
    if getattr(original, "_onestep_hook", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        if cls is pipeline_cls and kwargs.get("custom_pipeline") is None:
            from .hub import HUB_KWARGS

            try:
                config = pipeline_cls.load_config(pretrained_model_name_or_path, **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs})
            except (OSError, ValueError):  # no model_index.json, offline, not JSON: diffusers' own call reports it
                config = {}
            name = _own_pipeline(config)
            if name is not None:
                return getattr(sys.modules[__name__], name).from_pretrained(pretrained_model_name_or_path, **kwargs)
            if any(isinstance(v, list) and v[:1] == ["transformers"] for v in config.values()):  # an SD-family pipeline
                from ._image_processors import use_pil_image_processors

                use_pil_image_processors()
        return original(cls, pretrained_model_name_or_path, **kwargs)

    from_pretrained._onestep_hook = True
    pipeline_cls.from_pretrained = classmethod(from_pretrained)


call_when_imported("diffusers.pipelines.pipeline_utils", _learn_our_pipelines)
