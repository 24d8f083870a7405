"""Time parametrisations of the forward process and conversions between them.

Every process in this package is written in one affine form,

    x_t = alpha_t * x0 + sigma_t * eps,        eps ~ N(0, I),

and differs only in how the pair (alpha_t, sigma_t) depends on the time variable:

* ``"vp"``: discrete variance preserving diffusion (DDPM, Ho et al. 2020). Time is an integer
  timestep ``t`` in ``[0, T)``; ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` with
  ``abar_t = prod_{i<=t} (1 - beta_i)``.
* ``"flow"``: rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022). Time is
  ``sigma`` in ``[0, 1]``; ``alpha = 1 - sigma``. Models see ``timestep = sigma * T``.
* ``"trigflow"``: TrigFlow (Lu & Song 2024, sCM). Time is an angle ``t`` in ``[0, pi/2]``;
  ``alpha = cos t``, ``sigma = sigma_data * sin t``.

Two times of different parametrisations describe the same noise level when their
signal-to-noise ratios ``alpha / sigma`` agree; the samples then differ only by the scale
``alpha + sigma`` (to flow) or ``sqrt(alpha^2 + (sigma / sigma_data)^2)`` (to TrigFlow).
"""

from __future__ import annotations

import math

import torch

TIME_TYPES = ("vp", "flow", "trigflow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def check_time_type(time_type: str) -> None:
    if time_type not in TIME_TYPES:
        raise ValueError(f"time_type={time_type!r} is not supported; choose one of {list(TIME_TYPES)}.")


# --------------------------------------------------------------------------------------------
# Discrete VP
# --------------------------------------------------------------------------------------------
def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the squared-cosine schedule (Nichol & Dhariwal 2021, eq. 17), ``abar(t) = cos^2((t + s) / (1 + s) * pi / 2)``."""

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale ``sqrt(abar)`` so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def vp_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """``abar_t = prod_{i<=t}(1 - beta_i)`` for a DDPM-style beta schedule, in float32 as diffusers computes it.

    ``"linear"``: betas linear in ``[beta_start, beta_end]`` (Ho et al. 2020); ``"scaled_linear"``: linear in
    ``sqrt(beta)`` (Stable Diffusion); ``"squaredcos_cap_v2"``: cosine schedule (Nichol & Dhariwal 2021).
    With ``rescale_betas_zero_snr`` the final ``abar`` (exactly 0) is clamped to ``2**-24`` so that epsilon
    predictions stay finite there.
    """
    if num_train_timesteps <= 0:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps}.")
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float32)
        if betas.ndim != 1 or betas.numel() != num_train_timesteps:
            raise ValueError(f"trained_betas must hold num_train_timesteps={num_train_timesteps} values, got shape {tuple(betas.shape)}.")
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; choose one of {list(BETA_SCHEDULES)}.")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if rescale_betas_zero_snr:
        alphas_cumprod[-1] = 2**-24
    return alphas_cumprod


def vp_coefficients(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t))`` at integer timesteps."""
    abar = alphas_cumprod[timesteps]
    return abar.sqrt(), (1 - abar).sqrt()


# --------------------------------------------------------------------------------------------
# Rectified flow
# --------------------------------------------------------------------------------------------
def flow_coefficients(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, sigma) = (1 - sigma, sigma)`` for rectified flow."""
    return 1 - sigmas, sigmas


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static resolution shift of SD3 (Esser et al. 2024, eq. 23): ``s * sigma / (1 + (s - 1) * sigma)``."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}.")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift_sigmas(sigmas: torch.Tensor, mu: float, exponent: float = 1.0, shift_type: str = "exponential") -> torch.Tensor:
    """Resolution-dependent shift used by Flux: ``e^mu / (e^mu + (1/sigma - 1)^exponent)`` ("exponential")
    or ``mu / (mu + (1/sigma - 1)^exponent)`` ("linear"); ``mu`` usually comes from :func:`calculate_shift`."""
    ratio = (1 / sigmas - 1) ** exponent
    if shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + ratio)
    if shift_type == "linear":
        return mu / (mu + ratio)
    raise ValueError(f"time_shift_type={shift_type!r} is not supported; choose 'exponential' or 'linear'.")


def stretch_to_terminal(sigmas, terminal: float):
    """Stretch a shifted flow schedule so that its last sigma equals ``terminal`` (LTX-Video's ``shift_terminal``):
    ``1 - (1 - s) (1 - terminal) / (1 - s_last)``. A schedule that ends at pure noise (``s_last = 1``: one step from
    ``sigma = 1``, as a 1-step student of a Qwen-Image teacher samples) has nothing to stretch and is kept as it is,
    where FlowMatchEulerDiscreteScheduler divides by zero and returns NaN sigmas."""
    if not 0.0 < terminal < 1.0:
        raise ValueError(f"shift_terminal must lie in (0, 1), got {terminal}.")
    one_minus = 1 - sigmas
    if float(one_minus[-1]) == 0.0:
        return sigmas
    return 1 - one_minus * ((1 - terminal) / one_minus[-1])


SPACINGS = ("karras", "exponential", "beta")


def respace_sigmas(sigmas, spacing: str):
    """``len(sigmas)`` sigmas between the first and the last of ``sigmas`` with another spacing: ``"karras"`` (Karras
    et al. 2022, eq. 5, rho 7), ``"exponential"`` (log-uniform) or ``"beta"`` (Lee et al. 2024, "Beta Sampling is All
    You Need": quantiles of Beta(0.6, 0.6); needs scipy)."""
    import numpy as np

    sigmas = np.asarray(sigmas, dtype=np.float64)
    hi, lo, n = float(sigmas[0]), float(sigmas[-1]), len(sigmas)
    if spacing == "karras":
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    if spacing == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    if spacing == "beta":
        try:
            from scipy.stats import beta as beta_distribution
        except ImportError:
            raise ImportError("use_beta_sigmas needs scipy: pip install scipy") from None
        return lo + beta_distribution.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6) * (hi - lo)
    raise ValueError(f"sigma spacing {spacing!r} is unknown; choose one of {list(SPACINGS)}.")


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` linear in the number of image tokens between ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


# --------------------------------------------------------------------------------------------
# TrigFlow
# --------------------------------------------------------------------------------------------
def trigflow_coefficients(t: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, sigma) = (cos t, sigma_data * sin t)`` (Lu & Song 2024, sCM eq. 1)."""
    return torch.cos(t), sigma_data * torch.sin(t)


# --------------------------------------------------------------------------------------------
# Conversions (equal signal-to-noise ratio)
# --------------------------------------------------------------------------------------------
def flow_sigma_from_coefficients(alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow time with the same SNR as ``(alpha, sigma)`` and the factor that maps such a sample to it:
    ``sigma_flow = sigma / (alpha + sigma)``, ``x_flow = x / (alpha + sigma)``."""
    scale = alpha + sigma
    return sigma / scale, 1 / scale


def trigflow_t_from_coefficients(alpha: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """TrigFlow angle with the same SNR as ``(alpha, sigma)`` and the sample factor:
    ``t = atan2(sigma / sigma_data, alpha)``, ``x_trig = x / sqrt(alpha^2 + (sigma / sigma_data)^2)``."""
    s = sigma / sigma_data
    return torch.atan2(s, alpha), torch.rsqrt(alpha**2 + s**2)


def flow_sigma_from_trigflow(t: torch.Tensor) -> torch.Tensor:
    """``sigma = sin t / (sin t + cos t)`` with unit data scale (SANA-Sprint, rCM on flow models)."""
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def vp_timestep_from_coefficients(alphas_cumprod: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Nearest VP timestep in log-SNR to the noise level ``(alpha, sigma)`` (``alpha <= 0``, e.g. ``cos(1.5708)``, is
    pure noise: the last timestep)."""
    logsnr_grid = torch.log(alphas_cumprod.double()) - torch.log1p(-alphas_cumprod.double())
    logsnr = 2 * (torch.log(alpha.double().clamp_min(1e-30)) - torch.log(sigma.double().clamp_min(1e-30)))
    return (logsnr_grid[None, :] - logsnr.reshape(-1, 1)).abs().argmin(dim=1).reshape(alpha.shape)
