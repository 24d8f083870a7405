"""Schedules: the noise levels of one generation, and the per-step constants of an update rule on each device.

:func:`native_times` turns ``set_timesteps``' arguments (a preset and a step count, custom timesteps or sigmas, a flow
shift, an image-to-image strength) into the native times of the model evaluations: VP timesteps (integers, -1 =
clean), flow sigmas in (0, 1], TrigFlow angles. :class:`StepTables` keeps the constants a step needs (computed once
on the host in float64 by the scheduler from the sampling core's functions) and copies them once to each device and
dtype they are used on, with a pinned, non-blocking copy on CUDA: a generation's steps neither read from nor write to
the host, and a second generation with the same schedule copies nothing at all.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch

from ..sampling import (
    check_decreasing,
    dynamic_shift_sigmas,
    flow_sigma_from_trigflow,
    preset_times,
    shift_sigmas,
    vp_timestep_from_coefficients,
)
from ..sampling.presets import short_list
from ..sampling.time import respace_sigmas, stretch_to_terminal
from .stock_configs import SPACING_FLAGS


def flow_shift(config, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
    """The config's static (SD3) or ``mu``-dependent (Flux) shift of flow sigmas."""
    if config.use_dynamic_shifting:
        if mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting=True (the pipeline computes it from the image size).")
        return dynamic_shift_sigmas(sigmas, mu, 1.0, config.time_shift_type)
    return shift_sigmas(sigmas, config.shift) if config.shift != 1.0 else sigmas


def shape_flow_sigmas(config, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler's sigma pipeline: shift, stretch to ``shift_terminal``, re-space (Karras,
    exponential or beta) when the config asks for it."""
    sigmas = flow_shift(config, np.asarray(sigmas, dtype=np.float64), mu)
    if config.get("shift_terminal"):
        sigmas = stretch_to_terminal(sigmas, config.shift_terminal)
    spacing = [kind for flag, kind in SPACING_FLAGS.items() if config.get(flag)]
    if spacing:
        sigmas = respace_sigmas(sigmas, spacing[0])
    return sigmas


def check_trained_times(values, time_type: str, num_train_timesteps: int) -> list:
    """A scheduler's ``trained_times`` as a list, validated in its time type's native domain: VP timesteps are
    integers in ``[0, T - 1]``, flow sigmas lie in ``(0, 1]``, TrigFlow angles in ``(0, pi/2]``; strictly decreasing."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
        raise ValueError(f"trained_times must be a non-empty list of times, got {values!r}.")
    if time_type == "vp":
        arr = check_decreasing(values, "trained_times", 0, num_train_timesteps - 1)
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"trained_times of a VP scheduler are integer timesteps in [0, {num_train_timesteps - 1}], got {short_list(arr)}.")
        return [int(t) for t in arr]
    high = 1.0 if time_type == "flow" else math.pi / 2
    return [float(t) for t in check_decreasing(values, "trained_times", 0, high, low_inclusive=False)]


