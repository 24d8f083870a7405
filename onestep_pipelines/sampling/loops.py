"""Sampling loops over a sigma schedule, for k-diffusion-style denoisers (ComfyUI's KSAMPLER, k-diffusion).

Each loop has k-diffusion's signature ``(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts)``:
``model(x, sigma * s_in, **extra_args)`` returns the denoised ``x0_hat``, ``sigmas`` ends at 0. The update rules
are those of :mod:`.steps` (written once); :class:`SigmaSpace` only says how a denoiser's ``sigma`` maps to
``(alpha, sigma)`` of ``x = alpha x0 + sigma eps``:

* VP models (SD 1.5 / SDXL, epsilon or v) run in the variance-exploding form ``x = x0 + s eps`` with
  ``s = sqrt((1 - abar) / abar)``, i.e. ``alpha = 1``; the VP sample is ``x / sqrt(1 + s^2)``. Time is continuous:
  a sigma between two training sigmas has a fractional timestep (log-linear in sigma, as ComfyUI's
  ``ModelSamplingDiscrete.sigma`` interpolates), so any schedule (Karras, exponential, SGM-uniform, denoise < 1...)
  is sampled at its own sigmas. With ``gamma = 0`` the move lands exactly on the next sigma (Euler / DDIM, no fresh
  noise); the TCD / LCM intermediate time of ``gamma > 0`` is floored on the training grid when the next sigma is a
  training sigma, as :class:`ConsistencyScheduler` does with ``set_alpha_to_one=True``, and is continuous otherwise.
* Rectified-flow models (SD3, Flux, ...): ``x = (1 - s) x0 + s eps``.

Moving between the two forms is exact (``forward_noise_coefficients`` is invariant to the rescaling), so these
loops give the diffusers schedulers' samples on the same model, initial noise and re-noising noise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .presets import check_decreasing, check_num_steps, preset_times, short_list
from .time import flow_sigma_from_trigflow, shift_sigmas, vp_timestep_from_coefficients
from .steps import consistency_step, consistency_target_time, flow_map_step, forward_noise, forward_noise_coefficients


@dataclass(frozen=True)
class SigmaSpace:
    """How a denoiser's ``sigma`` relates to ``(alpha, sigma)``: rectified flow (``flow=True``) or the VE form of
    a VP model with its table of ``discrete_sigmas`` (one per training timestep, increasing)."""

    flow: bool
    discrete_sigmas: torch.Tensor | None = None

    def __post_init__(self):
        if not self.flow and self.discrete_sigmas is None:
            raise ValueError("a VP SigmaSpace needs the model's discrete_sigmas (one per training timestep).")

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` with ``x = alpha x0 + sigma eps``."""
        return (1 - sigma, sigma) if self.flow else (torch.ones_like(sigma), sigma)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest training timestep of a VP ``sigma`` (in log sigma); -1 for ``sigma = 0`` (clean)."""
        table = self.discrete_sigmas.to(sigma.device)
        index = (sigma.clamp_min(1e-12).log() - table.log().view(-1, *[1] * sigma.ndim)).abs().argmin(dim=0)
        return torch.where(sigma > 0, index, -1)

    def continuous_timestep(self, sigma: float) -> float:
        """The fractional training timestep of a VP ``sigma``: log-linear between training sigmas, linear in sigma
        between the clean end (-1, sigma 0) and the first training sigma."""
        table = self.discrete_sigmas.double().cpu()
        if sigma <= 0:
            return -1.0
        if sigma <= table[0]:
            return sigma / float(table[0]) - 1.0
        logs, target = table.log(), math.log(sigma)
        i = min(int(torch.searchsorted(logs, torch.tensor(target, dtype=torch.float64))), len(table) - 1)
        return float(i - 1 + (target - logs[i - 1]) / (logs[i] - logs[i - 1]))

    def sigma_at(self, t: float) -> float:
        """The inverse of :meth:`continuous_timestep`."""
        table = self.discrete_sigmas.double().cpu()
        if t <= -1:
            return 0.0
        if t < 0:
            return (t + 1.0) * float(table[0])
        t = min(t, len(table) - 1.0)
        low, w = int(math.floor(t)), t - math.floor(t)
        high = min(low + 1, len(table) - 1)
        return math.exp((1 - w) * math.log(table[low]) + w * math.log(table[high]))

    def intermediate_sigma(self, sigma_next: torch.Tensor, gamma: float) -> torch.Tensor:
        """Sigma of the intermediate time ``s`` (:func:`consistency_target_time`) before re-noising to ``sigma_next``."""
        if self.flow or gamma == 0.0:  # gamma 0: exactly the next sigma (no re-noising)
            return consistency_target_time(sigma_next, 0.0, gamma)
        t_next = self.continuous_timestep(float(sigma_next))
        on_grid = abs(t_next - round(t_next)) < 1e-3
        s = consistency_target_time(round(t_next) if on_grid else t_next, -1.0, gamma, discrete=on_grid)  # -1 = clean
        return torch.as_tensor(self.sigma_at(s), dtype=sigma_next.dtype)

    def plan(self, sigmas: torch.Tensor, gamma: float) -> list[dict[str, float]]:
        """Per step: ``(alpha, sigma)`` now, ``(alpha_s, sigma_s)`` at the intermediate time, the re-noising
        ``scale`` / ``std`` to ``sigma_next`` and whether to re-noise, as Python floats. Worked out from the schedule
        on the host (one transfer), so that the loops make no host-device synchronisation per step."""
        host = sigmas.detach().to("cpu", torch.float64)
        steps = []
        for sigma, sigma_next in zip(host[:-1], host[1:]):
            sigma_s = self.intermediate_sigma(sigma_next, gamma)
            scale, std = forward_noise_coefficients(*self.coefficients(sigma_s), *self.coefficients(sigma_next))
            values = dict(zip(("alpha", "sigma", "alpha_s", "sigma_s", "scale", "std"), (*self.coefficients(sigma), *self.coefficients(sigma_s), scale, std)))
            steps.append({k: float(v) for k, v in values.items()} | {"renoise": bool(sigma_next > 0 and sigma_s < sigma_next)})
        return steps


def seeded_noise_sampler(x: torch.Tensor, seed: int | None) -> Callable:
    """``noise_sampler(sigma, sigma_next)`` drawing standard normal noise like ``x`` from one seeded generator."""
    generator = torch.Generator(device=x.device)
    if seed is not None:
        generator.manual_seed(int(seed))
    else:
        generator.seed()
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_consistency(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=1.0, space=None, noise_sampler=None):
    """Multistep consistency sampling with a gamma knob (LCM, Luo et al. 2023; TCD, Zheng et al. 2024, Alg. 4).

    Each step predicts ``x0``, moves along the prediction to ``s = (1 - gamma) t_next`` and re-noises to
    ``t_next``; ``gamma = 0`` is DDIM / Euler (and the TDM sampler), ``gamma = 1`` LCM / DMD2."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
    extra_args = {} if extra_args is None else extra_args
    space = SigmaSpace(flow=True) if space is None else space
    noise_sampler = seeded_noise_sampler(x, extra_args.get("seed")) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i, step in enumerate(tqdm(space.plan(sigmas, gamma), disable=disable)):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        eps = (x - step["alpha"] * denoised) / step["sigma"]
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if step["renoise"] else None
        x = consistency_step(denoised, eps, step["alpha_s"], step["sigma_s"], step["scale"], step["std"], noise)
    return x


