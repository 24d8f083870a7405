"""What the few-step schedulers share: the diffusers scheduler conventions around the sampling core.

The math lives in :mod:`onestep_pipelines.sampling`. Around it, by concept: :mod:`.stock_configs` reads stock
diffusers configs, :mod:`.noise_levels` is the forward process of a config (``(alpha, sigma)``, transitions,
``add_noise``), :mod:`.schedule` builds schedules and their per-step constants, :mod:`.finite_check` is the NaN / inf
check. This module keeps the bookkeeping of a generation: ``set_timesteps``' device tensors (cached per schedule),
the step index (found without a host read when the timestep is one of ``scheduler.timesteps``), fresh noise and the
step output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..sampling import DEFAULT_PREDICTION, TIME_TYPES, check_prediction_type, check_time_type, vp_alphas_cumprod
from ..sampling.presets import short_list
from .finite_check import FiniteCheckMixin
from .noise_levels import NoiseLevelsMixin
from .schedule import LRU, StepTables, check_trained_times, host_array, native_times, to_device
from .stock_configs import ALL_COMPATIBLES, SHARED_KEYS, SPACING_FLAGS, compatible_names, infer_source_config


@dataclass
class FewStepSchedulerOutput(BaseOutput):
    """Output of a few-step scheduler's ``step``.

    Args:
        prev_sample (`torch.Tensor`): the sample at the next time of the schedule, input to the next model call.
        denoised (`torch.Tensor`): the clean-sample estimate ``x0_hat`` of this step (for previews and callbacks).
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


