"""PolicyScheduler: sampling pi-Flow policy students (network output = a velocity field, integrated in substeps)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader looks the base up here)

from ..sampling.policies import check_policy, make_policy, policy_channels, policy_rollout, policy_x0
from .scheduling_utils import FewStepSchedulerMixin


class PolicyScheduler(FewStepSchedulerMixin):
    r"""Few-step sampler of pi-Flow students (Chen et al. 2025, "pi-Flow: Policy-Based Few-Step Generation via
    Imitation Distillation"). At each of its few steps the model returns a *policy*, the parameters of a velocity
    field valid from the step's time ``t`` to the next one; ``step`` integrates it with ``substeps`` Euler substeps of
    the policy alone (no further model call) and returns the sample at the next time. The model's output therefore
    has :func:`~onestep_pipelines.sampling.policies.policy_channels` channels, not the sample's. Time is
    rectified-flow ``sigma`` (1 = noise); the policies and their math are in :mod:`onestep_pipelines.sampling.policies`.

    Args:
        num_train_timesteps (`int`, defaults to 1000): ``T``; model timesteps are ``sigma * T``.
        policy (`str`, defaults to `"gmflow"`): `"gmflow"` (Gaussian-mixture policy) or `"dx"` (data estimates at
            evenly spaced times).
        num_components (`int`, defaults to 8): mixture components (gmflow) or time nodes (dx) per step.
        substeps (`int`, defaults to 32): Euler substeps of the policy per step (a run-time knob: more substeps follow
            the policy's velocity field more closely at no network cost).
        shift (`float`, defaults to 1.0), timestep_preset (`str`, defaults to `"trailing"`), original_inference_steps,
            use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len, time_shift_type: the
            schedule, as in :class:`FlowMapScheduler`.
        time_type (`str`, defaults to `"flow"`), prediction_type (`str`, defaults to `"flow"`): fixed.
        check_finite (`bool`, defaults to True): raise on NaN/inf model output, naming the step.
        trained_times (`list`, *optional*): the native times a student was trained at (VP timesteps, flow sigmas after
            any shift, TrigFlow angles; strictly decreasing), written by the trainer when a run chose its own times
            (``--timesteps`` / ``--sigmas``): ``set_timesteps(len(trained_times))`` (or no step count) samples there
            instead of the preset, whatever ``mu``; other step counts, custom timesteps or sigmas and
            ``strength < 1`` use the preset as usual.
    """

    _allowed_time_types = ("flow",)
    _infer_preset = False
    _table_names = ("t", "t_next")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        policy: str = "gmflow",
        num_components: int = 8,
        substeps: int = 32,
        shift: float = 1.0,
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
        check_policy(policy, num_components)
        if not isinstance(substeps, int) or substeps < 1:
            raise ValueError(f"substeps must be a positive integer, got {substeps!r}.")
        self._setup()

    @property
    def _gamma(self) -> float:
        return 0.0  # deterministic: the policy's own ODE

    def _columns(self, times: np.ndarray, gamma: float) -> dict:
        times = torch.as_tensor(np.asarray(times, dtype=np.float64))
        return {"t": times, "t_next": torch.cat([times[1:], times.new_zeros(1)])}

    def output_channels(self, sample_channels: int) -> int:
        """Channels the model must output for samples with ``sample_channels`` channels."""
        return policy_channels(self.config.policy, self.config.num_components, sample_channels)

    def _check_output_shape(self, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        expected = (sample.shape[0], self.output_channels(sample.shape[1]), *sample.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} is not a {self.config.policy} policy with "
                             f"{self.config.num_components} components for samples of shape {tuple(sample.shape)} (expected {expected}): "
                             "PolicyScheduler samples pi-Flow policy students only.")

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *, substeps: int | None = None,
             generator: torch.Generator | None = None):
        """Integrate the policy in ``model_output`` from ``timestep`` to the next time of the schedule (``substeps``
        overrides the config for this step). ``denoised`` is the policy's data estimate at ``(sample, t)``. With
        ``return_dict=False``: ``(prev_sample, denoised)``."""
        i = self._begin_step(model_output, timestep, sample)
        t, t_next = self._constants(i, 0.0)
        dtype = self._compute_dtype(sample)
        x = sample.to(dtype)
        policy = make_policy(self.config.policy, model_output.to(dtype), x, t, t_next, self.config.num_components)
        prev = policy_rollout(policy, int(substeps or self.config.substeps))
        return self._finish(prev, policy_x0(policy, x, policy.t), sample.dtype, return_dict)