def native_times(
    config,
    alphas_cumprod: torch.Tensor | None,
    num_inference_steps: int | None = None,
    timesteps=None,
    sigmas=None,
    mu: float | None = None,
    strength: float = 1.0,
    original_inference_steps: int | None = None,
    shift_custom_timesteps: bool = False,
) -> np.ndarray:
    """Native times of the model evaluations (float64) from ``set_timesteps``' arguments.

    Custom ``timesteps`` are model timesteps: integers in ``[0, T)`` for VP (with ``strength < 1`` the first steps are
    dropped, as LCM / TCD do), values in ``(0, T]`` for flow, angles in ``(0, pi/2]`` for TrigFlow. Flow sigmas come
    from custom ``sigmas`` when given, else from ``timesteps / T``, and go through the config's shift (and
    ``shift_terminal`` / re-spacing) as in FlowMatchEulerDiscreteScheduler; with ``shift_custom_timesteps`` custom
    timesteps get the static or ``mu`` shift alone, as FlowMapEulerDiscreteScheduler does. Which model timesteps go
    with those sigmas is the scheduler's choice (:meth:`FewStepSchedulerMixin.set_timesteps`).
    """
    T = config.num_train_timesteps
    trained = config.get("trained_times")
    if trained and timesteps is None and sigmas is None and strength == 1.0 and num_inference_steps in (None, len(trained)):
        return np.asarray(trained, dtype=np.float64)  # where the student was trained (see the schedulers' docstrings)
    if timesteps is not None and sigmas is not None:
        if config.time_type != "flow":
            raise ValueError("Pass either `timesteps` or `sigmas` to set_timesteps, not both (both together: flow only).")
        if len(timesteps) != len(sigmas):
            raise ValueError(f"`sigmas` ({len(sigmas)}) and `timesteps` ({len(timesteps)}) must have the same length.")
        check_decreasing(host_array(timesteps), "timesteps", 0, T, low_inclusive=False)
        timesteps = None  # the sigmas set the noise levels; the scheduler gives the model the timesteps as passed
    custom = timesteps if timesteps is not None else sigmas
    if num_inference_steps is None and custom is None:
        raise ValueError("set_timesteps needs `num_inference_steps`, `timesteps` or `sigmas`.")
    if custom is not None:
        custom = host_array(custom)
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Pass either `num_inference_steps` or custom `timesteps` to set_timesteps, not both (as LCM / TCD).")
        if num_inference_steps is not None and len(custom) != num_inference_steps:
            raise ValueError(f"num_inference_steps={num_inference_steps} does not match the {len(custom)} custom sigmas given.")
    time_type = config.time_type
    if timesteps is not None:
        if time_type == "vp":
            arr = check_decreasing(custom, "timesteps", 0, T - 1)
            if not np.all(arr == np.round(arr)):
                raise ValueError(f"VP timesteps must be integers in [0, {T - 1}], got {short_list(arr)}.")
            keep = min(int(len(arr) * strength), len(arr))  # LCMScheduler / TCDScheduler with strength < 1
            return arr[len(arr) - keep:] if strength < 1 else arr
        if time_type == "flow":
            arr = check_decreasing(custom, "timesteps", 0, T, low_inclusive=False) / T
            return flow_shift(config, arr, mu) if shift_custom_timesteps else shape_flow_sigmas(config, arr, mu)
        return check_decreasing(custom, "timesteps", 0, math.pi / 2 + 1e-4, low_inclusive=False)
    if sigmas is not None:
        if time_type != "flow":
            raise ValueError(f"`sigmas` are accepted for time_type='flow' only (got {time_type!r}); pass `timesteps`.")
        return shape_flow_sigmas(config, check_decreasing(custom, "sigmas", 0, 1, low_inclusive=False), mu)
    preset = config.timestep_preset or ("scm" if time_type == "trigflow" else "trailing")
    linspace_end = None
    if time_type == "flow" and not config.use_dynamic_shifting:  # FlowMatchEuler's sigma_min: 1 / T, shifted once already
        linspace_end = float(flow_shift(config, np.asarray([1.0 / T]), None)[0])
    points = preset_times(
        preset, num_inference_steps, num_train_timesteps=T, original_inference_steps=original_inference_steps or config.original_inference_steps,
        strength=strength, linspace_end=linspace_end,
    )
    if points.domain == "trigflow":
        t = torch.from_numpy(points.values)
        if time_type == "vp":
            times = vp_timestep_from_coefficients(alphas_cumprod, torch.cos(t), torch.sin(t)).double().numpy()
        elif time_type == "flow":
            times = flow_sigma_from_trigflow(t).numpy()
        else:
            times = points.values
    else:
        u = points.values
        if time_type == "vp":
            times = np.round(u * T) - 1
        elif time_type == "flow":
            times = shape_flow_sigmas(config, u, mu)
        else:
            times = u * (math.pi / 2)
    if times.size > 1 and not np.all(np.diff(times) < 0):
        raise ValueError(
            f"num_inference_steps={num_inference_steps} is more than the {preset!r} preset allows on this "
            f"{time_type} grid: the timesteps {short_list(times)} are not strictly decreasing."
        )
    return times


def host_array(values) -> np.ndarray:
    """Custom timesteps or sigmas (list, array or tensor) as a float64 host array."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def to_device(array, device, dtype: torch.dtype) -> torch.Tensor:
    """A host array on ``device`` in ``dtype``: pinned and non-blocking on CUDA, so the host does not wait."""
    tensor = torch.as_tensor(np.ascontiguousarray(array)).to(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class StepTables:
    """Per-step constants of one schedule, as Python numbers: a step passes them to its kernels as scalars (computed
    in float32 inside the kernel, also for half-precision tensors), so nothing is copied to the device and nothing is
    read back.

    ``columns`` is ``{name: float64 array of one value per step}``; ``rows[i]`` is step ``i``'s tuple in the order of
    ``names``. A coefficient of the sample (a name ending in ``_x``) that is 1 at every step is None instead, so the
    step skips that product (an Euler move is then one fused multiply-add, as in the stock schedulers).
    """

    def __init__(self, names: tuple[str, ...], columns: dict[str, np.ndarray]):
        table = np.stack([np.asarray(columns[n], dtype=np.float64) for n in names], axis=1)
        unit = [n.endswith("_x") and bool(np.all(np.abs(table[:, j] - 1.0) < 1e-12)) for j, n in enumerate(names)]
        self.rows = [tuple(None if u else float(v) for u, v in zip(unit, row)) for row in table]


def combine(a: float | None, x: torch.Tensor, b: float, out: torch.Tensor) -> torch.Tensor:
    """``a x + b out`` in one kernel, or two (``a`` None means 1), in the dtype of ``x``."""
    return torch.add(x if a is None else x * a, out, alpha=b)


class LRU(OrderedDict):
    """A small least-recently-used cache."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.size = size

    def get_or_make(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


def linear_in_input(rule, columns: dict) -> dict[str, torch.Tensor]:
    """Constants of an update ``rule(x, model_output, columns) -> {name: value}`` that is linear in ``(x, output)``:
    ``value = name_x * x + name_out * output``, read off by evaluating the rule (the sampling core's functions) on
    the inputs ``(1, 0)`` and ``(0, 1)`` of every step at once. No rule is written a second time."""
    n = len(next(iter(columns.values())))
    one, zero = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    by_x, by_out = rule(one, zero, columns), rule(zero, one, columns)
    return {f"{k}_x": by_x[k] for k in by_x} | {f"{k}_out": by_out[k] for k in by_out}