def with_r_sigma(extra_args: dict, r_sigma: torch.Tensor) -> dict:
    """Default way a flow-map loop hands the target time to a plain denoiser: the keyword ``r_sigma``."""
    return {**extra_args, "r_sigma": r_sigma}


@torch.no_grad()
def sample_flow_map(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=0.0, pass_r=with_r_sigma, noise_sampler=None):
    """Flow-map sampling (MeanFlow, Geng et al. 2025; Align Your Flow, Sabour et al. 2025) for flow models: every
    call gets its target time ``r`` (through ``pass_r(extra_args, r)``) and the sample jumps there,
    ``x_r = x_t - (t - r) u`` with the average velocity ``u = (x_t - x0_hat) / t``. ``r`` is the next sigma, or
    with ``gamma > 0`` the earlier ``s = (1 - gamma) sigma_next``, re-noised to ``sigma_next`` (as
    :class:`FlowMapScheduler`)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = seeded_noise_sampler(x, extra_args.get("seed")) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i, step in enumerate(tqdm(SigmaSpace(flow=True).plan(sigmas, gamma), disable=disable)):
        sigma, r = sigmas[i], step["sigma_s"]
        denoised = model(x, sigma * s_in, **pass_r(extra_args, r * s_in))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = flow_map_step(x, (x - denoised) / step["sigma"], step["sigma"], r)
        if step["renoise"]:
            x = forward_noise(x, step["scale"], step["std"], noise_sampler(sigma, sigmas[i + 1]))
    return x


TIMESTEP_LIST_FORMAT = "comma-separated numbers such as '999,749,499,249' (a decimal point for fractions: '999.5')"
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def parse_timesteps(text: str) -> list[float]:
    """``"999, 749, 499, 249"`` -> ``[999.0, 749.0, 499.0, 249.0]``: decimal numbers separated by commas (spaces around
    them and a trailing comma allowed). Anything else is refused with an error naming the input, not guessed: a ``;``
    (the list separator where the comma is the decimal mark, so ``'999,5;500'`` has no safe reading), an empty entry
    (``'999,,500'``), numbers separated by spaces, brackets, ``nan`` or ``inf``."""
    if ";" in text:
        raise ValueError(f"timesteps: {_echo(text)} separates with ';'; give {TIMESTEP_LIST_FORMAT}.")
    items = [item.strip() for item in text.strip().removesuffix(",").split(",")]
    if items == [""]:
        raise ValueError(f"timesteps: the list is empty; give {TIMESTEP_LIST_FORMAT}.")
    for item in items:
        if not item:
            raise ValueError(f"timesteps: {_echo(text)} has an empty entry between two commas; give {TIMESTEP_LIST_FORMAT}.")
        if not _NUMBER.fullmatch(item):
            raise ValueError(f"timesteps: {_echo(item)} is not a number; give {TIMESTEP_LIST_FORMAT}.")
    return [float(item) for item in items]


def _echo(text: str, limit: int = 60) -> str:
    """A user's input quoted in an error message, its middle left out when it is long."""
    return repr(text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2:]}")