class FewStepSchedulerMixin(NoiseLevelsMixin, FiniteCheckMixin, SchedulerMixin, ConfigMixin):
    """Base of :class:`ConsistencyScheduler`, :class:`FlowMapScheduler` and :class:`TDMScheduler`.

    Subclasses register their config in ``__init__``, call :meth:`_setup`, and implement :meth:`_columns` (the per-step
    constants of their rule, from the sampling core). Class hooks: ``_allowed_time_types``, ``_infer_preset``,
    ``_shift_custom_timesteps``.
    """

    _compatibles = ALL_COMPATIBLES
    order = 1
    _allowed_time_types = TIME_TYPES
    _infer_preset = True
    _shift_custom_timesteps = False
    _table_names: tuple[str, ...] = ()

    # ---------------------------------------------------------------------------------- config
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build from our own config or from a stock scheduler's config (DDPM, DDIM, LCM, TCD, Euler, DPM-Solver,
        FlowMatchEuler, FlowMatchLCM, FlowMapEuler, SCM), keeping its time parametrisation, prediction type and schedule
        options (see :mod:`.stock_configs`). Keyword arguments override the config."""
        if isinstance(config, dict):
            config = infer_source_config(config, infer_preset=cls._infer_preset, init_keys=cls._get_init_keys(cls) - {"self"})
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def compatibles(self):
        """Scheduler classes that convert to and from this one's config: those of its time parametrisation only."""
        import diffusers

        ours, stack = {}, [FewStepSchedulerMixin]
        while stack:  # our scheduler classes are this mixin's subclasses
            for cls in stack.pop().__subclasses__():
                ours[cls.__name__] = cls
                stack.append(cls)
        names = compatible_names(type(self).__name__, self.config.time_type)
        return [ours.get(n) or getattr(diffusers, n) for n in names if n in ours or hasattr(diffusers, n)]

    @property
    def _gamma(self) -> float:
        return float(self.config.gamma)

    def _setup(self) -> None:
        self._keep_shared_values()
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
        if cfg.get("invert_sigmas"):
            raise ValueError("invert_sigmas=True (Mochi's reversed time) is not supported by the few-step schedulers; "
                             "use FlowMatchEulerDiscreteScheduler for such models.")
        spacing = [flag for flag in SPACING_FLAGS if cfg.get(flag)]
        if len(spacing) > 1:
            raise ValueError(f"only one of {sorted(SPACING_FLAGS)} can be True, got {spacing}.")
        if spacing and cfg.time_type != "flow":
            raise ValueError(f"{spacing[0]}=True applies to time_type='flow' here, not {cfg.time_type!r}.")
        if cfg.get("shift_terminal") and not 0.0 < cfg.shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must lie in (0, 1), got {cfg.shift_terminal}.")
        if cfg.time_type == "trigflow" and cfg.sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {cfg.sigma_data}.")
        if cfg.get("trained_times") is not None:
            self.register_to_config(trained_times=check_trained_times(cfg.trained_times, cfg.time_type, cfg.num_train_timesteps))
        T = cfg.num_train_timesteps
        if cfg.time_type == "vp":
            self.alphas_cumprod = vp_alphas_cumprod(
                T, cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.trained_betas, cfg.rescale_betas_zero_snr
            )
            self.alphas = torch.cat([self.alphas_cumprod[:1], self.alphas_cumprod[1:] / self.alphas_cumprod[:-1]])
            self.betas = 1.0 - self.alphas
            self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.long)
        else:
            self.alphas_cumprod = self.alphas = self.betas = None
            self.timesteps = torch.linspace(T, 1, T, dtype=torch.float32)
        self.init_noise_sigma = float(cfg.sigma_data) if cfg.time_type == "trigflow" else 1.0
        self.num_inference_steps = None
        self.sigmas = None
        self.custom_timesteps = False
        self._native = None
        self._host_timesteps = None
        self._model_sigmas = None
        self._step_index = None
        self._begin_index = None
        self._schedules = LRU(8)  # schedule -> device tensors and step tables
        self._schedule = None
        self._finite = None  # device state of the NaN / inf check of the current generation
        self.defer_finite_check = False  # set by the few-step pipelines: the check is read after the call
        # The generator of the pipeline call in progress, set by the few-step pipelines: the stock SD3 and Flux loops
        # call ``step`` without one, so a stochastic student would otherwise draw from the global RNG.
        self.call_generator = None

    def _keep_shared_values(self) -> None:
        """Unmark the keys the stock classes of our time type share (``SHARED_KEYS``) as this class's defaults:
        diffusers' ``from_config`` of another class drops the keys marked so and takes *its* defaults, so
        ``DDPMScheduler.from_config(ours.config)`` would turn our ``scaled_linear`` betas into DDPM's ``linear`` ones."""
        defaults = self.config.get("_use_default_values")
        if defaults and self.config.time_type in SHARED_KEYS:
            kept = sorted(k for k in defaults if k not in SHARED_KEYS[self.config.time_type])  # in one order: configs compare equal
            self._internal_dict = FrozenDict({**self._internal_dict, "_use_default_values": kept})

    def _columns(self, times: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
        """The per-step constants of the subclass's rule (named as ``_table_names``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        original_inference_steps: int | None = None,
        strength: float = 1.0,
    ) -> None:
        """Set the schedule of model evaluations (run before inference).

        Args:
            num_inference_steps (`int`, *optional*): number of model evaluations, using ``timestep_preset``.
            device (`str` or `torch.device`, *optional*): device of ``timesteps`` and of the step constants (copied
                once per schedule and device; a later call with the same schedule copies nothing).
            timesteps (`list`, *optional*): custom model timesteps, strictly decreasing: integers in ``[0, T)`` (VP);
                values in ``(0, T]`` (flow: as FlowMatchEulerDiscreteScheduler, the model gets them as passed and the
                steps use the sigmas ``timesteps / T`` through the config's shift; :class:`FlowMapScheduler` shifts
                both, as FlowMapEulerDiscreteScheduler does); angles in ``(0, pi/2]`` (TrigFlow). Not together with
                ``num_inference_steps``.
            sigmas (`list`, *optional*): flow only: sigmas in ``(0, 1]``, strictly decreasing, shifted like the
                preset's (this is what the Flux pipeline passes). With ``timesteps`` too (same length), the sigmas set
                the steps and the timesteps what the model gets, as in FlowMatchEulerDiscreteScheduler.
            mu (`float`, *optional*): resolution shift ``mu`` when ``use_dynamic_shifting``.
            original_inference_steps (`int`, *optional*): grid of the ``lcm`` / ``tcd`` presets for this call (the LCM
                pipelines pass it); defaults to the config's.
            strength (`float`, defaults to 1.0): image-to-image: start lower (LCM / TCD's rule for their grids, the
                preset's fractions scaled by ``strength`` otherwise, the first custom timesteps dropped).
        """
        times = native_times(
            self.config, self.alphas_cumprod, num_inference_steps, timesteps, sigmas, mu, strength, original_inference_steps,
            shift_custom_timesteps=self._shift_custom_timesteps,
        )
        host = own = self._model_timesteps(times)
        if timesteps is not None and self.config.time_type == "flow" and not self._shift_custom_timesteps:
            # FlowMatchEulerDiscreteScheduler: the model gets the timesteps as passed, the steps use the shifted sigmas
            given = host_array(timesteps).astype(np.float32)
            host = own if np.allclose(given, own, rtol=0, atol=1e-4) else given
        self._model_sigmas = None if host is own else (host, times)  # model timesteps that are not sigma * T
        key = (times.tobytes(), host.tobytes(), str(torch.device(device) if device is not None else "cpu"))
        self._schedule = self._schedules.get_or_make(key, lambda: {"tables": {}, "device": {}})
        self.timesteps = self._on_device("timesteps", host, device, torch.long if self.config.time_type == "vp" else torch.float32)
        self.sigmas = self._on_device("sigmas", np.append(times, 0.0), device, torch.float32) if self.config.time_type == "flow" else None
        self._native = times
        self._host_timesteps = host
        self.num_inference_steps = len(times)
        self.custom_timesteps = timesteps is not None
        self._step_index = None
        self._begin_index = None
        self._finite = None
        self._constants_for(self._gamma)  # made here, not in a step
        self._on_set_timesteps(device)

    def _on_device(self, name: str, array, device, dtype) -> torch.Tensor:
        """``array`` of the current schedule on ``device`` (made once per schedule and device)."""
        cache = self._schedule["device"]
        if name not in cache:
            cache[name] = to_device(array, device, dtype)
        return cache[name]

    def _on_set_timesteps(self, device) -> None:
        """Hook for subclasses that expose more per-step values."""

    def _constants_for(self, gamma: float) -> StepTables:
        tables = self._schedule["tables"]
        if gamma not in tables:
            tables[gamma] = StepTables(self._table_names, {k: v.numpy() for k, v in self._columns(self._native, gamma).items()})
        return tables[gamma]

    def _constants(self, i: int, gamma: float) -> tuple:
        """Step ``i``'s constants (``_table_names`` order) as Python numbers."""
        return self._constants_for(gamma).rows[i]

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

    def _index_of_view(self, timestep) -> int | None:
        """The index of ``timestep`` when it is an element of ``self.timesteps`` (what pipelines iterate over), found
        from its storage offset: no host read of a device value."""
        base = getattr(timestep, "_base", None)
        if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and base is not None and base is self.timesteps:
            offset = timestep.storage_offset() - base.storage_offset()
            stride = base.stride(0) if base.ndim else 1
            if stride and offset % stride == 0 and 0 <= offset // stride < len(base):
                return offset // stride
        return None

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int | None:
        """Index of ``timestep`` on the schedule (the second of two equal entries, as diffusers' schedulers do).
        Raises when it is not on the schedule."""
        if schedule_timesteps is None:
            found = self._index_of_view(timestep)
            if found is not None:
                return found
            schedule = self._host_timesteps if self._host_timesteps is not None else self.timesteps.cpu().numpy()
        else:
            schedule = schedule_timesteps.detach().cpu().numpy()
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        indices = np.flatnonzero(np.isclose(np.asarray(schedule, dtype=np.float64), value, rtol=1e-6, atol=1e-4))
        if len(indices) == 0:
            raise ValueError(f"timestep {value:g} is not on the current schedule {short_list(schedule)}.")
        return int(indices[1 if len(indices) > 1 else 0])

    def previous_timestep(self, timestep) -> torch.Tensor:
        """The timestep after ``timestep`` on the schedule (LCM / TCD's name): ``-1`` (VP) or ``0`` after the last."""
        i = self.index_for_timestep(timestep)
        if i == self.num_inference_steps - 1:
            return torch.tensor(-1 if self.config.time_type == "vp" else 0)
        return self.timesteps[i + 1]

    def _begin_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, off_schedule: bool = False) -> int:
        """Checks shared by every ``step``; returns the index of this step."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step() was called before set_timesteps().")
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            elif off_schedule:  # any-step sampling (FlowMapScheduler with r_timestep): the counter starts at 0
                try:
                    self._step_index = self.index_for_timestep(timestep)
                except ValueError:
                    self._step_index = 0
            else:
                self._step_index = self.index_for_timestep(timestep)
        i = self._step_index
        if i >= self.num_inference_steps and not off_schedule:
            raise ValueError(
                f"{type(self).__name__}.step() was called {i + 1} times for a schedule of {self.num_inference_steps} "
                "steps; call set_timesteps() again for a new generation."
            )
        self._check_output_shape(model_output, sample)
        if self.config.check_finite and not torch.compiler.is_compiling() and i < self.num_inference_steps:
            self._watch_finite(model_output, i)
        return i

    def _check_output_shape(self, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}.")

    # ---------------------------------------------------------------------------- step helpers
    @staticmethod
    def _compute_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    @staticmethod
    def _step_inputs(sample: torch.Tensor, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample and model output a step computes with: float32 (or float64) as given; half-precision tensors stay
        as they are, since each kernel of the step computes in float32 and rounds once (no casting kernels)."""
        if sample.dtype in (torch.float16, torch.bfloat16) and model_output.dtype == sample.dtype:
            return sample, model_output
        dtype = torch.float64 if torch.float64 in (sample.dtype, model_output.dtype) else torch.float32
        return sample.to(dtype), model_output.to(dtype)

    def _draw_noise(self, i: int, like: torch.Tensor, generator, gamma: float) -> torch.Tensor | None:
        """Fresh noise for re-noising steps (``gamma > 0`` and not the last step), drawn as diffusers' ``randn_tensor``
        draws it (see :func:`draw_noise`)."""
        if gamma == 0 or i >= self.num_inference_steps - 1:
            return None
        return draw_noise(like, generator if generator is not None else self.call_generator)

    def _finish(self, prev_sample, denoised, dtype, return_dict):
        self._step_index += 1
        prev_sample, denoised = prev_sample.to(dtype), denoised.to(dtype)
        if not return_dict:
            return (prev_sample, denoised)
        return FewStepSchedulerOutput(prev_sample=prev_sample, denoised=denoised)


def draw_noise(like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn as diffusers' ``randn_tensor`` draws it, so a scheduler's
    samples equal the stock ones for the same generators: a list of generators draws image ``b`` of the batch from
    ``generator[b]`` (a list of one is one generator), and a CPU generator draws on the CPU, so results repeat across
    devices. The copy to an accelerator is non-blocking (from pinned memory), so the host is not stopped."""
    if isinstance(generator, list):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != like.shape[0]:
            raise ValueError(f"got a list of {len(generator)} generators for a batch of {like.shape[0]} samples; "
                             "pass one generator per sample (or a single generator).")
    gens = generator if isinstance(generator, list) else [generator]
    device = gens[0].device if gens[0] is not None and gens[0].device.type != like.device.type else like.device
    if device.type != like.device.type and gens[0].device.type != "cpu":
        raise ValueError(f"cannot draw noise for a {like.device.type} sample with a {gens[0].device.type} generator; "
                         f"use a CPU generator or one on {like.device.type}.")
    shape = (1, *like.shape[1:]) if isinstance(generator, list) else like.shape
    parts = [torch.randn(shape, generator=g, device=device, dtype=like.dtype) for g in gens]
    noise = parts[0] if len(parts) == 1 else torch.cat(parts)
    if noise.device == like.device:
        return noise
    if like.device.type == "cuda":
        return noise.pin_memory().to(like.device, non_blocking=True)
    return noise.to(like.device)


def step_arguments(args: tuple, eta, generator, return_dict):
    """Positional arguments of ``step`` after ``sample``: LCM's order ``(generator, return_dict)`` or TCD's
    ``(eta, generator, return_dict)``; a number in the first place is TCD's ``eta``."""
    args = list(args)
    if args and isinstance(args[0], (int, float)) and not isinstance(args[0], bool):
        eta = args.pop(0)
    if args:
        generator = args.pop(0)
    if args:
        return_dict = args.pop(0)
    if args:
        raise TypeError(f"step() got {len(args)} positional arguments too many after (eta,) generator, return_dict.")
    return eta, generator, return_dict
