"""Few-step timestep presets, validated.

A preset returns the noise levels of the ``n`` model evaluations in one of two domains (``strength < 1``, for
image-to-image, starts the schedule lower: LCM's rule for the ``lcm`` / ``tcd`` grids, the fractions scaled by
``strength`` for the others):

* ``"fraction"``: the fraction ``u`` in ``(0, 1]`` of the trajectory, equal to ``(t + 1) / T`` for a
  VP timestep ``t`` on a ``T``-step grid, to the (unshifted) flow sigma, and to ``t / (pi / 2)``
  in TrigFlow. This is how diffusers maps "timesteps 999, 749, ..." onto flow models.
* ``"trigflow"``: TrigFlow angles, for presets defined there (rCM, sCM); other time types use
  the time with the same signal-to-noise ratio.

Presets:

* ``"lcm"`` / ``"tcd"``: ``n`` evenly indexed entries of the ``original_inference_steps`` grid
  ``t_k = k * (T // original) - 1`` (Luo et al. 2023; diffusers' LCMScheduler and TCDScheduler share it),
  e.g. 4 steps = 999, 759, 499, 259.
* ``"dmd2"``: DMD2's trained 4-step grid 999, 749, 499, 249 (Yin et al. 2024) and its trailing
  subsets for 1 and 2 steps (999; 999, 499). At most 4 steps.
* ``"tdm"``: TDM's uniform boundaries ``t_k = T - k T / n - 1`` (Luo et al. 2025; any ``n``).
* ``"trailing"`` (alias ``"uniform"``): ``u_k = 1 - k / n``.
* ``"linspace"``: ``n`` points evenly spaced from ``1`` to ``linspace_end`` (default ``1 / T``): the stock default grid
  of FlowMatchEulerDiscreteScheduler and FlowMatchLCMScheduler (their ``linspace(sigma_max, sigma_min)``; a flow
  scheduler passes the shifted ``1 / T`` as the end, as they do) and DDIM's ``"linspace"`` spacing on a VP grid.
* ``"rcm"``: rCM's TrigFlow times ``atan(80), 1.5, 1.4, 1.0`` (first ``n``; Zheng et al. 2025). At most 4 steps.
* ``"scm"``: diffusers' SCMScheduler grid: ``1.5708, 1.3`` for 2 steps, ``linspace(1.5708, 0, n + 1)`` otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PRESETS = ("lcm", "tcd", "dmd2", "tdm", "trailing", "uniform", "linspace", "rcm", "scm")
MAX_STEPS = {"dmd2": 4, "rcm": 4}
RCM_TIMES = (math.atan(80.0), 1.5, 1.4, 1.0)
SCM_MAX_TIME = 1.5708
SCM_INTERMEDIATE_TIME = 1.3


@dataclass(frozen=True)
class TimePoints:
    """Noise levels of a preset: ``values`` (float64, strictly decreasing) in ``domain`` ("fraction" | "trigflow")."""

    values: np.ndarray
    domain: str


def short_list(values, limit: int = 8) -> str:
    """``values`` for an error message: all of them when few, else the first and last ``limit // 2`` and the count."""
    values = [round(float(v), 4) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    if len(values) <= limit:
        return str(values)
    return f"[{', '.join(map(str, values[: limit // 2]))}, ..., {', '.join(map(str, values[-limit // 2:]))}] ({len(values)} values)"


def check_num_steps(num_inference_steps, limit: int | None = None, what: str = "") -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
    if num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps}.")
    if limit is not None and num_inference_steps > limit:
        raise ValueError(f"num_inference_steps={num_inference_steps} is more than {what} allows (at most {limit}).")
    return int(num_inference_steps)


def check_decreasing(values, name: str, low: float, high: float, low_inclusive: bool = True) -> np.ndarray:
    """Validate a custom schedule: 1-D, finite, strictly decreasing, inside ``[low, high]``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D list, got {str(values)[:100]!s}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {short_list(arr)}.")
    if arr.size > 1 and not np.all(np.diff(arr) < 0):
        raise ValueError(f"{name} must be strictly decreasing, got {short_list(arr)}.")
    below = arr.min() < low if low_inclusive else arr.min() <= low
    if below or arr.max() > high:
        bracket = "[" if low_inclusive else "("
        raise ValueError(f"{name} must lie in {bracket}{low:g}, {high:g}], got {short_list(arr)}.")
    return arr


def _grid_fractions(timesteps: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    return (timesteps.astype(np.float64) + 1.0) / num_train_timesteps


def preset_times(
    preset: str,
    num_inference_steps: int,
    *,
    num_train_timesteps: int = 1000,
    original_inference_steps: int = 50,
    strength: float = 1.0,
    linspace_end: float | None = None,
) -> TimePoints:
    """Noise levels of ``preset`` for ``num_inference_steps`` model evaluations (see module docstring)."""
    if preset not in PRESETS:
        raise ValueError(f"timestep preset {preset!r} is unknown; choose one of {list(PRESETS)}.")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength}.")
    T = num_train_timesteps
    if preset in ("lcm", "tcd"):  # LCMScheduler.set_timesteps / TCDScheduler.set_timesteps
        if not 0 < original_inference_steps <= T:
            raise ValueError(f"original_inference_steps must be in [1, {T}], got {original_inference_steps}.")
        origin = (np.arange(1, int(original_inference_steps * strength) + 1) * (T // original_inference_steps) - 1)[::-1]
        what = f"the {preset} preset with original_inference_steps={original_inference_steps}" + (f" and strength={strength}" if strength < 1 else "")
        n = check_num_steps(num_inference_steps, len(origin), what)
        idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        return TimePoints(_grid_fractions(origin[idx], T), "fraction")
    if preset in ("rcm", "scm"):
        if strength != 1.0:
            raise ValueError(f"strength < 1 is not defined for the {preset} preset; pass custom timesteps.")
        if preset == "rcm":
            n = check_num_steps(num_inference_steps, MAX_STEPS["rcm"], "the rcm preset")
            return TimePoints(np.asarray(RCM_TIMES[:n], dtype=np.float64), "trigflow")
        n = check_num_steps(num_inference_steps)
        if n == 2:
            return TimePoints(np.asarray([SCM_MAX_TIME, SCM_INTERMEDIATE_TIME]), "trigflow")
        return TimePoints(np.linspace(SCM_MAX_TIME, 0.0, n + 1)[:-1], "trigflow")
    if preset in ("trailing", "uniform"):
        n = check_num_steps(num_inference_steps)
        fractions = 1.0 - np.arange(n, dtype=np.float64) / n
    elif preset == "linspace":
        n = check_num_steps(num_inference_steps)
        fractions = np.linspace(1.0, 1.0 / T if linspace_end is None else linspace_end, n)
    else:  # dmd2, tdm
        n = check_num_steps(num_inference_steps, MAX_STEPS.get(preset, T), f"the {preset} preset")
        fractions = _grid_fractions(np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1, T)
    return TimePoints(fractions * strength, "fraction")
