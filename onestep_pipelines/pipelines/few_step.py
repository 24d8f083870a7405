"""Few-step pipelines: the stock SD / SDXL / SD3 / Flux / Qwen-Image / FLUX.2 / Z-Image pipelines plus what a student needs.

Each class is the stock pipeline (same ``__call__`` signature, same components) with :class:`FewStepPipelineMixin` (see
``mixin.py``): r passing for flow-map students, defaults from the student's metadata, safe loading and the files
that make ``DiffusionPipeline.from_pretrained`` find it. Without a student they behave exactly like the stock ones.
"""

from __future__ import annotations

import inspect

from .._image_processors import use_pil_image_processors

use_pil_image_processors()  # before diffusers' SD modules import transformers' image processors: no torchvision notice

from diffusers import (  # noqa: E402
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    ZImagePipeline,
)

from .calling import with_stock_call  # noqa: E402
from .mixin import FewStepPipelineMixin  # noqa: E402


def _with_student_argument(base):
    """``__init__`` of ``base`` plus a keyword ``student`` (metadata dict) stored in ``model_index.json``."""

    def __init__(self, *args, student: dict | None = None, **kwargs):
        base.__init__(self, *args, **kwargs)
        self.register_to_config(student=student)

    signature = inspect.signature(base.__init__)
    extra = inspect.Parameter("student", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=dict | None)
    __init__.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    __init__.__doc__ = base.__init__.__doc__
    return __init__


@with_stock_call
class FewStepStableDiffusionPipeline(FewStepPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` for few-step students (see :class:`FewStepPipelineMixin`)."""

    __init__ = _with_student_argument(StableDiffusionPipeline)


@with_stock_call
class FewStepStableDiffusionXLPipeline(FewStepPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` for few-step students (see :class:`FewStepPipelineMixin`)."""

    __init__ = _with_student_argument(StableDiffusionXLPipeline)


@with_stock_call
class FewStepStableDiffusion3Pipeline(FewStepPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` for few-step students (see :class:`FewStepPipelineMixin`)."""

    _denoiser = "transformer"
    __init__ = _with_student_argument(StableDiffusion3Pipeline)


@with_stock_call
class FewStepFluxPipeline(FewStepPipelineMixin, FluxPipeline):
    """``FluxPipeline`` for few-step students (see :class:`FewStepPipelineMixin`). CFG-mode students use
    ``true_cfg_scale`` (Flux's ``guidance_scale`` is the distilled-guidance embedding)."""

    _denoiser = "transformer"
    _guidance_argument = "true_cfg_scale"
    _embedded_guidance_argument = "guidance_scale"
    _cfg_needs_negative_prompt = True
    _timestep_divisor = 1000.0
    __init__ = _with_student_argument(FluxPipeline)


@with_stock_call
class FewStepQwenImagePipeline(FewStepPipelineMixin, QwenImagePipeline):
    """``QwenImagePipeline`` for few-step students (see :class:`FewStepPipelineMixin`). CFG-mode students use
    ``true_cfg_scale`` with a negative prompt (``""`` by default), as the stock pipeline's true CFG needs one."""

    _denoiser = "transformer"
    _guidance_argument = "true_cfg_scale"
    _cfg_needs_negative_prompt = True
    _timestep_divisor = 1000.0
    __init__ = _with_student_argument(QwenImagePipeline)


@with_stock_call
class FewStepFlux2Pipeline(FewStepPipelineMixin, Flux2Pipeline):
    """``Flux2Pipeline`` (FLUX.2 [dev]) for few-step students (see :class:`FewStepPipelineMixin`). FLUX.2 [dev] has no
    classifier-free guidance: its ``guidance_scale`` is the distilled-guidance embedding, which defaults to the
    student's ``guidance_embedding``; its students bake guidance in."""

    _denoiser = "transformer"
    _guidance_argument = None
    _embedded_guidance_argument = "guidance_scale"
    _timestep_divisor = 1000.0
    __init__ = _with_student_argument(Flux2Pipeline)


@with_stock_call
class FewStepFlux2KleinPipeline(FewStepPipelineMixin, Flux2KleinPipeline):
    """``Flux2KleinPipeline`` (FLUX.2 [klein]) for few-step students (see :class:`FewStepPipelineMixin`): CFG with
    ``guidance_scale > 1`` unless the pipeline's ``is_distilled`` is set."""

    _denoiser = "transformer"
    _timestep_divisor = 1000.0
    __init__ = _with_student_argument(Flux2KleinPipeline)


@with_stock_call
class FewStepZImagePipeline(FewStepPipelineMixin, ZImagePipeline):
    """``ZImagePipeline`` for few-step students (see :class:`FewStepPipelineMixin`). Z-Image's ``guidance_scale`` is
    ``s`` in ``cond + s (cond - uncond)`` (0 = no guidance): a student recording guidance ``w`` samples with ``w - 1``.
    Its transformer takes ``1 - sigma``: r-conditioned (flow-map) students are not available for it."""

    _denoiser = "transformer"
    _guidance_offset = 1.0
    __init__ = _with_student_argument(ZImagePipeline)


PIPELINES_BY_ARCHITECTURE = {
    "sd": FewStepStableDiffusionPipeline,
    "sdxl": FewStepStableDiffusionXLPipeline,
    "sd3": FewStepStableDiffusion3Pipeline,
    "flux": FewStepFluxPipeline,
    "qwen_image": FewStepQwenImagePipeline,
    "flux2": FewStepFlux2Pipeline,
    "z_image": FewStepZImagePipeline,
}
"""The few-step pipeline of each architecture (FLUX.2: [dev]; a [klein] teacher gets :class:`FewStepFlux2KleinPipeline`,
see :func:`~onestep_pipelines.pipelines.student_pipeline`)."""
