"""DigitsPipeline: class-conditional few-step generation with the embedded digits models."""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..benchmark.digits import parse_class_labels
from ..models.digits_transformer import DigitsTransformer2DModel
from ..sampling import check_num_steps
from .calling import with_stock_call
from .mixin import FewStepPipelineMixin


class _DigitsGeneration(DiffusionPipeline):
    """The sampling loop of :class:`DigitsPipeline`."""

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]

    def _set_timesteps(self, num_inference_steps, device, timesteps, sigmas):
        params = inspect.signature(self.scheduler.set_timesteps).parameters
        kwargs = {"device": device}
        if timesteps is not None or sigmas is not None:
            for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
                if value is not None:
                    if name not in params:
                        raise ValueError(f"{type(self.scheduler).__name__}.set_timesteps does not accept custom `{name}`.")
                    kwargs[name] = value
            self.scheduler.set_timesteps(**kwargs)
        else:
            self.scheduler.set_timesteps(check_num_steps(num_inference_steps), **kwargs)
        return self.scheduler.timesteps

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        num_inference_steps: int = 4,
        guidance_scale: float | None = None,
        num_images_per_label: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        r"""Generate digits.

        Args:
            class_labels (`int`, `str` or list of them): digits to draw, as ints 0-9 or names ("seven", "7").
                Defaults to one of each digit.
            num_inference_steps (`int`, defaults to 4): model evaluations (ignored when `timesteps`/`sigmas` are given).
            guidance_scale (`float`, *optional*): classifier-free guidance scale; 1 disables CFG (one forward per
                step). Defaults to the pipeline's `default_guidance_scale`.
            num_images_per_label (`int`, defaults to 1): images per class label.
            generator (`torch.Generator`, *optional*): for the initial noise and stochastic schedulers.
            latents (`torch.Tensor`, *optional*): initial noise of shape ``(batch, 1, 8, 8)``.
            timesteps, sigmas (`list`, *optional*): a custom schedule passed to the scheduler.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (NHWC in [0, 1]), `"pt"` (NCHW in [0, 1]) or
                `"latent"` (raw samples in [-1, 1]).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): called as ``fn(pipe, step, timestep, tensors)`` after each
                step with the tensors named in `callback_on_step_end_tensor_inputs`; may return replacements.
            callback_on_step_end_tensor_inputs (`list[str]`): tensors passed to the callback (only `"latents"`).
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r} is not supported; choose 'pil', 'np', 'pt' or 'latent'.")
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor input {name!r} is not one of {self._callback_tensor_inputs}.")
        model = self.transformer
        cfg = model.config
        labels = parse_class_labels(list(range(cfg.num_classes)) if class_labels is None else class_labels, cfg.num_classes)
        if not isinstance(num_images_per_label, int) or num_images_per_label <= 0:
            raise ValueError(f"num_images_per_label must be a positive integer, got {num_images_per_label!r}.")
        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        device = self._execution_device
        labels = labels.repeat_interleave(num_images_per_label).to(device)
        batch = len(labels)
        shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=model.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        latents = latents.to(device=device, dtype=model.dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)

        timesteps = self._set_timesteps(num_inference_steps, device, timesteps, sigmas)
        use_cfg = guidance_scale != 1.0
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        null = torch.full_like(labels, model.null_class)
        for i, t in enumerate(self.progress_bar(timesteps)):
            if use_cfg:
                out = model(torch.cat([latents, latents]), t, torch.cat([labels, null])).sample
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            else:
                out = model(latents, t, labels).sample
            latents = self.scheduler.step(out, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                available = {"latents": latents}
                tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                returned = callback_on_step_end(self, i, t, tensors) or {}
                latents = returned.get("latents", latents)

        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(latents.float().clamp(-1, 1), output_type=output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


@with_stock_call
class DigitsPipeline(FewStepPipelineMixin, _DigitsGeneration):
    r"""Class-conditional generation of 8x8 digits with a :class:`DigitsTransformer2DModel`.

    Works with ``FlowMatchEulerDiscreteScheduler`` (the teacher's Euler sampler) and with this package's
    schedulers; when the scheduler is a :class:`FlowMapScheduler` the target time ``r`` of every step is
    passed to the model (no extra forward pass).

    Args:
        transformer ([`DigitsTransformer2DModel`]): the velocity / average-velocity model.
        scheduler ([`SchedulerMixin`]): a flow-time scheduler.
        default_guidance_scale (`float`, defaults to 1.0): guidance used when the call gives none and the
            pipeline has no student metadata (1 = no CFG).
        student (`dict`, *optional*): a student's :class:`StudentMetadata` as a dict.
    """

    _denoiser = "transformer"

    def __init__(self, transformer: DigitsTransformer2DModel, scheduler, default_guidance_scale: float = 1.0, student: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.register_to_config(default_guidance_scale=default_guidance_scale, student=student)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)
