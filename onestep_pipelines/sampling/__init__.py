"""The sampling core: pure torch functions, no diffusers or ComfyUI imports.

Schedulers (``onestep_pipelines.schedulers``), ComfyUI samplers and training roll-outs all call
these functions, so that every update rule, prediction conversion and timestep preset exists once.
"""

from .loops import SigmaSpace, few_step_sigmas, parse_timesteps, sample_consistency, sample_flow_map, seeded_noise_sampler, with_r_sigma
from .predictions import (
    ALLOWED_PREDICTIONS,
    DEFAULT_PREDICTION,
    PREDICTION_TYPES,
    check_prediction_type,
    to_x0_eps,
)
from .presets import PRESETS, TimePoints, check_decreasing, check_num_steps, preset_times
from .steps import (
    consistency_step,
    consistency_target_time,
    flow_map_step,
    forward_noise,
    forward_noise_coefficients,
    vp_forward_noise_coefficients,
)
from .time import (
    TIME_TYPES,
    calculate_shift,
    check_time_type,
    dynamic_shift_sigmas,
    flow_coefficients,
    flow_sigma_from_coefficients,
    flow_sigma_from_trigflow,
    shift_sigmas,
    trigflow_coefficients,
    trigflow_t_from_coefficients,
    vp_alphas_cumprod,
    vp_coefficients,
    vp_timestep_from_coefficients,
)

__all__ = [
    "ALLOWED_PREDICTIONS",
    "DEFAULT_PREDICTION",
    "PREDICTION_TYPES",
    "PRESETS",
    "SigmaSpace",
    "TIME_TYPES",
    "TimePoints",
    "calculate_shift",
    "check_decreasing",
    "check_num_steps",
    "check_prediction_type",
    "check_time_type",
    "consistency_step",
    "consistency_target_time",
    "dynamic_shift_sigmas",
    "few_step_sigmas",
    "flow_coefficients",
    "flow_map_step",
    "flow_sigma_from_coefficients",
    "flow_sigma_from_trigflow",
    "forward_noise",
    "forward_noise_coefficients",
    "parse_timesteps",
    "preset_times",
    "sample_consistency",
    "sample_flow_map",
    "seeded_noise_sampler",
    "shift_sigmas",
    "to_x0_eps",
    "trigflow_coefficients",
    "trigflow_t_from_coefficients",
    "vp_alphas_cumprod",
    "vp_coefficients",
    "vp_forward_noise_coefficients",
    "vp_timestep_from_coefficients",
    "with_r_sigma",
]
