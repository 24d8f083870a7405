"""ConsistencyScheduler: few-step consistency sampling with a gamma knob (LCM, TCD, DMD2, sCM/rCM)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader looks the base up here)

from ..sampling import consistency_step, to_x0_eps
from ..sampling.predictions import clip_x0, dynamic_threshold
from .schedule import combine, linear_in_input
from .scheduling_utils import FewStepSchedulerMixin, FewStepSchedulerOutput, step_arguments


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
    models, so it drops into stock SD, SDXL, SD3, Flux and DiT pipelines via ``from_config``. The rule is linear in
    ``(sample, model_output)``, so each step applies per-step constants worked out once per schedule from the sampling
    core (a few fused multiply-adds, no host read).

    Args:
        num_train_timesteps (`int`, defaults to 1000): ``T``, length of the training grid.
        time_type (`str`, defaults to `"vp"`): `"vp"`, `"flow"` or `"trigflow"`.
        prediction_type (`str`, *optional*): `"epsilon"`, `"v_prediction"`, `"sample"` (VP); `"flow"`, `"sample"`
            (flow); `"trigflow"`, `"sample"` (TrigFlow). Defaults to epsilon / flow / trigflow.
        gamma (`float`, defaults to 1.0): stochasticity in ``[0, 1]`` (see above).
        timestep_preset (`str`, *optional*): `"lcm"`, `"tcd"`, `"dmd2"`, `"tdm"`, `"trailing"` (= `"uniform"`),
            `"linspace"`, `"rcm"` or `"scm"` (see :mod:`onestep_pipelines.sampling.presets`). Defaults to `"trailing"`
            (`"scm"` for TrigFlow); `from_config` of an LCM/TCD config picks `"lcm"`/`"tcd"`. `"linspace"` is the stock
            FlowMatchEuler / FlowMatchLCM default grid.
        original_inference_steps (`int`, defaults to 50): grid size of the `"lcm"`/`"tcd"` presets.
        beta_schedule (`str`, defaults to `"scaled_linear"`), beta_start (`float`, defaults to 0.00085),
        beta_end (`float`, defaults to 0.012), trained_betas (*optional*, one per training timestep),
            rescale_betas_zero_snr (`bool`, defaults to False): the VP noise schedule, as in diffusers' DDPM family.
        set_alpha_to_one (`bool`, defaults to True): VP only: trajectories end at the clean sample (LCM, DDIM);
            with False they end at ``alphas_cumprod[0]`` (TCD's convention, DDIM with ``set_alpha_to_one=False``).
        shift (`float`, defaults to 1.0), use_dynamic_shifting (`bool`, defaults to False), base_shift (`float`,
            defaults to 0.5), max_shift (`float`, defaults to 1.15), base_image_seq_len (`int`, defaults to 256),
            max_image_seq_len (`int`, defaults to 4096), time_shift_type (`str`, defaults to `"exponential"`):
            flow only: static (SD3) or ``mu``-dependent (Flux) shift of the preset's sigmas.
        shift_terminal (`float`, *optional*): flow only: stretch the shifted sigmas to end at this value (LTX-Video).
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas (`bool`, default False): flow only: re-space the
            shifted sigmas as FlowMatchEulerDiscreteScheduler does (beta needs scipy).
        invert_sigmas (`bool`, defaults to False): kept for FlowMatchEuler configs; True (Mochi) is refused.
        sigma_data (`float`, defaults to 0.5): TrigFlow data standard deviation.
        lcm_boundary_condition (`bool`, defaults to False): apply LCM's ``x0 = c_skip x + c_out x0_hat`` with
            ``c_skip = 0.25 / ((s t)^2 + 0.25)``, ``c_out = s t / sqrt((s t)^2 + 0.25)``, ``s = timestep_scaling``.
        timestep_scaling (`float`, defaults to 10.0): LCM's timestep scaling for the boundary condition.
        clip_sample (`bool`, defaults to False), clip_sample_range (`float`, defaults to 1.0): clip ``x0_hat``.
        thresholding (`bool`, defaults to False), dynamic_thresholding_ratio (`float`, defaults to 0.995),
            sample_max_value (`float`, defaults to 1.0): Imagen's dynamic thresholding of ``x0_hat`` (before clipping).
        gamma_from_eta (`bool`, defaults to False): TCD's convention: the ``eta`` passed to ``step`` (stock pipelines
            pass 0 unless told otherwise) is each step's gamma. Without it a per-call ``eta > 0`` replaces ``gamma`` for
            that call and ``eta = 0`` (the stock pipelines' default) keeps it. Set by ``from_config`` of a TCD config.
        check_finite (`bool`, defaults to True): raise a `ValueError` naming the step when the model output has NaN or
            inf. On the CPU at that step; on an accelerator the step sums stay on the device and are read once, after
            the last step (after the whole call in the few-step pipelines). Skipped inside ``torch.compile``.
        trained_times (`list`, *optional*): the native times a student was trained at (VP timesteps, flow sigmas after
            any shift, TrigFlow angles; strictly decreasing), written by the trainer when a run chose its own times
            (``--timesteps`` / ``--sigmas``): ``set_timesteps(len(trained_times))`` (or no step count) samples there
            instead of the preset, whatever ``mu``; other step counts, custom timesteps or sigmas and
            ``strength < 1`` use the preset as usual.
    """

    _table_names = ("x0_x", "x0_out", "prev_x", "prev_out", "std", "eps_x", "eps_out", "alpha_s", "sigma_s", "scale")

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
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        invert_sigmas: bool = False,
        sigma_data: float = 0.5,
        lcm_boundary_condition: bool = False,
        timestep_scaling: float = 10.0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        gamma_from_eta: bool = False,
        check_finite: bool = True,
        trained_times: list[float] | None = None,
    ):
        self._setup()

    def _call_gamma(self, eta) -> float:
        """This call's gamma: the config's, or the ``eta`` passed to ``step`` (see ``gamma_from_eta``)."""
        if eta is None:
            return self._gamma
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta (TCD's name for gamma) must be in [0, 1], got {eta!r}.")
        return float(eta) if (self.config.get("gamma_from_eta") or eta > 0) else self._gamma

    def _x0_transform(self):
        """Clipping or dynamic thresholding of ``x0_hat`` (LCM / TCD / DDIM's options), or None."""
        cfg = self.config
        if cfg.get("thresholding"):
            return lambda x0: dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        if cfg.get("clip_sample"):
            return lambda x0: clip_x0(x0, cfg.clip_sample_range)
        return None

    def _columns(self, times: np.ndarray, gamma: float) -> dict:
        cfg = self.config
        c = self._transition(times, gamma)
        if cfg.get("lcm_boundary_condition"):
            scaled = torch.from_numpy(self._model_timesteps(times).astype(np.float64)) * cfg.timestep_scaling
            c["c_skip"], c["c_out"] = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25).sqrt()

        def rule(x, out, c):
            x0, eps = to_x0_eps(out, x, c["alpha_t"], c["sigma_t"], cfg.prediction_type, cfg.sigma_data)
            if "c_skip" in c:
                x0 = c["c_out"] * x0 + c["c_skip"] * x
            return {"x0": x0, "eps": eps, "prev": c["scale"] * consistency_step(x0, eps, c["alpha_s"], c["sigma_s"])}

        return linear_in_input(rule, c) | {k: c[k] for k in ("std", "alpha_s", "sigma_s", "scale")}

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        *args,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> FewStepSchedulerOutput | tuple:
        """Advance ``sample`` from ``timestep`` to the next time of the schedule.

        Positional arguments after ``sample`` follow LCM (``generator, return_dict``) or TCD (``eta, generator,
        return_dict``; a number there is ``eta``). ``eta`` is TCD's name for gamma (see ``gamma_from_eta``).
        Returns ``prev_sample`` (next model input, or the final sample after the last step) and ``denoised`` (this
        step's ``x0_hat``); a tuple of both when ``return_dict`` is False.
        """
        eta, generator, return_dict = step_arguments(args, eta, generator, return_dict)
        i = self._begin_step(model_output, timestep, sample)
        gamma = self._call_gamma(eta)
        transform = self._x0_transform()
        if transform is None:
            x, out = self._step_inputs(sample, model_output)
        else:  # clipping / thresholding: in float32
            dtype = self._compute_dtype(sample)
            x, out = sample.to(dtype), model_output.to(dtype)
        x0_x, x0_out, prev_x, prev_out, std, eps_x, eps_out, alpha_s, sigma_s, scale = self._constants(i, gamma)
        denoised = combine(x0_x, x, x0_out, out)
        noise = self._draw_noise(i, x, generator, gamma)
        if transform is None:  # the rule as per-step constants: prev = a x + b out (+ std noise)
            prev = combine(prev_x, x, prev_out, out)
            if noise is not None:
                prev = torch.add(prev, noise, alpha=std)
        else:  # x0_hat is changed in between: the rule itself
            denoised = transform(denoised)
            eps = combine(eps_x, x, eps_out, out)
            prev = consistency_step(denoised, eps, alpha_s, sigma_s, scale, std, noise)
        return self._finish(prev, denoised, model_output.dtype, return_dict)
