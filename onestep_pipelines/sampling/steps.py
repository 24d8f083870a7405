"""Update rules of few-step samplers. Each rule is written once, here.

All rules act on coefficients ``(alpha, sigma)`` of ``x = alpha * x0 + sigma * eps`` (see
:mod:`.time`), so the same function serves VP, flow and TrigFlow times. Noise is injected by the
caller (``noise``), never drawn here.
"""

from __future__ import annotations

import math

import torch


def forward_noise_coefficients(
    alpha_s: torch.Tensor, sigma_s: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean scale and standard deviation of ``q(x_t | x_s)`` for a time ``t`` noisier than ``s``
    (Kingma et al. 2021, eq. 4):

        x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) z.

    For VP this is ``sqrt(abar_t / abar_s)`` and ``sqrt(1 - abar_t / abar_s)`` (TCD's re-noising); from
    clean data (``alpha_s = 1, sigma_s = 0``) it is ``alpha_t`` and ``sigma_t`` (LCM's).
    """
    scale = alpha_t / alpha_s
    return scale, (sigma_t**2 - (scale * sigma_s) ** 2).clamp(min=0).sqrt()


def vp_forward_noise_coefficients(abar_s: torch.Tensor, abar_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward_noise_coefficients` in VP form, ``sqrt(abar_t / abar_s)`` and ``sqrt(1 - abar_t / abar_s)``,
    evaluated in this order (as diffusers' TCD does) so that float32 results agree bit for bit."""
    ratio = abar_t / abar_s
    return ratio.sqrt(), (1 - ratio).clamp(min=0).sqrt()


def forward_noise(x_s: torch.Tensor, scale: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample ``q(x_t | x_s) = N(scale * x_s, std^2)`` with the given ``noise`` (see :func:`forward_noise_coefficients`)."""
    return scale * x_s + std * noise


def consistency_target_time(t_next, t_end, gamma: float, discrete: bool = False):
    """Intermediate time ``s`` of strategic stochastic sampling (TCD, Zheng et al. 2024, Alg. 4):

        s = t_end + (1 - gamma) (t_next - t_end),

    floored on a discrete grid. ``gamma = 0`` gives ``s = t_next`` (deterministic DDIM/Euler move),
    ``gamma = 1`` gives ``s = t_end`` (back to the end of the trajectory, i.e. LCM's full re-noise).
    ``t_end`` is the end of the trajectory: 0 for flow and TrigFlow, -1 ("clean", LCM/DDIM with
    ``set_alpha_to_one``) or 0 (TCD's convention) on the VP grid.
    """
    s = t_end + (1.0 - gamma) * (t_next - t_end)
    return math.floor(s) if discrete else s


def consistency_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_s: torch.Tensor,
    sigma_s: torch.Tensor,
    renoise_scale: torch.Tensor | None = None,
    renoise_std: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One consistency / TCD step with a gamma knob (Song et al. 2023; Luo et al. 2023; Zheng et al. 2024).

    Move deterministically along the predicted trajectory to ``s`` (see :func:`consistency_target_time`),
    ``x_s = alpha_s x0 + sigma_s eps``, then forward-noise from ``s`` to the next time with fresh
    ``noise`` and the coefficients of :func:`forward_noise_coefficients`. Without ``noise`` (``gamma = 0``
    or the last step) ``s`` is the next time and ``x_s`` is returned. With ``gamma = 0`` this is DDIM
    (eta 0) for VP and exactly the Euler step ``x + (sigma_next - sigma) u`` for flow; it is also the TDM
    sampler's move.
    """
    x_s = alpha_s * x0 + sigma_s * eps
    if noise is None:
        return x_s
    return forward_noise(x_s, renoise_scale, renoise_std, noise)


def flow_map_step(sample: torch.Tensor, u: torch.Tensor, sigma_t: torch.Tensor, sigma_r: torch.Tensor) -> torch.Tensor:
    """Flow-map jump with an average velocity (MeanFlow, Geng et al. 2025, eq. 2; Align Your Flow,
    Sabour et al. 2025; shortcut models, Frans et al. 2024):

        x_r = x_t - (t - r) u(x_t, r, t).

    With ``r = 0`` this is one-step generation; with ``u`` the instantaneous velocity it is Euler.
    """
    return sample - (sigma_t - sigma_r) * u
