"""TDMScheduler: the Trajectory Distribution Matching sampler."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader looks the base up here)

from .scheduling_consistency import ConsistencyScheduler


class TDMScheduler(ConsistencyScheduler):
    r"""Sampler of TDM students (Luo et al. 2025, "Learning Few-Step Diffusion Models by Trajectory
    Distribution Matching").

    A TDM student predicts the clean sample at each segment boundary of its trajectory; sampling moves
    deterministically to the next boundary with the *same* predicted noise (a DDIM / Euler move, no fresh
    noise) and returns the last prediction. This is exactly :class:`ConsistencyScheduler`'s step with
    ``gamma = 0`` (the rule is not written twice), on TDM's uniform training boundaries
    ``t_k = T - k T / n - 1`` by default (4 steps: 999, 749, 499, 249; fractions 1, .75, .5, .25 of a flow
    trajectory before shift). For VP and flow teachers.

    Args:
        num_train_timesteps (`int`, defaults to 1000): ``T``.
        time_type (`str`, defaults to `"vp"`): `"vp"` or `"flow"`.
        prediction_type (`str`, *optional*): as in :class:`ConsistencyScheduler`.
        timestep_preset (`str`, defaults to `"tdm"`): any preset of :mod:`onestep_pipelines.sampling.presets`.
        original_inference_steps, beta_schedule, beta_start, beta_end, trained_betas, rescale_betas_zero_snr,
        set_alpha_to_one, shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len,
        max_image_seq_len, time_shift_type, shift_terminal, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas,
        invert_sigmas, sigma_data, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
        sample_max_value, check_finite, trained_times: as in :class:`ConsistencyScheduler`. A per-call ``eta`` is ignored (TDM
        students sample deterministically).
    """

    _allowed_time_types = ("vp", "flow")
    _infer_preset = False

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        time_type: str = "vp",
        prediction_type: str | None = None,
        timestep_preset: str = "tdm",
        original_inference_steps: int = 50,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        trained_betas=None,
        rescale_betas_zero_snr: bool = False,
        set_alpha_to_one: bool = True,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        invert_sigmas: bool = False,
        sigma_data: float = 0.5,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        check_finite: bool = True,
        trained_times: list[float] | None = None,
    ):
        self._setup()

    @property
    def _gamma(self) -> float:
        return 0.0

    def _call_gamma(self, eta) -> float:
        return 0.0
