"""Conversions from what a network predicts to the pair ``(x0_hat, eps_hat)``.

With ``x_t = alpha * x0 + sigma * eps`` (see :mod:`.time`):

* ``"epsilon"`` (Ho et al. 2020):   ``x0 = (x_t - sigma * eps) / alpha``.
* ``"v_prediction"`` (Salimans & Ho 2022), VP only (``alpha^2 + sigma^2 = 1``),
  ``v = alpha * eps - sigma * x0``:  ``x0 = alpha * x_t - sigma * v``, ``eps = alpha * v + sigma * x_t``.
* ``"sample"``: ``x0`` itself; ``eps = (x_t - alpha * x0) / sigma``.
* ``"flow"`` (rectified flow), flow time only, ``u = eps - x0``:
  ``x0 = x_t - sigma * u``, ``eps = x_t + alpha * u``.
* ``"trigflow"`` (Lu & Song 2024, eq. 5), TrigFlow time only, ``F = cos(t) sigma_d eps - sin(t) x0``:
  ``x0 = cos(t) x_t - sin(t) F``, ``eps = (sin(t) x_t + cos(t) F) / sigma_d``.

Epsilon and v-prediction are restricted to VP time because they divide by ``alpha``, which is
exactly 0 at the pure-noise end of flow and TrigFlow trajectories.
"""

from __future__ import annotations

import torch

from .time import check_time_type

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "trigflow")
ALLOWED_PREDICTIONS = {
    "vp": ("epsilon", "v_prediction", "sample"),
    "flow": ("flow", "sample"),
    "trigflow": ("trigflow", "sample"),
}
DEFAULT_PREDICTION = {"vp": "epsilon", "flow": "flow", "trigflow": "trigflow"}


def check_prediction_type(time_type: str, prediction_type: str) -> None:
    """Raise a ``ValueError`` naming the allowed set when ``prediction_type`` cannot be used with ``time_type``."""
    check_time_type(time_type)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is unknown; choose one of {list(PREDICTION_TYPES)}.")
    if prediction_type not in ALLOWED_PREDICTIONS[time_type]:
        raise ValueError(
            f"prediction_type={prediction_type!r} cannot be used with time_type={time_type!r}; "
            f"allowed: {list(ALLOWED_PREDICTIONS[time_type])}."
        )


def to_x0_eps(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
    sigma_data: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x0_hat, eps_hat)`` for a model output at a time with coefficients ``(alpha, sigma)``."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    if prediction_type == "sample":
        return model_output, (sample - alpha * model_output) / sigma
    if prediction_type == "flow":
        return sample - sigma * model_output, sample + alpha * model_output
    if prediction_type == "trigflow":
        sin_t = sigma / sigma_data
        return alpha * sample - sin_t * model_output, (sin_t * sample + alpha * model_output) / sigma_data
    raise ValueError(f"prediction_type={prediction_type!r} is unknown; choose one of {list(PREDICTION_TYPES)}.")


def clip_x0(x0: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Clip the clean-sample estimate to ``[-clip_range, clip_range]`` (DDPM's ``clip_sample``)."""
    return x0.clamp(-clip_range, clip_range)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3): per sample, ``s`` is the ``ratio`` quantile of
    ``|x0|`` clamped to ``[1, max_value]``; ``x0`` is clipped to ``[-s, s]`` and divided by ``s``."""
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape).to(x0.dtype)