def few_step_sigmas(
    space: SigmaSpace,
    steps: int,
    preset: str = "trailing",
    timesteps: list[float] | None = None,
    shift: float | None = None,
    denoise: float = 1.0,
    flow_shift: Callable | None = None,
    num_train_timesteps: int = 1000,
    original_inference_steps: int = 50,
) -> torch.Tensor:
    """Sigmas (ending with 0) of a few-step schedule in a model's sigma space, equal to the schedule of
    :class:`ConsistencyScheduler` with the same preset (or custom ``timesteps``) on the same model.

    A preset's fractions ``u`` (or custom training timesteps ``t``, ``u = (t + 1) / T`` on a VP grid, ``t / T``
    for flow) become the VP grid's sigma at timestep ``round(u T) - 1``, or for flow models the model's own
    shifted sigma ``flow_shift(u)`` (``shift_sigmas(u, shift)`` when ``shift`` is given). TrigFlow presets (rCM,
    sCM) map by signal-to-noise ratio. ``denoise < 1`` keeps the last ``steps`` of a ``steps / denoise`` schedule
    (as ComfyUI's BasicScheduler).
    """
    T = num_train_timesteps
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}.")
    if shift is not None and (not space.flow or shift <= 0):
        raise ValueError(f"shift={shift}: a shift applies to flow models only and must be > 0.")
    flow_shift = (lambda u: shift_sigmas(u, shift)) if shift is not None else (flow_shift or (lambda u: u))
    if timesteps is not None:
        if denoise != 1.0:
            raise ValueError("denoise applies to presets; with custom timesteps, list only the timesteps to run.")
        if space.flow:  # sigma * T: timestep 0 is the clean end, not a step
            values = check_decreasing(timesteps, "timesteps", 0, T, low_inclusive=False)
        else:
            values = check_decreasing(timesteps, "timesteps", 0, T - 1)
            if not np.all(values == np.round(values)):
                raise ValueError(f"timesteps of a VP model are integers in [0, {T - 1}], got {short_list(values)}.")
        fractions, domain = ((values + 1) / T if not space.flow else values / T), "fraction"
    else:
        steps = check_num_steps(steps)
        total = int(steps / denoise)
        points = preset_times(preset, total, num_train_timesteps=T, original_inference_steps=original_inference_steps)
        fractions, domain = points.values[-steps:], points.domain
    if space.flow:
        if domain == "trigflow":
            sigmas = flow_sigma_from_trigflow(torch.from_numpy(fractions)).float()
        else:
            sigmas = torch.as_tensor(flow_shift(np.asarray(fractions)), dtype=torch.float32)
    else:
        table = space.discrete_sigmas.float().cpu()
        if domain == "trigflow":
            t = torch.from_numpy(fractions)
            index = vp_timestep_from_coefficients(1 / (1 + table.double() ** 2), torch.cos(t), torch.sin(t)).long()
        else:
            index = torch.from_numpy(np.round(np.asarray(fractions) * T) - 1).long()
        sigmas = table[index.clamp(0, len(table) - 1)]
    if len(sigmas) > 1 and not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"{len(sigmas)} steps of this schedule do not give strictly decreasing sigmas ({short_list(sigmas)}); use fewer steps.")
    return torch.cat([sigmas.float(), torch.zeros(1)])
