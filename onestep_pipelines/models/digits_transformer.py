"""A small class-conditional DiT with an optional second time ``r`` (for the embedded digits benchmark)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017; DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _TimeMLP(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class DigitsTransformerBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie 2023)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, int(hidden * mlp_ratio)), nn.GELU(approximate="tanh"), nn.Linear(int(hidden * mlp_ratio), hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        b, n, d = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.proj(h)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


@dataclass
class DigitsTransformerOutput(BaseOutput):
    """Output of :class:`DigitsTransformer2DModel`: ``sample``, the predicted velocity (the input's shape; a policy
    student's: ``out_channels`` channels)."""

    sample: torch.Tensor


class DigitsTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""Class-conditional DiT (Peebles & Xie 2023) for small images, with an optional second time.

    ``forward(sample, timestep, class_labels, r_timestep=None)`` predicts a rectified-flow velocity
    (teacher) or, given ``r_timestep``, an average velocity ``u(x_t, r, t)`` (MeanFlow / flow-map
    students). The second time enters as an embedding of the interval ``t - r`` (MeanFlow's
    ``(t, t - r)`` conditioning, Geng et al. 2025) added to the conditioning vector through a
    zero-initialised output layer, so that without ``r``, or with ``r`` at initialisation, the model is
    exactly the one-time flow model. Class ``num_classes`` is the null class for classifier-free guidance.

    Args:
        sample_size (`int`, defaults to 8): image height and width.
        in_channels (`int`, defaults to 1): image channels.
        patch_size (`int`, defaults to 1): square patch size.
        hidden_size (`int`, defaults to 128): token width.
        depth (`int`, defaults to 4): number of transformer blocks.
        num_heads (`int`, defaults to 4): attention heads.
        num_classes (`int`, defaults to 10): number of real classes (one more embedding is the null class).
        num_train_timesteps (`int`, defaults to 1000): timesteps are ``sigma * num_train_timesteps``.
        out_channels (`int`, *optional*): output channels (default: ``in_channels``); a pi-Flow policy student
            outputs its policy's parameters (:func:`~onestep_pipelines.sampling.policies.policy_channels`).
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["DigitsTransformerBlock"]  # the unit FSDP wraps (accelerate's transformer-based policy)

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 1,
        patch_size: int = 1,
        hidden_size: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        num_classes: int = 10,
        num_train_timesteps: int = 1000,
        out_channels: int | None = None,
    ):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"sample_size={sample_size} must be divisible by patch_size={patch_size}.")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
        tokens = (sample_size // patch_size) ** 2
        self.patch = nn.Linear(in_channels * patch_size**2, hidden_size)
        self.pos = nn.Parameter(torch.randn(1, tokens, hidden_size) * 0.02)
        self.t_embed = _TimeMLP(hidden_size)
        self.r_embed = _TimeMLP(hidden_size)
        nn.init.zeros_(self.r_embed.mlp[2].weight)  # zero-init: r has no effect until trained
        nn.init.zeros_(self.r_embed.mlp[2].bias)
        self.y_embed = nn.Embedding(num_classes + 1, hidden_size)
        self.blocks = nn.ModuleList([DigitsTransformerBlock(hidden_size, num_heads) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.out = nn.Linear(hidden_size, (out_channels or in_channels) * patch_size**2)
        for layer in (self.ada_out[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor,
        r_timestep: torch.Tensor | float | None = None,
        return_dict: bool = True,
    ):
        cfg = self.config
        b, c, h, w = sample.shape
        if (c, h, w) != (cfg.in_channels, cfg.sample_size, cfg.sample_size):
            raise ValueError(
                f"sample has shape {tuple(sample.shape)}; this model expects (batch, {cfg.in_channels}, {cfg.sample_size}, {cfg.sample_size})."
            )
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(b)
        labels = torch.as_tensor(class_labels)
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():  # checked where it costs no device sync
            if labels.numel() and (labels.min() < 0 or labels.max() > cfg.num_classes):
                raise ValueError(f"class_labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = null class), got {labels.tolist()}.")
        labels = labels.to(sample.device).long().reshape(-1).expand(b)
        cond = self.t_embed(t) + self.y_embed(labels)
        if r_timestep is not None:
            r = torch.as_tensor(r_timestep, device=sample.device).float().reshape(-1).expand(b)
            cond = cond + self.r_embed(t - r)
        p = cfg.patch_size
        x = sample.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        x = self.patch(x) + self.pos
        for block in self.blocks:
            x = block(x, cond)
        shift, scale = self.ada_out(cond)[:, None].chunk(2, dim=-1)
        x = self.out(self.norm_out(x) * (1 + scale) + shift)
        c_out = cfg.out_channels or c
        x = x.reshape(b, h // p, w // p, c_out, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c_out, h, w)
        if not return_dict:
            return (x,)
        return DigitsTransformerOutput(sample=x)
