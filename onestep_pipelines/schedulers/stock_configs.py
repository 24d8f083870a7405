"""Stock diffusers scheduler configs seen from our schedulers: which time parametrisation and prediction a config
describes, which stock classes convert to and from ours, and how the stock options that shape a schedule are read.

``from_config`` keeps a stock config's own values (betas, shift, prediction type...). Stock LCM and TCD configs are
identical, so their differences (TCD's gamma, taken from ``step(eta=...)``, and trajectories ending at timestep 0;
LCM's boundary condition, and its last step returning the denoised sample even with ``set_alpha_to_one=False``) are
applied only when the config names its class (``_class_name``, present in every saved ``scheduler_config.json``).
FlowMatchEuler's ``shift_terminal``, ``time_shift_type`` and Karras / exponential / beta
spacings are honoured; its ``invert_sigmas`` (Mochi's reversed time) is refused by the schedulers with an error.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

VP_KEYS = ("beta_schedule", "beta_start", "beta_end", "trained_betas")
FLOW_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift")
SPACING_FLAGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}
# Keys that mean the same in the stock configs of a time parametrisation (the forward process, the prediction and the
# options that shape a schedule or a step): a stock class that reads one of our configs must get our values, not its
# own defaults.
SHARED_KEYS = {
    "vp": ("num_train_timesteps", "prediction_type", *VP_KEYS, "rescale_betas_zero_snr", "set_alpha_to_one",
           "original_inference_steps", "timestep_scaling", "clip_sample", "clip_sample_range", "thresholding",
           "dynamic_thresholding_ratio", "sample_max_value"),
    "flow": ("num_train_timesteps", *FLOW_KEYS, *SPACING_FLAGS, "base_image_seq_len", "max_image_seq_len", "time_shift_type",
             "shift_terminal", "invert_sigmas"),
    "trigflow": ("num_train_timesteps", "prediction_type", "sigma_data"),
}

# Stock classes whose configs convert to ours and back, by time parametrisation.
STOCK_BY_TIME_TYPE = {
    "vp": ["DDPMScheduler", "DDIMScheduler", "LCMScheduler", "TCDScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
           "DPMSolverMultistepScheduler"],
    "flow": ["FlowMatchEulerDiscreteScheduler", "FlowMatchLCMScheduler", "FlowMapEulerDiscreteScheduler"],
    "trigflow": ["SCMScheduler"],
}
# Our classes by the time parametrisations they sample (the ones ``compatibles`` may list).
OURS_BY_TIME_TYPE = {
    "vp": ["TDMScheduler", "ConsistencyScheduler"],
    "flow": ["TDMScheduler", "FlowMapScheduler", "ConsistencyScheduler"],
    "trigflow": ["ConsistencyScheduler"],
}
ALL_COMPATIBLES = sorted({name for names in (*STOCK_BY_TIME_TYPE.values(), *OURS_BY_TIME_TYPE.values()) for name in names})


def compatible_names(own: str, time_type: str) -> list[str]:
    """Classes a scheduler of class ``own`` with ``time_type`` converts to and from: the stock ones of that time type,
    then ours that sample it, ``own`` last (so a round trip through the last one is exact)."""
    ours = [name for name in OURS_BY_TIME_TYPE[time_type] if name != own]
    return STOCK_BY_TIME_TYPE[time_type] + ours + [own]


def infer_source_config(config: dict, infer_preset: bool = True, init_keys: set | None = None) -> dict:
    """Translate a stock diffusers scheduler config into our keys (time type, prediction type, preset, stock options).

    A config that already has ``time_type`` is ours; from another of our classes (other keys than ``init_keys``) its
    time parametrisation carries over even where it was that class's default (diffusers drops defaults it reads).
    """
    src = dict(config)
    if "time_type" in src:
        own_keys = {k for k in src if not k.startswith("_")}
        if init_keys is not None and own_keys != init_keys and "_use_default_values" in src:
            src["_use_default_values"] = [k for k in src["_use_default_values"] if k not in ("time_type", "prediction_type")]
        return src
    # diffusers drops the keys listed in `_use_default_values` when another class reads a config; the source
    # scheduler's defaults (e.g. DDPM's linear betas) are real values for us, so keep them all.
    out = {k: v for k, v in src.items() if k != "_use_default_values"}
    name = src.get("_class_name")
    if src.get("prediction_type") == "trigflow":
        out["time_type"] = "trigflow"
        if infer_preset:
            out["timestep_preset"] = "scm"
    elif any(k in src for k in VP_KEYS):
        out["time_type"] = "vp"
        if infer_preset and "original_inference_steps" in src:
            out["timestep_preset"] = "tcd" if name == "TCDScheduler" else "lcm"
        for flag in SPACING_FLAGS:  # a multistep solver's grid (Euler, DPM-Solver): few-step presets replace it
            if out.pop(flag, False):
                logger.warning("%s=True of the source %s config is not used: the few-step schedule comes from timestep_preset "
                               "(or pass timesteps= to set_timesteps).", flag, name or "scheduler")
    elif any(k in src for k in FLOW_KEYS):
        out["time_type"] = "flow"
        out["prediction_type"] = "flow"
    if name == "TCDScheduler":
        out.setdefault("gamma", 0.3)
        out["set_alpha_to_one"] = False
        out["gamma_from_eta"] = True
    elif name == "LCMScheduler":
        out["lcm_boundary_condition"] = True
        out["set_alpha_to_one"] = True  # LCM's last step returns the denoised sample whatever its set_alpha_to_one
    return out
