"""FlowMapScheduler: sampling with average velocities u(x_t, r, t) (MeanFlow, flow maps, shortcut models)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader looks the base up here)

from ..sampling import flow_map_step
from .schedule import combine, flow_shift, linear_in_input
from .scheduling_utils import FewStepSchedulerMixin

try:  # diffusers >= 0.40: our output is also the stock flow-map scheduler's
    from diffusers.schedulers.scheduling_flow_map_euler_discrete import FlowMapEulerDiscreteSchedulerOutput as _StockOutput
except ImportError:  # pragma: no cover
    from diffusers.utils import BaseOutput as _StockOutput


@dataclass
class FlowMapSchedulerOutput(_StockOutput):
    """Output of :meth:`FlowMapScheduler.step` (a ``FlowMapEulerDiscreteSchedulerOutput``).

    Args:
        prev_sample (`torch.Tensor`): ``z_r``, the sample at the step's target time.
        denoised (`torch.Tensor`): the one-jump data estimate ``z_t - t u``.
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


class FlowMapScheduler(FewStepSchedulerMixin):
    r"""Few-step sampler for two-time flow models that predict the average velocity ``u(x_t, r, t)``
    over ``[r, t]`` (MeanFlow, Geng et al. 2025; Align Your Flow, Sabour et al. 2025; shortcut models,
    Frans et al. 2024). Time is rectified-flow ``sigma`` (1 = noise, 0 = data). A superset of diffusers'
    ``FlowMapEulerDiscreteScheduler``: same config keys, ``apply_shift``, ``step(..., r_timestep=...)`` and outputs.

    Each step jumps ``x_r = x_t - (t - r) u(x_t, r, t)``. The model must be called with the target time
    ``r`` of the step: it is exposed, in the same units as ``timesteps`` (``sigma * T``), as
    ``scheduler.r_timesteps[i]`` for step ``i`` and as :meth:`r_timestep_for` (``timestep``). With
    ``gamma = 0`` the target is the next time of the schedule; with ``gamma > 0`` the jump goes further,
    to ``s = (1 - gamma) * t_next``, and the sample is forward-noised from ``s`` to ``t_next`` with fresh
    noise (stochastic flow-map sampling; ``gamma = 1`` jumps to data and re-noises like a consistency model).
    ``step(..., r_timestep=r)`` jumps from any ``t`` to any ``r`` instead (any-step sampling, deterministic;
    ``r = t`` returns the sample unchanged).

    Args:
        num_train_timesteps (`int`, defaults to 1000): ``T``; model timesteps are ``sigma * T``.
        shift (`float`, defaults to 1.0): static shift of the schedule's sigmas (custom ``timesteps`` and ``sigmas``
            are shifted too, as in FlowMapEulerDiscreteScheduler).
        gamma (`float`, defaults to 0.0): stochasticity in ``[0, 1]``.
        timestep_preset (`str`, defaults to `"trailing"`): a preset of :mod:`onestep_pipelines.sampling.presets`.
        original_inference_steps (`int`, defaults to 50): grid size of the `"lcm"`/`"tcd"` presets.
        use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len, time_shift_type: the
            ``mu``-dependent shift, as in :class:`ConsistencyScheduler`.
        time_type (`str`, defaults to `"flow"`), prediction_type (`str`, defaults to `"flow"`): fixed; kept in the
            config so that pipelines and metadata can read them.
        check_finite (`bool`, defaults to True): raise on NaN/inf model output, naming the step.
        trained_times (`list`, *optional*): the native times a student was trained at (VP timesteps, flow sigmas after
            any shift, TrigFlow angles; strictly decreasing), written by the trainer when a run chose its own times
            (``--timesteps`` / ``--sigmas``): ``set_timesteps(len(trained_times))`` (or no step count) samples there
            instead of the preset, whatever ``mu``; other step counts, custom timesteps or sigmas and
            ``strength < 1`` use the preset as usual.
    """

    _allowed_time_types = ("flow",)
    _infer_preset = False
    _shift_custom_timesteps = True
    _table_names = ("x0_x", "x0_out", "prev_x", "prev_out", "std")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        gamma: float = 0.0,
        timestep_preset: str = "trailing",
        original_inference_steps: int = 50,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        time_type: str = "flow",
        prediction_type: str = "flow",
        check_finite: bool = True,
        trained_times: list[float] | None = None,
    ):
        self.r_timesteps = None
        self._setup()

    def apply_shift(self, sigmas, mu: float | None = None):
        """The configured shift of ``sigmas`` (static, or ``mu``-dependent with ``use_dynamic_shifting``)."""
        return flow_shift(self.config, sigmas, mu)

    def _columns(self, times: np.ndarray, gamma: float) -> dict:
        c = self._transition(times, gamma)

        def rule(x, u, c):  # a jump to s (the next time, or further with gamma > 0), then the re-noising scale
            return {"x0": flow_map_step(x, u, c["sigma_t"], torch.zeros_like(x)), "prev": c["scale"] * flow_map_step(x, u, c["sigma_t"], c["sigma_s"])}

        return linear_in_input(rule, c) | {"std": c["std"], "r": c["s_times"]}

    def _on_set_timesteps(self, device) -> None:
        r = self._columns(self._native, self._gamma)["r"].numpy()
        self.r_timesteps = self._on_device("r_timesteps", self._model_timesteps(r), device, torch.float32)

    def r_timestep_for(self, timestep=None) -> torch.Tensor:
        """Target time ``r`` (model units) of the current step, the one that starts at ``timestep``; pass it to the
        model. Before the first step it is the first step's (or ``begin_index``'s, or ``timestep``'s when given)."""
        if self.num_inference_steps is None:
            raise ValueError("FlowMapScheduler.r_timestep_for() was called before set_timesteps().")
        if self._step_index is not None:
            i = self._step_index
        elif self._begin_index is not None:
            i = self._begin_index
        else:
            i = 0 if timestep is None else self.index_for_timestep(timestep)
        return self.r_timesteps[min(i, self.num_inference_steps - 1)]

    def _sigma_of(self, timestep, ref: torch.Tensor) -> torch.Tensor:
        """Flow sigma of a model timestep (any value, on the schedule or not), shaped to broadcast against ``ref``."""
        T = self.config.num_train_timesteps
        if isinstance(timestep, torch.Tensor):
            t = timestep.to(ref.device, ref.dtype) / T
            return t.reshape(-1, *([1] * (ref.ndim - 1))) if t.numel() > 1 else t.reshape(())
        return ref.new_full((), float(timestep) / T)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        r_timestep: float | torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        generator: torch.Generator | None = None,
    ) -> FlowMapSchedulerOutput | tuple:
        """Jump from ``timestep`` with the predicted average velocity ``model_output``: to the step's scheduled target
        (and re-noise when ``gamma > 0``), or to ``r_timestep`` when it is given (any ``t`` and ``r``, on the schedule
        or not). ``denoised`` is the one-jump data estimate ``x_t - t * u`` (exact when ``r = 0``). With
        ``return_dict=False`` the result is ``(prev_sample,)``, as FlowMapEulerDiscreteScheduler's."""
        i = self._begin_step(model_output, timestep, sample, off_schedule=r_timestep is not None)
        if r_timestep is not None:
            dtype = self._compute_dtype(sample)
            x, u = sample.to(dtype), model_output.to(dtype)
            sigma_t = self._sigma_of(timestep, x)
            prev = flow_map_step(x, u, sigma_t, self._sigma_of(r_timestep, x))
            denoised = flow_map_step(x, u, sigma_t, torch.zeros_like(sigma_t))
        else:
            x, u = self._step_inputs(sample, model_output)
            x0_x, x0_out, prev_x, prev_out, std = self._constants(i, self._gamma)
            denoised = combine(x0_x, x, x0_out, u)
            prev = combine(prev_x, x, prev_out, u)
            noise = self._draw_noise(i, x, generator, self._gamma)
            if noise is not None:
                prev = torch.add(prev, noise, alpha=std)
        self._step_index += 1
        prev, denoised = prev.to(model_output.dtype), denoised.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return FlowMapSchedulerOutput(prev_sample=prev, denoised=denoised)
