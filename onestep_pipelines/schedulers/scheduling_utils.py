"""Conventions shared by the few-step schedulers: time types, schedules, step bookkeeping.

The math lives in :mod:`onestep_pipelines.sampling`; this module only turns diffusers' conventions
(``set_timesteps`` arguments, model timesteps, ``from_config`` of stock schedulers) into the
per-step coefficients that the core functions consume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..sampling import (
    DEFAULT_PREDICTION,
    TIME_TYPES,
    check_decreasing,
    check_num_steps,
    check_prediction_type,
    check_time_type,
    consistency_target_time,
    dynamic_shift_sigmas,
    flow_coefficients,
    forward_noise_coefficients,
    flow_sigma_from_trigflow,
    preset_times,
    shift_sigmas,
    trigflow_coefficients,
    vp_alphas_cumprod,
    vp_forward_noise_coefficients,
    vp_timestep_from_coefficients,
)

# Stock schedulers whose configs ``from_config`` understands (diffusers lists compatibles by name).
STOCK_COMPATIBLES = [
    "DDPMScheduler",
    "DDIMScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchLCMScheduler",
    "FlowMapEulerDiscreteScheduler",
    "SCMScheduler",
]
_VP_KEYS = ("beta_schedule", "beta_start", "beta_end", "trained_betas")
_FLOW_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift")


@dataclass
class FewStepSchedulerOutput(BaseOutput):
    """Output of a few-step scheduler's ``step``.

    Args:
        prev_sample (`torch.Tensor`): the sample at the next time of the schedule, input to the next model call.
        denoised (`torch.Tensor`): the clean-sample estimate ``x0_hat`` of this step (for previews and callbacks).
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


def infer_source_config(config: dict, infer_preset: bool = True) -> dict:
    """Translate a stock diffusers scheduler config into our keys (time type, prediction type, preset).

    Stock LCM and TCD configs are identical, so their differences (TCD's ``gamma`` 0.3, its trajectories
    ending at timestep 0; LCM's boundary condition) are applied only when the config names its class
    (``_class_name``, present in configs loaded from JSON).
    """
    src = dict(config)
    if "time_type" in src:  # already ours
        return src
    # diffusers drops the keys listed in `_use_default_values` when another class reads a config; the
    # source scheduler's defaults (e.g. DDPM's linear betas) are real values for us, so keep them all.
    out = {k: v for k, v in src.items() if k != "_use_default_values"}
    name = src.get("_class_name")
    if src.get("prediction_type") == "trigflow":
        out["time_type"] = "trigflow"
        if infer_preset:
            out["timestep_preset"] = "scm"
    elif any(k in src for k in _VP_KEYS):
        out["time_type"] = "vp"
        if infer_preset and "original_inference_steps" in src:
            out["timestep_preset"] = "tcd" if name == "TCDScheduler" else "lcm"
    elif any(k in src for k in _FLOW_KEYS):
        out["time_type"] = "flow"
        out["prediction_type"] = "flow"
    if name == "TCDScheduler":
        out.setdefault("gamma", 0.3)
        out["set_alpha_to_one"] = False
    elif name == "LCMScheduler":
        out["lcm_boundary_condition"] = True
    return out


