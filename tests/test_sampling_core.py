import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from onestep_pipelines.sampling import (
    ALLOWED_PREDICTIONS,
    calculate_shift,
    check_decreasing,
    check_prediction_type,
    consistency_step,
    consistency_target_time,
    dynamic_shift_sigmas,
    flow_coefficients,
    flow_map_step,
    flow_sigma_from_coefficients,
    flow_sigma_from_trigflow,
    forward_noise,
    forward_noise_coefficients,
    preset_times,
    shift_sigmas,
    to_x0_eps,
    trigflow_coefficients,
    trigflow_t_from_coefficients,
    vp_alphas_cumprod,
    vp_coefficients,
    vp_forward_noise_coefficients,
    vp_timestep_from_coefficients,
)

SD = 0.5


def _coeffs(time_type):
    if time_type == "vp":
        return vp_coefficients(vp_alphas_cumprod().double(), torch.tensor(600))
    if time_type == "flow":
        return flow_coefficients(torch.tensor(0.6, dtype=torch.float64))
    return trigflow_coefficients(torch.tensor(0.9, dtype=torch.float64), SD)


def _model_output(pred, x0, eps, alpha, sigma):
    return {
        "epsilon": eps,
        "v_prediction": alpha * eps - sigma * x0,
        "sample": x0,
        "flow": eps - x0,
        "trigflow": alpha * SD * eps - (sigma / SD) * x0,  # cos(t) sd eps - sin(t) x0
    }[pred]


@pytest.mark.parametrize("time_type,pred", [(t, p) for t, ps in ALLOWED_PREDICTIONS.items() for p in ps])
def test_prediction_conversions_recover_x0_and_eps(time_type, pred):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    alpha, sigma = _coeffs(time_type)
    x = alpha * x0 + sigma * eps
    out = _model_output(pred, x0, eps, alpha, sigma)
    x0_hat, eps_hat = to_x0_eps(out, x, alpha, sigma, pred, sigma_data=SD)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


@pytest.mark.parametrize("time_type,pred", [("flow", "epsilon"), ("flow", "v_prediction"), ("vp", "flow"), ("trigflow", "flow"), ("vp", "trigflow"), ("vp", "x0")])
def test_prediction_type_the_time_type_cannot_use(time_type, pred):
    with pytest.raises(ValueError, match="prediction_type"):
        check_prediction_type(time_type, pred)


def test_unknown_time_type():
    with pytest.raises(ValueError, match="time_type"):
        check_prediction_type("edm", "epsilon")


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_vp_alphas_cumprod_matches_diffusers(schedule, zero_snr):
    ref = DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr).alphas_cumprod
    ours = vp_alphas_cumprod(1000, schedule, 0.0001, 0.02, None, zero_snr)
    torch.testing.assert_close(ours[:-1], ref[:-1], rtol=0, atol=0)
    assert (ours[-1] == 2**-24) if zero_snr else (ours[-1] == ref[-1])


def test_vp_bad_schedule_and_trained_betas():
    with pytest.raises(ValueError, match="beta_schedule"):
        vp_alphas_cumprod(beta_schedule="cosine")
    with pytest.raises(ValueError, match="trained_betas"):
        vp_alphas_cumprod(10, trained_betas=[0.1] * 9)


