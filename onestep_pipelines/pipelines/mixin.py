"""What a few-step student pipeline adds to a diffusers pipeline (:class:`FewStepPipelineMixin`), and which
architecture a denoiser is. Imports no stock text-to-image pipeline, so the digits pipeline loads without them.

- with a :class:`FlowMapScheduler` and a model that takes ``r`` (see ``models.r_conditioning``), every
  call of the model also gets ``r_timestep``, the target time of the current step (no extra forward);
- a student's metadata (``model_index.json`` entry ``student``) sets the default number of steps and the
  guidance: a guidance-baked student samples without CFG unless asked;
- ``save_pretrained`` writes the files that make ``DiffusionPipeline.from_pretrained`` work (``loading.py``),
  and ``from_pretrained`` loads safetensors only unless ``allow_pickle=True``.

With any other scheduler, and without metadata, a pipeline behaves exactly like the stock one.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os

from huggingface_hub import snapshot_download

from ..hub import HUB_KWARGS, push_student
from ..models.digits_transformer import DigitsTransformer2DModel
from ..models.r_conditioning import takes_r_timestep
from ..schedulers import FlowMapScheduler, PolicyScheduler
from ..metadata import StudentMetadata
from .loading import PICKLE_SUFFIXES, safetensors_kwargs, write_loading_files

logger = logging.getLogger(__name__)


class FewStepPipelineMixin:
    """Student behaviour for a ``DiffusionPipeline`` subclass (see the module docstring).

    Class attributes: ``_denoiser`` names the model component; ``_guidance_argument`` the ``__call__`` argument
    that applies classifier-free guidance (None: the pipeline has none, as FLUX.2 [dev]); ``_guidance_offset`` what
    that argument's value lacks of the usual scale ``w`` (``uncond + w (cond - uncond)``, 1 = no guidance): Z-Image's
    ``cond + s (cond - uncond)`` takes ``s = w - 1``; ``_embedded_guidance_argument`` the argument of a distilled-guidance
    embedding (FLUX.1 / FLUX.2 [dev]: ``guidance_scale``), set from the student's ``guidance_embedding``; ``_timestep_divisor`` converts scheduler timesteps into the units
    the pipeline passes to its model (Flux passes ``sigma = t / 1000``); ``_cfg_needs_negative_prompt`` marks pipelines
    that apply CFG only when a negative prompt is given (Flux's and Qwen-Image's true CFG).
    """

    _denoiser = "unet"
    _guidance_argument: str | None = "guidance_scale"
    _guidance_offset = 0.0
    _embedded_guidance_argument: str | None = None
    _timestep_divisor = 1.0
    _cfg_needs_negative_prompt = False

    @property
    def student(self) -> StudentMetadata | None:
        """The student's sampling metadata, or None for a plain pipeline."""
        data = self.config.get("student")
        return None if data is None else StudentMetadata.from_dict(data)

    def set_student(self, metadata: StudentMetadata | None, set_scheduler: bool = True) -> None:
        """Record ``metadata`` (saved with the pipeline) and, by default, switch to its scheduler."""
        self.register_to_config(student=None if metadata is None else metadata.to_dict())
        if metadata is not None and set_scheduler:
            self.scheduler = metadata.make_scheduler()

    @property
    def denoiser(self):
        return getattr(self, self._denoiser)

    def guidance_kwargs(self, guidance_scale: float) -> dict:
        """The ``__call__`` arguments that sample with classifier-free guidance ``guidance_scale`` in the usual convention
        (``uncond + w (cond - uncond)``; 1 = one forward per step, no guidance), whatever this pipeline calls them."""
        if self._guidance_argument is None:
            if guidance_scale != 1.0:
                raise ValueError(f"{type(self).__name__} has no classifier-free guidance: guidance_scale={guidance_scale:g} cannot apply "
                                 "(its guidance_scale is the distilled-guidance embedding; bake guidance into the student instead).")
            return {}
        kwargs = {self._guidance_argument: guidance_scale - self._guidance_offset}
        if self._cfg_needs_negative_prompt and guidance_scale > 1:
            kwargs["negative_prompt"] = ""
        return kwargs

    def _guided(self, value) -> bool:
        """Whether the value of ``_guidance_argument`` turns classifier-free guidance on."""
        return value is not None and value > 1 - self._guidance_offset

    def __call__(self, *args, **kwargs):
        metadata = self.student
        bound = inspect.signature(super().__call__).bind_partial(*args, **kwargs).arguments  # the caller's arguments
        argument = self._guidance_argument
        if metadata is not None:
            if not {"num_inference_steps", "timesteps", "sigmas"} & set(bound):
                kwargs["num_inference_steps"] = metadata.num_inference_steps  # (also with sigmas: FLUX.2's mu depends on it)
                if metadata.sigmas:
                    kwargs["sigmas"] = metadata.sigmas
            embedded = self._embedded_guidance_argument
            if embedded is not None and metadata.guidance_embedding is not None and embedded not in bound:
                kwargs[embedded] = metadata.guidance_embedding
            self._warn_on_schedule_conflicts(metadata)
            if argument is None or argument not in bound:
                defaults = self.guidance_kwargs(1.0 if metadata.guidance_baked else metadata.guidance_scale)
                kwargs.update({k: v for k, v in defaults.items() if k not in bound})
            elif metadata.guidance_baked and self._guided(bound[argument]):
                logger.warning(
                    "This student has guidance %.3g baked in; %s=%s applies classifier-free guidance on top of it.",
                    metadata.guidance_scale, argument, bound[argument],
                )
            guided = argument is not None and self._guided((bound | kwargs).get(argument))
            if metadata.guidance_baked and not guided and bound.get("negative_prompt") is not None:
                logger.warning(
                    "negative_prompt has no effect here: this student has guidance %.3g baked in and samples without classifier-free "
                    "guidance; pass %s > %g to apply guidance (and the negative prompt) on top of it.", metadata.guidance_scale, argument,
                    1 - self._guidance_offset,
                )
        if metadata is not None and metadata.scheduler_class == "PolicyScheduler":
            self._check_policy_call(bound | kwargs)  # (with the student's defaults added above)
        scheduler = self.scheduler
        ours = hasattr(scheduler, "raise_if_nonfinite")
        if ours:  # the NaN / inf check is read after the call, not inside the denoising loop; re-noising steps draw
            # from the call's generator also where the stock loop does not pass it to step (SD3, Flux)
            scheduler.defer_finite_check = True
            scheduler.call_generator = bound.get("generator")
        try:
            with self._passing_r(metadata):
                output = super().__call__(*args, **kwargs)
        finally:
            if ours:
                scheduler.defer_finite_check = False
                scheduler.call_generator = None
        if ours:
            scheduler.raise_if_nonfinite()
        return output

    def _warn_on_schedule_conflicts(self, metadata: StudentMetadata) -> None:
        """Warn (once per scheduler) when the pipeline's scheduler would sample the student on another schedule than it
        records (e.g. a Lightning LoRA's shift 3 under Qwen-Image's dynamic shift)."""
        scheduler = self.scheduler
        if getattr(scheduler, "_onestep_schedule_checked", None) == metadata.method:
            return
        conflicts = metadata.schedule_conflicts(scheduler)
        if conflicts:
            logger.warning(
                "This %s student samples on the schedule it records (%s); the pipeline's %s differs: %s. Its images will be off: "
                "restore the recorded scheduler with pipe.set_student(pipe.student).", metadata.method, metadata.scheduler_class,
                type(scheduler).__name__, ", ".join(conflicts),
            )
        scheduler._onestep_schedule_checked = metadata.method

    def _check_policy_call(self, arguments: dict) -> None:
        """A pi-Flow policy student's output is a policy: only PolicyScheduler integrates it, and classifier-free
        guidance (a difference of two outputs) has no meaning for it (its guidance is baked in)."""
        if not isinstance(self.scheduler, PolicyScheduler):
            raise ValueError(f"This is a pi-Flow policy student: its {self._denoiser} outputs a policy, which PolicyScheduler integrates "
                             f"(got {type(self.scheduler).__name__}); restore it with pipe.set_student(pipe.student).")
        if self._guidance_argument is not None and self._guided(arguments.get(self._guidance_argument)):
            raise ValueError(f"{self._guidance_argument}={arguments[self._guidance_argument]}: a policy student takes no classifier-free guidance "
                             f"(its guidance, {self.student.guidance_scale:g}, is baked into its policy); leave it at "
                             f"{1 - self._guidance_offset:g}.")

    @contextlib.contextmanager
    def _passing_r(self, metadata: StudentMetadata | None):
        model = self.denoiser
        wants_r = isinstance(self.scheduler, FlowMapScheduler) and takes_r_timestep(model)
        if metadata is not None and metadata.r_conditioning and not wants_r:
            raise ValueError(
                f"This student takes a second time r: it needs a FlowMapScheduler (got {type(self.scheduler).__name__}) "
                f"and an r-conditioned {self._denoiser} (got {type(model).__name__}; see add_r_conditioning)."
            )
        if not wants_r:
            yield
            return
        scheduler, divisor = self.scheduler, self._timestep_divisor

        def pass_r(module, args, kwargs):
            kwargs["r_timestep"] = scheduler.r_timestep_for() / divisor
            return args, kwargs

        handle = model.register_forward_pre_hook(pass_r, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """``DiffusionPipeline.save_pretrained`` plus the loading shim; ``push_to_hub`` uploads with
        :func:`onestep_pipelines.push_student` (``repo_id``, ``token``, ``private`` as keyword arguments)."""
        hub = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message") if k in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        write_loading_files(str(save_directory), type(self).__name__)
        if push_to_hub:
            push_student(save_directory, hub.pop("repo_id", None) or str(save_directory).rstrip("/").split("/")[-1], **hub)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, allow_pickle: bool = False, **kwargs):
        """``DiffusionPipeline.from_pretrained`` restricted to safetensors unless ``allow_pickle=True``.

        A Hub repo whose components come from this package is fetched with ``snapshot_download`` (diffusers' own
        download accepts component libraries from diffusers and transformers only): only ``model_index.json``, the
        shim and the component folders, without pickled, ONNX or other-variant weights.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
                raise FileNotFoundError(f"{path} is not a folder with a saved pipeline.")
            hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
            config = cls.load_config(path, **hub)
            components = [k for k, v in config.items() if isinstance(v, list) and k != "_class_name" and v[0]]
            if any(str(config[k][0]).startswith("onestep_pipelines") for k in components):
                for k in HUB_KWARGS:
                    kwargs.pop(k, None)
                variant = kwargs.get("variant")
                ignore = [f"*{suffix}" for suffix in PICKLE_SUFFIXES if not allow_pickle] + ["*.onnx", "*.onnx_data"]
                ignore += [f"*.{v}.*" for v in ("fp16", "bf16", "fp32") if v != variant]
                allow = ["model_index.json", "*.py", "README.md", *(f"{k}/*" for k in components)]
                path = snapshot_download(path, allow_patterns=allow, ignore_patterns=ignore, **hub)
        try:
            return super().from_pretrained(path, **safetensors_kwargs(kwargs, allow_pickle))
        except OSError as error:
            if allow_pickle or "safetensors" not in str(error):
                raise
            raise OSError(f"{error}\nOnly safetensors weights load by default; pass allow_pickle=True to load pickled (.bin) weights.") from error

    @classmethod
    def load_config(cls, *args, **kwargs):
        """Read ``model_index.json``; a ``["pipeline", "<Class>"]`` class name is read as ``"<Class>"`` so that
        loading through this class never runs the folder's ``pipeline.py``."""
        result = super().load_config(*args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        name = config.get("_class_name")
        if isinstance(name, (list, tuple)) and len(name) == 2:
            config["_class_name"] = name[1]
        return result


def _denoiser_classes() -> dict:
    """Denoiser class -> architecture name (SD and SDXL share the UNet class: told apart by its config)."""
    from diffusers.models import (
        Flux2Transformer2DModel,
        FluxTransformer2DModel,
        QwenImageTransformer2DModel,
        SD3Transformer2DModel,
        ZImageTransformer2DModel,
    )

    return {SD3Transformer2DModel: "sd3", FluxTransformer2DModel: "flux", QwenImageTransformer2DModel: "qwen_image",
            Flux2Transformer2DModel: "flux2", ZImageTransformer2DModel: "z_image", DigitsTransformer2DModel: "digits"}


def architecture_of(model) -> str:
    """``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ``"qwen_image"``, ``"flux2"`` (FLUX.2 [dev] and [klein]), ``"z_image"``
    or ``"digits"`` for a denoiser (or a pipeline holding one)."""
    from diffusers.models import UNet2DConditionModel

    model = getattr(model, "unet", None) or getattr(model, "transformer", None) or model
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, UNet2DConditionModel):
        return "sdxl" if model.config.addition_embed_type == "text_time" else "sd"
    for cls, name in _denoiser_classes().items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"{type(model).__name__} is not a supported student architecture (SD/SDXL UNet, SD3, Flux, Qwen-Image, FLUX.2, Z-Image, "
                    "digits).")