class FewStepSchedulerMixin(SchedulerMixin, ConfigMixin):
    """Base of :class:`ConsistencyScheduler`, :class:`FlowMapScheduler` and :class:`TDMScheduler`.

    Subclasses register their config in ``__init__`` and call :meth:`_setup`. Subclass hooks:
    ``_allowed_time_types``, ``_infer_preset`` and the ``_gamma`` property.
    """

    _compatibles = STOCK_COMPATIBLES
    order = 1
    _allowed_time_types = TIME_TYPES
    _infer_preset = True

    # ---------------------------------------------------------------------------------- config
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build from our own config or from a stock scheduler's config (DDPM, DDIM, LCM, TCD, Euler,
        FlowMatchEuler, FlowMatchLCM, FlowMapEuler, SCM), keeping its time parametrisation and
        prediction type. Keyword arguments override the config."""
        if isinstance(config, dict):
            config = infer_source_config(config, infer_preset=cls._infer_preset)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def _gamma(self) -> float:
        return float(self.config.gamma)

    def _setup(self) -> None:
        cfg = self.config
        check_time_type(cfg.time_type)
        if cfg.time_type not in self._allowed_time_types:
            raise ValueError(
                f"{type(self).__name__} does not support time_type={cfg.time_type!r}; allowed: {list(self._allowed_time_types)}."
            )
        prediction_type = cfg.prediction_type or DEFAULT_PREDICTION[cfg.time_type]
        check_prediction_type(cfg.time_type, prediction_type)
        if prediction_type != cfg.prediction_type:
            self.register_to_config(prediction_type=prediction_type)
        gamma = self._gamma
        if not (isinstance(gamma, (int, float)) and 0.0 <= gamma <= 1.0):
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}.")
        if cfg.time_type != "flow" and (cfg.shift != 1.0 or cfg.use_dynamic_shifting):
            raise ValueError(
                f"shift={cfg.shift} / use_dynamic_shifting={cfg.use_dynamic_shifting} apply to time_type='flow' only, "
                f"not {cfg.time_type!r}."
            )
        if cfg.shift <= 0:
            raise ValueError(f"shift must be > 0, got {cfg.shift}.")
        if cfg.time_type == "trigflow" and cfg.sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {cfg.sigma_data}.")
        T = cfg.num_train_timesteps
        if cfg.time_type == "vp":
            self.alphas_cumprod = vp_alphas_cumprod(
                T, cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.trained_betas, cfg.rescale_betas_zero_snr
            )
            self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.long)
        else:
            self.alphas_cumprod = None
            self.timesteps = torch.linspace(T, 1, T, dtype=torch.float32)
        self.init_noise_sigma = float(cfg.sigma_data) if cfg.time_type == "trigflow" else 1.0
        self.num_inference_steps = None
        self.sigmas = None
        self._step_index = None
        self._begin_index = None
        self._first_nonfinite = None

    # ------------------------------------------------------------------------------- time math
    @property
    def _t_end(self) -> float:
        """End of the trajectory in native time (-1 = clean on the VP grid)."""
        if self.config.time_type == "vp":
            return -1.0 if self.config.set_alpha_to_one else 0.0
        return 0.0

    def _coefficients(self, times: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` at native times: VP timesteps (-1 = clean), flow sigmas, TrigFlow angles."""
        if self.config.time_type == "vp":  # from float32 abar like diffusers' VP schedulers, for step-exact parity
            abar = self._abar(times)
            return abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype)
        if self.config.time_type == "flow":
            return flow_coefficients(times.to(dtype))
        return trigflow_coefficients(times.to(dtype), self.config.sigma_data)

    def coefficients_at(self, times, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` at native times (VP timesteps with -1 = clean, flow sigmas, TrigFlow angles), on the
        device of ``times`` (no host round trip): the forward process this scheduler samples, for trainers that noise
        data the same way."""
        return self._coefficients(torch.as_tensor(times), dtype=dtype)

    def native_times(self, timesteps) -> torch.Tensor:
        """Native times of model ``timesteps`` (the inverse of the units of ``self.timesteps``)."""
        timesteps = torch.as_tensor(timesteps)
        if self.config.time_type == "flow":
            return timesteps.double() / self.config.num_train_timesteps
        return timesteps.double() if self.config.time_type == "trigflow" else timesteps.long()

    def _abar(self, times: torch.Tensor) -> torch.Tensor:
        """float32 ``alphas_cumprod`` at VP timesteps, 1 at the clean end (-1), on the device of ``times``."""
        idx = torch.as_tensor(times).long()
        if self.alphas_cumprod.device != idx.device:  # copied to that device once, not per call
            cached = getattr(self, "_alphas_cumprod_on", None)
            if cached is None or cached.device != idx.device:
                self._alphas_cumprod_on = cached = self.alphas_cumprod.to(idx.device)
        else:
            cached = self.alphas_cumprod
        abar = cached[idx.clamp(min=0)]
        return torch.where(idx < 0, torch.ones_like(abar), abar)

    def _model_timesteps(self, times: np.ndarray, device) -> torch.Tensor:
        if self.config.time_type == "vp":
            return torch.from_numpy(np.asarray(times).astype(np.int64)).to(device)
        if self.config.time_type == "flow":
            return torch.from_numpy(np.asarray(times) * self.config.num_train_timesteps).to(device=device, dtype=torch.float32)
        return torch.from_numpy(np.asarray(times)).to(device=device, dtype=torch.float32)

    def _shift(self, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
        cfg = self.config
        if cfg.use_dynamic_shifting:
            if mu is None:
                raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting=True.")
            return dynamic_shift_sigmas(sigmas, mu, 1.0, cfg.time_shift_type)
        return shift_sigmas(sigmas, cfg.shift) if cfg.shift != 1.0 else sigmas

    def _native_times(self, num_inference_steps, timesteps, sigmas, mu) -> np.ndarray:
        """Native times of the model evaluations from ``timesteps``, ``sigmas`` or the preset."""
        cfg = self.config
        T = cfg.num_train_timesteps
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass either `timesteps` or `sigmas` to set_timesteps, not both.")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("set_timesteps needs `num_inference_steps`, `timesteps` or `sigmas`.")
        custom = timesteps if timesteps is not None else sigmas
        if custom is not None:
            if isinstance(custom, torch.Tensor):
                custom = custom.detach().cpu().double().numpy()
            if num_inference_steps is not None and len(custom) != num_inference_steps:
                raise ValueError(f"num_inference_steps={num_inference_steps} does not match the {len(custom)} custom values given.")
        if timesteps is not None:
            if cfg.time_type == "vp":
                arr = check_decreasing(custom, "timesteps", 0, T - 1)
                if not np.all(arr == np.round(arr)):
                    raise ValueError(f"VP timesteps must be integers, got {arr.tolist()}.")
                return arr
            if cfg.time_type == "flow":
                return check_decreasing(custom, "timesteps", 0, T, low_inclusive=False) / T
            return check_decreasing(custom, "timesteps", 0, math.pi / 2 + 1e-4, low_inclusive=False)
        if sigmas is not None:
            if cfg.time_type != "flow":
                raise ValueError(f"`sigmas` are accepted for time_type='flow' only (got {cfg.time_type!r}); pass `timesteps`.")
            return self._shift(check_decreasing(custom, "sigmas", 0, 1, low_inclusive=False), mu)
        preset = cfg.timestep_preset or ("scm" if cfg.time_type == "trigflow" else "trailing")
        points = preset_times(
            preset, num_inference_steps, num_train_timesteps=T, original_inference_steps=cfg.original_inference_steps
        )
        if points.domain == "trigflow":
            t = torch.from_numpy(points.values)
            if cfg.time_type == "vp":
                times = vp_timestep_from_coefficients(self.alphas_cumprod, torch.cos(t), torch.sin(t)).double().numpy()
            elif cfg.time_type == "flow":
                times = flow_sigma_from_trigflow(t).numpy()
            else:
                times = points.values
        else:
            u = points.values
            if cfg.time_type == "vp":
                times = np.round(u * T) - 1
            elif cfg.time_type == "flow":
                times = self._shift(u, mu)
            else:
                times = u * (math.pi / 2)
        if times.size > 1 and not np.all(np.diff(times) < 0):
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is more than the {preset!r} preset allows on this "
                f"{cfg.time_type} grid: the timesteps {times.tolist()} are not strictly decreasing."
            )
        return times

    # ------------------------------------------------------------------------------- schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Set the schedule of model evaluations (run before inference).

        Args:
            num_inference_steps (`int`, *optional*): number of model evaluations, using ``timestep_preset``.
            device (`str` or `torch.device`, *optional*): device of ``timesteps`` and of the step coefficients.
            timesteps (`list`, *optional*): custom model timesteps, strictly decreasing: integers in ``[0, T)``
                (VP), values in ``(0, T]`` equal to ``sigma * T`` (flow, used as given, no shift), angles in
                ``(0, pi/2]`` (TrigFlow).
            sigmas (`list`, *optional*): flow only: sigmas in ``(0, 1]``, strictly decreasing, shifted like
                the preset's (this is what the Flux pipeline passes).
            mu (`float`, *optional*): resolution shift ``mu`` when ``use_dynamic_shifting``.
        """
        times = self._native_times(num_inference_steps, timesteps, sigmas, mu)
        n = len(times)
        discrete = self.config.time_type == "vp"
        t_end = self._t_end
        next_times = np.append(times[1:], t_end)
        gamma = self._gamma
        s_times = np.array([consistency_target_time(t, t_end, gamma, discrete) for t in next_times], dtype=np.float64)

        def f32(a):
            return torch.as_tensor(a).to(device=device, dtype=torch.float32)

        times_t, s_t, next_t = (torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (times, s_times, next_times))
        alpha_t, sigma_t = self._coefficients(times_t)
        alpha_s, sigma_s = self._coefficients(s_t)
        if self.config.time_type == "vp":
            scale, std = vp_forward_noise_coefficients(self._abar(s_t), self._abar(next_t))
        else:
            scale, std = forward_noise_coefficients(alpha_s, sigma_s, *self._coefficients(next_t))
        self._alpha_t, self._sigma_t = f32(alpha_t), f32(sigma_t)
        self._alpha_s, self._sigma_s = f32(alpha_s), f32(sigma_s)
        self._renoise_scale, self._renoise_std = f32(scale), f32(std)
        self._native = times
        self._native_s = s_times
        self.timesteps = self._model_timesteps(times, device)
        self.sigmas = f32(np.append(times, 0.0)) if self.config.time_type == "flow" else None
        self.num_inference_steps = n
        self._step_index = None
        self._begin_index = None
        self._first_nonfinite = None
        self._on_set_timesteps(device)
        self._moved = {}

    def _on_set_timesteps(self, device) -> None:
        """Hook for subclasses that precompute more per-step values."""

    # ---------------------------------------------------------------------------- bookkeeping
    @property
    def step_index(self) -> int | None:
        """Index of the next step (``None`` before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``begin_index`` (image-to-image pipelines call this before the loop)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        t = timestep.to(schedule.device) if isinstance(timestep, torch.Tensor) else timestep
        indices = (schedule == t).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep} is not on the current schedule {schedule.tolist()}.")
        return int(indices[1 if len(indices) > 1 else 0].item())

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _begin_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> int:
        """Checks shared by every ``step``; returns the index of this step."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step() was called before set_timesteps().")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise ValueError(
                f"{type(self).__name__}.step() was called {i + 1} times for a schedule of {self.num_inference_steps} "
                "steps; call set_timesteps() again for a new generation."
            )
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}.")
        if self.config.check_finite and not torch.compiler.is_compiling():
            self._check_finite(model_output, i)
        return i

    _immediate_check_devices = ("cpu",)  # where reading a tensor on the host costs no device synchronisation

    def _check_finite(self, model_output: torch.Tensor, i: int) -> None:
        """Raise a ValueError naming the first step whose model output has NaN / inf. On the CPU at once; on an
        accelerator the flag stays on the device and is read once, at the last step (no synchronisation per step)."""
        total = model_output.sum(dtype=torch.float64 if model_output.dtype == torch.float64 else torch.float32)
        bad = ~torch.isfinite(total)  # NaN / inf anywhere make the sum NaN / inf (one reduction, no full-size mask)
        if model_output.device.type in self._immediate_check_devices:
            first = i if bool(bad) else -1
        else:
            if self._first_nonfinite is None:
                self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=model_output.device)
            self._first_nonfinite = torch.where(bad & (self._first_nonfinite < 0), i, self._first_nonfinite)
            first = int(self._first_nonfinite) if i == self.num_inference_steps - 1 else -1
        if first >= 0:
            raise ValueError(
                f"model_output at step {first + 1}/{self.num_inference_steps} (timestep {self.timesteps[first].item()}) "
                "contains NaN or inf values."
            )

    def _coef(self, name: str, i: int, ref: torch.Tensor) -> torch.Tensor:
        """Step ``i``'s coefficient ``name`` on ``ref``'s device and dtype (each table is moved once per schedule)."""
        key = (name, ref.device, ref.dtype)
        if key not in self._moved:
            self._moved[key] = getattr(self, name).to(device=ref.device, dtype=ref.dtype)
        return self._moved[key][i]

    @staticmethod
    def _compute_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def _draw_noise(self, i: int, like: torch.Tensor, generator) -> torch.Tensor | None:
        """Fresh noise for re-noising steps (``gamma > 0`` and not the last step), drawn like diffusers."""
        if self._gamma == 0 or i == self.num_inference_steps - 1:
            return None
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def _finish(self, prev_sample, denoised, dtype, return_dict):
        self._step_index += 1
        prev_sample, denoised = prev_sample.to(dtype), denoised.to(dtype)
        if not return_dict:
            return (prev_sample, denoised)
        return FewStepSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    # ---------------------------------------------------------------------------- noising
    def _coefficients_at_model_timesteps(self, timesteps, ref: torch.Tensor):
        """``(alpha, sigma)`` at model timesteps (model units), shaped to broadcast against ``ref``."""
        native = torch.as_tensor(timesteps, device=ref.device)
        if self.config.time_type == "flow":
            native = native / self.config.num_train_timesteps
        alpha, sigma = self._coefficients(native, dtype=self._compute_dtype(ref))
        shape = (-1,) + (1,) * (ref.ndim - 1)
        return alpha.to(ref.dtype).reshape(shape), sigma.to(ref.dtype).reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process ``alpha_t * x0 + sigma_t * noise`` at model timesteps (one per sample or one for all)."""
        alpha, sigma = self._coefficients_at_model_timesteps(timesteps, original_samples)
        return alpha * original_samples + sigma * noise

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Flow pipelines' name for :meth:`add_noise` (image-to-image in SD3/Flux)."""
        return self.add_noise(sample, noise, timestep)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: these schedulers feed the sample to the model unscaled."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
