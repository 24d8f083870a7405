"""Two-time (t, r) conditioning for stock diffusers models.

Flow-map and MeanFlow students predict an average velocity ``u(x_t, r, t)`` over ``[r, t]``
(Geng et al. 2025, "Mean Flows for One-step Generative Modeling"; Sabour et al. 2025, "Align Your
Flow"). To fine-tune such a student from a one-time teacher, the teacher's architecture gets a
second time input. As in MeanFlow's ``(t, t - r)`` conditioning, the interval ``t - r`` is embedded
with the model's own sinusoidal projection and an MLP whose output layer starts at zero, and the
result is added to the model's time embedding. At initialisation the adapted model is therefore
*exactly* the teacher, whatever ``r`` is.

The adapted classes are plain subclasses of the stock models with one extra sub-module,
``r_embedder``; they save and load with ``save_pretrained`` / ``from_pretrained`` like the stock
model, and ``forward(..., r_timestep=r)`` takes ``r`` in the same units as ``timestep``.
"""

from __future__ import annotations

import functools

import torch
from diffusers.configuration_utils import ConfigMixin  # noqa: F401  (diffusers' loader looks the bases up here)
from diffusers.models import (
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .digits_transformer import DigitsTransformer2DModel


class IntervalEmbedding(nn.Module):
    """``MLP(sinusoid(t - r))`` with a zero-initialised output layer (adds nothing until trained)."""

    def __init__(self, time_proj: Timesteps, embed_dim: int):
        super().__init__()
        self.proj = Timesteps(time_proj.num_channels, time_proj.flip_sin_to_cos, time_proj.downscale_freq_shift, time_proj.scale)
        self.embedding = TimestepEmbedding(time_proj.num_channels, embed_dim)
        nn.init.zeros_(self.embedding.linear_2.weight)
        nn.init.zeros_(self.embedding.linear_2.bias)

    def forward(self, interval: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.linear_1.weight
        return self.embedding(self.proj(interval).to(device=weight.device, dtype=weight.dtype))


class RConditioningMixin:
    """Adds ``r_embedder`` and the ``r_timestep`` argument to a diffusers model.

    Subclasses name the module whose output is the time embedding (``_time_embedding_module``) and the
    factor by which the model multiplies its ``timestep`` argument internally (``_timestep_scale``: Flux
    takes ``sigma`` and multiplies by 1000; UNets and SD3 take ``sigma * 1000`` or DDPM timesteps).
    """

    _time_embedding_module: str
    _timestep_scale: float = 1.0
    takes_r_timestep = True

    def _init_r_conditioning(self) -> None:
        time_embedding = getattr(self, self._time_embedding_module)
        self.reset_r_embedder()
        self._r_interval = None
        time_embedding.register_forward_hook(self._add_r_embedding)

    def reset_r_embedder(self) -> None:
        """A fresh zero-initialised ``r_embedder`` on the device and dtype of the model's time embedding."""
        time_embedding = getattr(self, self._time_embedding_module)
        time_proj = getattr(self, "time_proj", None) or time_embedding.time_proj
        linear = time_embedding.linear_2 if hasattr(time_embedding, "linear_2") else time_embedding.timestep_embedder.linear_2
        device = linear.weight.device if linear.weight.device.type != "meta" else None
        with torch.device(device or "cpu"):
            self.r_embedder = IntervalEmbedding(time_proj, linear.out_features).to(linear.weight.dtype)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``from_pretrained``; a one-time (teacher) checkpoint loads too, with a zero-initialised ``r_embedder``."""
        model = super().from_pretrained(*args, **kwargs)
        if any(p.is_meta for p in model.r_embedder.parameters()):
            model.reset_r_embedder()
        return model

    def _add_r_embedding(self, module, inputs, output):
        if self._r_interval is None:
            return output
        return output + self.r_embedder(self._r_interval).to(output.dtype)

    def forward(self, *args, r_timestep=None, **kwargs):
        """The stock forward; with ``r_timestep`` (same units as ``timestep``) the model predicts the average
        velocity over ``[r, t]``. ``r_timestep=None`` or ``r == t`` gives the one-time model."""
        if r_timestep is None:
            return super().forward(*args, **kwargs)
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        device = self.r_embedder.embedding.linear_1.weight.device
        t = torch.as_tensor(timestep, device=device, dtype=torch.float32).reshape(-1)
        r = torch.as_tensor(r_timestep, device=device, dtype=torch.float32).reshape(-1)
        self._r_interval = (t - r) * self._timestep_scale
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._r_interval = None


def _adds_r_conditioning(base):
    """``__init__`` of an adapted class: the stock one (same config signature) plus ``r_embedder``."""

    @functools.wraps(base.__init__)
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._init_r_conditioning()

    return __init__


class TwoTimeUNet2DConditionModel(RConditioningMixin, UNet2DConditionModel):
    """``UNet2DConditionModel`` (SD 1.5 / SDXL) with a zero-initialised second-time embedding."""

    _time_embedding_module = "time_embedding"
    __init__ = _adds_r_conditioning(UNet2DConditionModel)


class TwoTimeSD3Transformer2DModel(RConditioningMixin, SD3Transformer2DModel):
    """``SD3Transformer2DModel`` with a zero-initialised second-time embedding."""

    _time_embedding_module = "time_text_embed"
    __init__ = _adds_r_conditioning(SD3Transformer2DModel)


class TwoTimeFluxTransformer2DModel(RConditioningMixin, FluxTransformer2DModel):
    """``FluxTransformer2DModel`` with a zero-initialised second-time embedding (``timestep`` is ``sigma``)."""

    _time_embedding_module = "time_text_embed"
    _timestep_scale = 1000.0
    __init__ = _adds_r_conditioning(FluxTransformer2DModel)


class TwoTimeQwenImageTransformer2DModel(RConditioningMixin, QwenImageTransformer2DModel):
    """``QwenImageTransformer2DModel`` with a zero-initialised second-time embedding (``timestep`` is ``sigma``; the time
    projection itself scales by 1000, and the interval embedding copies it)."""

    _time_embedding_module = "time_text_embed"
    __init__ = _adds_r_conditioning(QwenImageTransformer2DModel)


class TwoTimeFlux2Transformer2DModel(RConditioningMixin, Flux2Transformer2DModel):
    """``Flux2Transformer2DModel`` (FLUX.2 [dev] / [klein]) with a zero-initialised second-time embedding (``timestep``
    is ``sigma``)."""

    _time_embedding_module = "time_guidance_embed"
    _timestep_scale = 1000.0
    __init__ = _adds_r_conditioning(Flux2Transformer2DModel)


TWO_TIME_CLASSES = {
    UNet2DConditionModel: TwoTimeUNet2DConditionModel,
    SD3Transformer2DModel: TwoTimeSD3Transformer2DModel,
    FluxTransformer2DModel: TwoTimeFluxTransformer2DModel,
    QwenImageTransformer2DModel: TwoTimeQwenImageTransformer2DModel,
    Flux2Transformer2DModel: TwoTimeFlux2Transformer2DModel,
}


def takes_r_timestep(model: nn.Module) -> bool:
    """Whether ``model`` accepts ``r_timestep`` (an adapted stock model or the digits model)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return isinstance(model, DigitsTransformer2DModel) or getattr(model, "takes_r_timestep", False)


def add_r_conditioning(model: ModelMixin) -> ModelMixin:
    """Return a copy of ``model`` that also takes ``r_timestep``; its output equals ``model``'s exactly.

    Supported: ``UNet2DConditionModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
    ``QwenImageTransformer2DModel``, ``Flux2Transformer2DModel`` (Z-Image's transformer takes ``1 - sigma`` and is not
    adapted). A model that
    already takes ``r`` (an adapted model, ``DigitsTransformer2DModel``) is returned unchanged. The weights are
    shared with ``model`` (no copy of the tensors); the new ``r_embedder`` is on the model's device and dtype.
    """
    if takes_r_timestep(model):
        return model
    adapted_cls = TWO_TIME_CLASSES.get(type(model))
    if adapted_cls is None:
        supported = ", ".join(cls.__name__ for cls in TWO_TIME_CLASSES)
        raise TypeError(f"add_r_conditioning supports {supported} (and models that already take r), not {type(model).__name__}.")
    if getattr(model, "peft_config", None):
        raise ValueError(
            f"The {type(model).__name__} carries LoRA adapters {list(model.peft_config)}: add r-conditioning before "
            "loading a LoRA, or fuse and unload the LoRA first."
        )
    with torch.device("meta"):
        adapted = adapted_cls.from_config(model.config)
    missing, unexpected = adapted.load_state_dict(model.state_dict(keep_vars=True), strict=False, assign=True)
    if unexpected or any(not key.startswith("r_embedder.") for key in missing):
        raise ValueError(f"{type(model).__name__} does not match its config: missing {missing}, unexpected {unexpected}.")
    for name, buffer in model.named_buffers():  # non-persistent buffers are not in the state dict
        owner, _, leaf = name.rpartition(".")
        adapted.get_submodule(owner).register_buffer(leaf, buffer, persistent=leaf not in adapted.get_submodule(owner)._non_persistent_buffers_set)
    for name, module in model.named_modules():  # nor are plain tensor attributes (Qwen-Image's RoPE frequencies)
        target = adapted.get_submodule(name)
        for attribute, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                setattr(target, attribute, value)
    adapted.reset_r_embedder()
    adapted.train(model.training)
    return adapted
