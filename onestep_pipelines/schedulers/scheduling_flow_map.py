"""FlowMapScheduler: sampling with average velocities u(x_t, r, t) (MeanFlow, flow maps, shortcut models)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader looks the base up here)

from ..sampling import flow_map_step, forward_noise
from .scheduling_utils import FewStepSchedulerMixin, FewStepSchedulerOutput


class FlowMapScheduler(FewStepSchedulerMixin):
    r"""Few-step sampler for two-time flow models that predict the average velocity ``u(x_t, r, t)``
    over ``[r, t]`` (MeanFlow, Geng et al. 2025; Align Your Flow, Sabour et al. 2025; shortcut models,
    Frans et al. 2024). Time is rectified-flow ``sigma`` (1 = noise, 0 = data).

    Each step jumps ``x_r = x_t - (t - r) u(x_t, r, t)``. The model must be called with the target time
    ``r`` of the step: it is exposed, in the same units as ``timesteps`` (``sigma * T``), as
    ``scheduler.r_timesteps[i]`` for step ``i`` and as :meth:`r_timestep_for` (``timestep``). With
    ``gamma = 0`` the target is the next time of the schedule; with ``gamma > 0`` the jump goes further,
    to ``s = (1 - gamma) * t_next``, and the sample is forward-noised from ``s`` to ``t_next`` with fresh
    noise (stochastic flow-map sampling; ``gamma = 1`` jumps to data and re-noises like a consistency model).

    Args:
        num_train_timesteps (`int`, defaults to 1000): ``T``; model timesteps are ``sigma * T``.
        gamma (`float`, defaults to 0.0): stochasticity in ``[0, 1]``.
        timestep_preset (`str`, defaults to `"trailing"`): a preset of :mod:`onestep_pipelines.sampling.presets`.
        original_inference_steps (`int`, defaults to 50): grid size of the `"lcm"`/`"tcd"` presets.
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len,
        time_shift_type: flow shift, as in :class:`ConsistencyScheduler`.
        time_type (`str`, defaults to `"flow"`), prediction_type (`str`, defaults to `"flow"`): fixed; kept in the
            config so that pipelines and metadata can read them.
        check_finite (`bool`, defaults to True): raise on NaN/inf model output, naming the step.
    """

    _allowed_time_types = ("flow",)
    _infer_preset = False

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        gamma: float = 0.0,
        timestep_preset: str = "trailing",
        original_inference_steps: int = 50,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        time_type: str = "flow",
        prediction_type: str = "flow",
        check_finite: bool = True,
    ):
        self.r_timesteps = None
        self._setup()

    def _on_set_timesteps(self, device) -> None:
        self.r_timesteps = self._model_timesteps(self._native_s, device)

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
        return self.r_timesteps[i]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> FewStepSchedulerOutput | tuple:
        """Jump from ``timestep`` to the step's target ``r`` with the predicted average velocity ``model_output``.

        ``denoised`` is the one-jump data estimate ``x_t - t * u`` (exact when ``r = 0``).
        """
        i = self._begin_step(model_output, timestep, sample)
        dtype = self._compute_dtype(sample)
        x, u = sample.to(dtype), model_output.to(dtype)
        sigma_t, sigma_s = self._coef("_sigma_t", i, x), self._coef("_sigma_s", i, x)
        prev = flow_map_step(x, u, sigma_t, sigma_s)
        noise = self._draw_noise(i, x, generator)
        if noise is not None:
            prev = forward_noise(prev, self._coef("_renoise_scale", i, x), self._coef("_renoise_std", i, x), noise)
        denoised = flow_map_step(x, u, sigma_t, torch.zeros_like(sigma_t))
        return self._finish(prev, denoised, model_output.dtype, return_dict)
