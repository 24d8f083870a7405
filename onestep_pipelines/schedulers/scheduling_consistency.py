"""ConsistencyScheduler: few-step consistency sampling with a gamma knob (LCM, TCD, DMD2, sCM/rCM)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader looks the base up here)

from ..sampling import consistency_step, to_x0_eps
from .scheduling_utils import FewStepSchedulerMixin, FewStepSchedulerOutput


class ConsistencyScheduler(FewStepSchedulerMixin):
    r"""Multistep consistency sampling with strategic stochastic re-noising (Song et al. 2023, Alg. 1;
    Luo et al. 2023, LCM; Zheng et al. 2024, TCD Alg. 4; Lu & Song 2024, sCM).

    At each step the model output is converted to ``(x0_hat, eps_hat)``; the sample moves
    deterministically along that prediction to ``s = (1 - gamma) * t_next`` (measured from the end of
    the trajectory) and is forward-noised from ``s`` to ``t_next`` with fresh noise:

    * ``gamma = 0``: deterministic DDIM (VP) / Euler (flow) / TrigFlow ODE move, no fresh noise;
    * ``0 < gamma < 1``: TCD-style partial re-noising (TCD's default is 0.3);
    * ``gamma = 1``: LCM / DMD2 / sCM style: predict ``x0``, re-noise it fully to ``t_next``.

    Works for VP (epsilon, v, sample), rectified-flow (velocity, sample) and TrigFlow (F, sample)
    models, so it drops into stock SD, SDXL, SD3, Flux and DiT pipelines via ``from_config``.

    Args:
        num_train_timesteps (`int`, defaults to 1000): ``T``, length of the training grid.
        time_type (`str`, defaults to `"vp"`): `"vp"`, `"flow"` or `"trigflow"`.
        prediction_type (`str`, *optional*): `"epsilon"`, `"v_prediction"`, `"sample"` (VP); `"flow"`, `"sample"`
            (flow); `"trigflow"`, `"sample"` (TrigFlow). Defaults to epsilon / flow / trigflow.
        gamma (`float`, defaults to 1.0): stochasticity in ``[0, 1]`` (see above).
        timestep_preset (`str`, *optional*): `"lcm"`, `"tcd"`, `"dmd2"`, `"tdm"`, `"trailing"` (= `"uniform"`),
            `"rcm"` or `"scm"` (see :mod:`onestep_pipelines.sampling.presets`). Defaults to `"trailing"`
            (`"scm"` for TrigFlow); `from_config` of an LCM/TCD config picks `"lcm"`/`"tcd"`.
        original_inference_steps (`int`, defaults to 50): grid size of the `"lcm"`/`"tcd"` presets.
        beta_schedule (`str`, defaults to `"scaled_linear"`), beta_start (`float`, defaults to 0.00085),
        beta_end (`float`, defaults to 0.012), trained_betas (*optional*), rescale_betas_zero_snr (`bool`,
            defaults to False): the VP noise schedule, as in diffusers' DDPM-family schedulers.
        set_alpha_to_one (`bool`, defaults to True): VP only: trajectories end at the clean sample (LCM, DDIM);
            with False they end at ``alphas_cumprod[0]`` (TCD's convention, DDIM with ``set_alpha_to_one=False``).
        shift (`float`, defaults to 1.0), use_dynamic_shifting (`bool`, defaults to False), base_shift (`float`,
            defaults to 0.5), max_shift (`float`, defaults to 1.15), base_image_seq_len (`int`, defaults to 256),
            max_image_seq_len (`int`, defaults to 4096), time_shift_type (`str`, defaults to `"exponential"`):
            flow only: static (SD3) or ``mu``-dependent (Flux) shift of the preset's sigmas.
        sigma_data (`float`, defaults to 0.5): TrigFlow data standard deviation.
        lcm_boundary_condition (`bool`, defaults to False): apply LCM's ``x0 = c_skip x + c_out x0_hat`` with
            ``c_skip = 0.25 / ((s t)^2 + 0.25)``, ``c_out = s t / sqrt((s t)^2 + 0.25)``, ``s = timestep_scaling``.
        timestep_scaling (`float`, defaults to 10.0): LCM's timestep scaling for the boundary condition.
        check_finite (`bool`, defaults to True): raise a `ValueError` naming the step when the model output has
            NaN or inf. On the CPU at that step; on an accelerator at the last step (the flag stays on the device,
            so there is no synchronisation per step). Skipped inside ``torch.compile``.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        time_type: str = "vp",
        prediction_type: str | None = None,
        gamma: float = 1.0,
        timestep_preset: str | None = None,
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
        sigma_data: float = 0.5,
        lcm_boundary_condition: bool = False,
        timestep_scaling: float = 10.0,
        check_finite: bool = True,
    ):
        self._setup()

    @property
    def _boundary_condition(self) -> bool:
        return bool(self.config.get("lcm_boundary_condition", False))

    def _on_set_timesteps(self, device) -> None:
        if self._boundary_condition:
            scaled = self.timesteps.double() * self.config.timestep_scaling
            self._c_skip = (0.25 / (scaled**2 + 0.25)).float()
            self._c_out = (scaled / (scaled**2 + 0.25).sqrt()).float()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> FewStepSchedulerOutput | tuple:
        """Advance ``sample`` from ``timestep`` to the next time of the schedule.

        Returns ``prev_sample`` (next model input, or the final sample after the last step) and
        ``denoised`` (this step's ``x0_hat``); a tuple of both when ``return_dict`` is False.
        """
        i = self._begin_step(model_output, timestep, sample)
        dtype = self._compute_dtype(sample)
        x, out = sample.to(dtype), model_output.to(dtype)
        x0, eps = to_x0_eps(
            out, x, self._coef("_alpha_t", i, x), self._coef("_sigma_t", i, x), self.config.prediction_type, self.config.sigma_data
        )
        if self._boundary_condition:
            x0 = self._coef("_c_out", i, x) * x0 + self._coef("_c_skip", i, x) * x
        noise = self._draw_noise(i, x, generator)
        prev = consistency_step(
            x0,
            eps,
            self._coef("_alpha_s", i, x),
            self._coef("_sigma_s", i, x),
            self._coef("_renoise_scale", i, x),
            self._coef("_renoise_std", i, x),
            noise,
        )
        return self._finish(prev, x0, model_output.dtype, return_dict)