def test_shifts_match_flow_match_euler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = np.linspace(1.0, 0.25, 4)
    sched.set_timesteps(sigmas=sigmas.tolist())
    np.testing.assert_allclose(shift_sigmas(sigmas, 3.0), sched.sigmas[:-1].numpy(), rtol=1e-6)
    dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = calculate_shift(1024)
    dyn.set_timesteps(sigmas=sigmas.tolist(), mu=mu)
    np.testing.assert_allclose(dynamic_shift_sigmas(sigmas, mu), dyn.sigmas[:-1].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(sigmas, 0.0)


def test_time_conversions_are_consistent():
    sig = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    s, scale = flow_sigma_from_coefficients(*flow_coefficients(sig))
    torch.testing.assert_close(s, sig)
    torch.testing.assert_close(scale, torch.ones_like(sig))
    t = torch.tensor([1.5, 1.0, 0.3], dtype=torch.float64)
    t_back, _ = trigflow_t_from_coefficients(*trigflow_coefficients(t, SD), SD)
    torch.testing.assert_close(t_back, t)
    # TrigFlow -> flow with unit data scale is SANA-Sprint's sin / (sin + cos)
    torch.testing.assert_close(flow_sigma_from_coefficients(torch.cos(t), torch.sin(t))[0], flow_sigma_from_trigflow(t))
    acp = vp_alphas_cumprod()
    a, b = vp_coefficients(acp, torch.tensor([750, 250]))
    assert vp_timestep_from_coefficients(acp, a, b).tolist() == [750, 250]


def test_forward_noise_from_clean_and_vp_form():
    acp = vp_alphas_cumprod().double()
    a_s, s_s = vp_coefficients(acp, torch.tensor(200))
    a_t, s_t = vp_coefficients(acp, torch.tensor(700))
    scale, std = forward_noise_coefficients(a_s, s_s, a_t, s_t)
    vscale, vstd = vp_forward_noise_coefficients(acp[200], acp[700])
    torch.testing.assert_close((scale, std), (vscale, vstd))
    # marginal: x_s ~ q(x_s|x0) then q(x_t|x_s) gives q(x_t|x0): variance sigma_t^2
    torch.testing.assert_close(scale**2 * s_s**2 + std**2, s_t**2)
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    x0, z = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    scale, std = forward_noise_coefficients(one, zero, a_t, s_t)
    torch.testing.assert_close(forward_noise(x0, scale, std, z), a_t * x0 + s_t * z)


def test_consistency_step_gamma0_is_euler_on_flow():
    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    s, s_next = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    x0, eps = to_x0_eps(u, x, *flow_coefficients(s), "flow")
    out = consistency_step(x0, eps, *flow_coefficients(s_next))
    torch.testing.assert_close(out, x + (s_next - s) * u)
    torch.testing.assert_close(flow_map_step(x, u, s, s_next), out)


def test_consistency_target_time():
    assert consistency_target_time(499, -1, 0.0, discrete=True) == 499
    assert consistency_target_time(499, -1, 1.0, discrete=True) == -1
    assert consistency_target_time(499, 0, 0.3, discrete=True) == math.floor(0.7 * 499)
    assert consistency_target_time(0.5, 0.0, 0.5) == pytest.approx(0.25)


def _to_timesteps(points, T=1000):
    return (np.round(points.values * T) - 1).astype(int).tolist()


def test_presets():
    assert _to_timesteps(preset_times("lcm", 4)) == [999, 759, 499, 259]
    assert _to_timesteps(preset_times("lcm", 2)) == [999, 499]
    assert _to_timesteps(preset_times("tcd", 1)) == [999]
    assert _to_timesteps(preset_times("dmd2", 4)) == [999, 749, 499, 249]
    assert _to_timesteps(preset_times("dmd2", 2)) == [999, 499]
    assert _to_timesteps(preset_times("tdm", 4)) == [999, 749, 499, 249]
    np.testing.assert_allclose(preset_times("trailing", 4).values, [1, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(preset_times("uniform", 2).values, [1, 0.5])
    rcm = preset_times("rcm", 4)
    assert rcm.domain == "trigflow"
    np.testing.assert_allclose(rcm.values, [math.atan(80), 1.5, 1.4, 1.0])
    np.testing.assert_allclose(preset_times("scm", 2).values, [1.5708, 1.3])


@pytest.mark.parametrize(
    "preset,n,match",
    [("dmd2", 5, "at most 4"), ("rcm", 5, "at most 4"), ("lcm", 51, "at most 50"), ("trailing", 0, "positive"),
     ("trailing", -1, "positive"), ("trailing", 2.5, "positive integer"), ("nope", 2, "unknown")],
)
def test_preset_bad_input(preset, n, match):
    with pytest.raises(ValueError, match=match):
        preset_times(preset, n)


@pytest.mark.parametrize(
    "values,match", [([999, 999], "strictly decreasing"), ([10, 20], "strictly decreasing"), ([1000, 10], "lie in"), ([], "non-empty"), ([float("nan")], "finite")]
)
def test_check_decreasing(values, match):
    with pytest.raises(ValueError, match=match):
        check_decreasing(values, "timesteps", 0, 999)


def test_core_imports_no_diffusers_or_comfy():
    """The sampling core stays framework-free so that ComfyUI samplers and training share it."""
    import ast
    import pathlib

    import onestep_pipelines.sampling as core

    for path in pathlib.Path(core.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in {"diffusers", "comfy", "comfy_api", "transformers"}, (path.name, name)
