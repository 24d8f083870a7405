import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMapEulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    LCMScheduler,
    SCMScheduler,
    TCDScheduler,
)

from onestep_pipelines import ConsistencyScheduler, FlowMapScheduler, TDMScheduler
from parity import TOLERANCE, parity_rows

SHAPE = (2, 3, 4, 4)


@pytest.fixture(scope="module")
def rows():
    return parity_rows(seed=0)


def test_parity_table_covers_every_required_row(rows):
    names = {r.name for r in rows}
    for needle in ("LCMScheduler", "TCDScheduler(eta=0.0)", "TCDScheduler(eta=0.3)", "TCDScheduler(eta=1.0)",
                   "FlowMatchEuler", "FlowMatchLCM", "SCMScheduler", "FlowMap"):
        assert any(needle in n for n in names), needle
    assert {r.steps for r in rows} == {1, 2, 4}


def test_parity_every_step_within_tolerance(rows):
    bad = [(r.name, r.steps, r.max_abs_diff) for r in rows if r.max_abs_diff > TOLERANCE]
    assert not bad, bad


def test_parity_with_a_second_seed():
    assert all(r.passed for r in parity_rows(seed=123))


def test_parity_with_one_generator_per_image():
    """``generator=[g0, g1]`` draws image b's noise from g_b (diffusers' ``randn_tensor``), in every scheduler row."""
    bad = [(r.name, r.steps, r.max_abs_diff) for r in parity_rows(seed=10, per_image_generators=True) if not r.passed]
    assert not bad, bad


def test_generator_lists_draw_each_image_from_its_own_generator():
    ours = ConsistencyScheduler(gamma=1.0)
    ours.set_timesteps(2)
    x, out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), torch.zeros(SHAPE)

    def first_step(generator):
        ours.set_timesteps(2)
        return ours.step(out, ours.timesteps[0], x, generator=generator).prev_sample

    both = first_step([torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)])
    torch.testing.assert_close(both[1:], first_step([torch.Generator().manual_seed(99), torch.Generator().manual_seed(11)])[1:])
    torch.testing.assert_close(both[:1], first_step(torch.Generator().manual_seed(10))[:1])
    assert not torch.allclose(both[:1], first_step(torch.Generator().manual_seed(11))[:1])
    with pytest.raises(ValueError, match="list of 3 generators for a batch of 2"):
        first_step([torch.Generator() for _ in range(3)])


# ------------------------------------------------------------------------------------ from_config
@pytest.mark.parametrize(
    "stock,time_type,prediction,preset",
    [
        (LCMScheduler(), "vp", "epsilon", "lcm"),
        (DDPMScheduler(prediction_type="v_prediction"), "vp", "v_prediction", None),
        (DDIMScheduler(prediction_type="sample"), "vp", "sample", None),
        (EulerDiscreteScheduler(), "vp", "epsilon", None),
        (FlowMatchEulerDiscreteScheduler(shift=3.0), "flow", "flow", None),
        (FlowMatchLCMScheduler(), "flow", "flow", None),
        (FlowMapEulerDiscreteScheduler(), "flow", "flow", None),
        (SCMScheduler(), "trigflow", "trigflow", "scm"),
    ],
)
def test_from_stock_config_keeps_time_and_prediction(stock, time_type, prediction, preset):
    ours = ConsistencyScheduler.from_config(stock.config)
    assert ours.config.time_type == time_type
    assert ours.config.prediction_type == prediction
    assert ours.config.timestep_preset == preset
    if time_type == "vp":
        torch.testing.assert_close(ours.alphas_cumprod, stock.alphas_cumprod)
    if hasattr(stock.config, "shift"):
        assert ours.config.shift == stock.config.shift


def test_from_config_reads_class_name_of_saved_configs(tmp_path):
    TCDScheduler().save_pretrained(tmp_path / "tcd")
    LCMScheduler().save_pretrained(tmp_path / "lcm")
    tcd = ConsistencyScheduler.from_pretrained(tmp_path / "tcd")
    assert (tcd.config.gamma, tcd.config.set_alpha_to_one, tcd.config.timestep_preset, tcd.config.gamma_from_eta) == (0.3, False, "tcd", True)
    lcm = ConsistencyScheduler.from_pretrained(tmp_path / "lcm")
    assert lcm.config.lcm_boundary_condition and lcm.config.gamma == 1.0
    # ... and then LCM matches step for step, with the boundary condition, to float32 precision
    stock = LCMScheduler()
    for s in (stock, lcm):
        s.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    xa, xb = x.clone(), x.clone()
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in stock.timesteps:
        out = torch.randn(SHAPE, generator=g)
        xa = stock.step(out, t, xa, generator=ga).prev_sample
        xb = lcm.step(out, t, xb, generator=gb).prev_sample
    assert (xa - xb).abs().max() <= TOLERANCE * xa.abs().max()


def test_flow_map_from_vp_config_is_refused():
    with pytest.raises(ValueError, match="time_type='vp'"):
        FlowMapScheduler.from_config(DDIMScheduler().config)


def test_kwargs_override_config():
    ours = ConsistencyScheduler.from_config(LCMScheduler().config, gamma=0.2, timestep_preset="dmd2")
    assert ours.config.gamma == 0.2 and ours.config.timestep_preset == "dmd2"


# --------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "sched",
    [
        ConsistencyScheduler(gamma=0.3, timestep_preset="dmd2"),
        ConsistencyScheduler(time_type="flow", shift=3.0, gamma=0.0),
        ConsistencyScheduler(time_type="trigflow", prediction_type="trigflow"),
        FlowMapScheduler(gamma=0.5, shift=2.0),
        TDMScheduler(time_type="flow", shift=3.0),
        TDMScheduler(),
    ],
    ids=["cm-vp", "cm-flow", "cm-trig", "flowmap", "tdm-flow", "tdm-vp"],
)
def test_save_load_round_trip(sched, tmp_path):
    sched.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == type(sched).__name__
    loaded = type(sched).from_pretrained(tmp_path)
    def public(config):
        return {k: v for k, v in config.items() if k != "_use_default_values"}

    assert public(loaded.config) == public(sched.config)
    for s in (sched, loaded):
        s.set_timesteps(4)
    torch.testing.assert_close(loaded.timesteps, sched.timesteps)


# ------------------------------------------------------------------------ full-loop regression
def _full_loop(sched, n, seed=0):
    """A deterministic stand-in model on a fixed input; returns (sum, mean |x|) of the final sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    sched.set_timesteps(n)
    for t in sched.timesteps:
        tt = t.float() / (1000.0 if sched.config.time_type != "trigflow" else 1.0)
        out = 0.7 * x - 0.3 * torch.tanh(x * (1 + tt))
        x = sched.step(out, t, x, generator=g).prev_sample
    return x.sum().item(), x.abs().mean().item()


REGRESSION = {
    "consistency-vp-lcm": (ConsistencyScheduler.from_config(LCMScheduler().config), 4),
    "consistency-vp-tcd": (ConsistencyScheduler(gamma=0.3, timestep_preset="tcd", set_alpha_to_one=False), 4),
    "consistency-vp-v": (ConsistencyScheduler(prediction_type="v_prediction", gamma=0.0, timestep_preset="dmd2"), 2),
    "consistency-flow": (ConsistencyScheduler(time_type="flow", shift=3.0, gamma=0.5), 4),
    "consistency-trigflow": (ConsistencyScheduler(time_type="trigflow", timestep_preset="rcm"), 4),
    "flowmap": (FlowMapScheduler(shift=3.0), 4),
    "flowmap-gamma": (FlowMapScheduler(gamma=0.5), 2),
    "tdm-vp": (TDMScheduler(), 4),
    "tdm-flow": (TDMScheduler(time_type="flow", shift=3.0), 4),
}
EXPECTED = {  # recorded with diffusers 0.42.1 / torch 2.13.0 CPU; flowmap and tdm-flow agree (both are Euler moves)
    "consistency-vp-lcm": (7.3950700759887695, 1.285789132118225),
    "consistency-vp-tcd": (11.065113067626953, 2.035515069961548),
    "consistency-vp-v": (0.4839564263820648, 0.11319327354431152),
    "consistency-flow": (4.62564754486084, 0.38849273324012756),
    "consistency-trigflow": (0.9728423953056335, 0.1120324358344078),
    "flowmap": (4.213588237762451, 0.5280820727348328),
    "flowmap-gamma": (0.29432791471481323, 0.37683942914009094),
    "tdm-vp": (16.93433380126953, 2.5880556106567383),
    "tdm-flow": (4.213589668273926, 0.5280820727348328),
}


@pytest.mark.parametrize("name", list(REGRESSION))
def test_full_loop_regression(name):
    sched, n = REGRESSION[name]
    total, mean_abs = _full_loop(sched, n)
    exp_total, exp_mean = EXPECTED[name]
    assert total == pytest.approx(exp_total, rel=1e-4, abs=1e-3)
    assert mean_abs == pytest.approx(exp_mean, rel=1e-4)


# ------------------------------------------------------------------------------------ behaviour
def test_gamma_zero_is_deterministic_and_gamma_positive_uses_generator():
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)

    def run(gamma, seed):
        s = ConsistencyScheduler(gamma=gamma)
        s.set_timesteps(2)
        return s.step(out, s.timesteps[0], x, generator=torch.Generator().manual_seed(seed)).prev_sample

    torch.testing.assert_close(run(0.0, 1), run(0.0, 2))
    assert not torch.allclose(run(0.5, 1), run(0.5, 2))
    torch.testing.assert_close(run(0.5, 1), run(0.5, 1))


def test_tdm_is_the_consistency_step_with_gamma_zero():
    tdm, cm = TDMScheduler(), ConsistencyScheduler(gamma=0.0, timestep_preset="tdm")
    tdm.set_timesteps(4)
    cm.set_timesteps(4)
    assert tdm.timesteps.tolist() == [999, 749, 499, 249]
    x = torch.randn(SHAPE)
    xa, xb = x.clone(), x.clone()
    for t in tdm.timesteps:
        out = torch.randn(SHAPE)
        xa, xb = tdm.step(out, t, xa).prev_sample, cm.step(out, t, xb).prev_sample
    torch.testing.assert_close(xa, xb, rtol=0, atol=0)


def test_flow_map_exposes_r():
    s = FlowMapScheduler(shift=3.0)
    s.set_timesteps(4)
    torch.testing.assert_close(s.r_timesteps, s.sigmas[1:] * 1000)
    assert s.r_timestep_for(s.timesteps[0]) == s.r_timesteps[0]
    s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE))
    assert s.r_timestep_for(s.timesteps[1]) == s.r_timesteps[1]
    sg = FlowMapScheduler(gamma=0.5)
    sg.set_timesteps(2)
    torch.testing.assert_close(sg.r_timesteps, torch.tensor([250.0, 0.0]))  # (1 - gamma) * next sigma
    # one step with r = 0: x_0 = x_1 - 1 * u
    s1 = FlowMapScheduler()
    s1.set_timesteps(1)
    x, u = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(s1.step(u, s1.timesteps[0], x).prev_sample, x - u)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_dtype_follows_model_output(dtype):
    s = ConsistencyScheduler(time_type="flow")
    s.set_timesteps(2)
    out = s.step(torch.randn(SHAPE, dtype=dtype), s.timesteps[0], torch.randn(SHAPE, dtype=dtype), generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == dtype and out.denoised.dtype == dtype
    assert torch.isfinite(out.prev_sample.float()).all()


def test_add_noise_matches_stock():
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([999, 10])
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(ConsistencyScheduler().add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t))
    fm = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(4)
    ours = ConsistencyScheduler(time_type="flow", shift=3.0)
    ours.set_timesteps(4)
    ts = fm.timesteps[1:2].repeat(2)
    torch.testing.assert_close(ours.scale_noise(x0, ts, noise), fm.scale_noise(x0, ts, noise))


def test_custom_timesteps_and_sigmas():
    s = ConsistencyScheduler()
    s.set_timesteps(timesteps=[999, 399])
    assert s.timesteps.tolist() == [999, 399] and s.num_inference_steps == 2
    f = ConsistencyScheduler(time_type="flow", use_dynamic_shifting=True)
    f.set_timesteps(sigmas=[1.0, 0.5], mu=1.0)
    assert f.sigmas[-1] == 0 and len(f.timesteps) == 2
    t = ConsistencyScheduler(time_type="trigflow")
    t.set_timesteps(timesteps=[1.5, 0.8])
    assert t.timesteps.tolist() == pytest.approx([1.5, 0.8])
    r = ConsistencyScheduler(time_type="flow", timestep_preset="rcm")
    r.set_timesteps(4)
    assert r.timesteps[0] == pytest.approx(1000 * 80 / 81, rel=1e-5)  # sin/(sin+cos) of atan(80)


@pytest.mark.parametrize("cls", [ConsistencyScheduler, FlowMapScheduler, TDMScheduler])
def test_trained_times_are_where_the_student_samples(cls, tmp_path):
    """A student's recorded training times replace the preset at their step count (any mu), survive save / load, and
    leave other step counts, custom timesteps and image-to-image strength to the preset."""
    assert cls().config.trained_times is None  # (stock configs are unchanged)
    flow = cls(time_type="flow", use_dynamic_shifting=True, trained_times=[1.0, 0.2])
    flow.save_pretrained(tmp_path)
    flow = cls.from_pretrained(tmp_path)
    for kwargs in ({"num_inference_steps": 2, "mu": 1.2}, {"num_inference_steps": None, "mu": 0.5}):
        flow.set_timesteps(**kwargs)
        assert flow.sigmas.tolist() == pytest.approx([1.0, 0.2, 0.0]) and flow.timesteps.tolist() == pytest.approx([1000.0, 200.0])
    flow.set_timesteps(3, mu=0.0)
    assert flow.sigmas[1].item() != pytest.approx(0.2) and len(flow.timesteps) == 3
    flow.set_timesteps(sigmas=[1.0, 0.6], mu=0.0)
    assert flow.sigmas[1].item() == pytest.approx(0.6)
    if "vp" not in cls._allowed_time_types:
        return
    vp = cls(time_type="vp", trained_times=[999, 250])
    vp.set_timesteps(2)
    assert vp.timesteps.tolist() == [999, 250]
    vp.set_timesteps(2, strength=0.5)
    assert vp.timesteps.tolist() != [999, 250]


@pytest.mark.parametrize("kwargs, match", [
    ({"trained_times": [999.5, 10]}, "trained_times"),
    ({"trained_times": [10, 999]}, "strictly decreasing"),
    ({"trained_times": [999, 10.5]}, "integer"),
    ({"trained_times": []}, "non-empty"),
    ({"trained_times": "999"}, "non-empty list"),
    ({"time_type": "flow", "trained_times": [1.5, 0.2]}, "trained_times"),
    ({"time_type": "flow", "trained_times": [0.5, 0.0]}, "trained_times"),
])
def test_bad_trained_times(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyScheduler(**kwargs)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_gamma_out_of_range(gamma):
    with pytest.raises(ValueError, match="gamma"):
        ConsistencyScheduler(gamma=gamma)
    with pytest.raises(ValueError, match="gamma"):
        FlowMapScheduler(gamma=gamma)


@pytest.mark.parametrize("n", [0, -2])
def test_steps_not_positive(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        ConsistencyScheduler().set_timesteps(n)


def test_more_steps_than_the_preset_allows():
    with pytest.raises(ValueError, match="at most 4"):
        ConsistencyScheduler(timestep_preset="dmd2").set_timesteps(5)
    with pytest.raises(ValueError, match="at most 50"):
        ConsistencyScheduler.from_config(LCMScheduler().config).set_timesteps(60)
    with pytest.raises(ValueError, match="not strictly decreasing"):
        ConsistencyScheduler(num_train_timesteps=10).set_timesteps(20)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"timesteps": [499, 999]}, "strictly decreasing"),
        ({"timesteps": [999, 999]}, "strictly decreasing"),
        ({"timesteps": [1000, 10]}, "lie in"),
        ({"timesteps": [999, -1]}, "lie in"),
        ({"timesteps": [999.5, 10]}, "lie in|integers"),
        ({"timesteps": [999, 10], "sigmas": [1.0, 0.5]}, "not both"),
        ({"sigmas": [1.0, 0.5]}, "flow"),
        ({}, "needs"),
        ({"num_inference_steps": 2, "timesteps": [999, 10]}, "not both"),
    ],
)
def test_bad_vp_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyScheduler().set_timesteps(**kwargs)


@pytest.mark.parametrize("kwargs,match", [({"timesteps": [1000, 0]}, "lie in"), ({"sigmas": [1.2, 0.5]}, "lie in"), ({"sigmas": [0.5, 0.9]}, "decreasing")])
def test_bad_flow_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyScheduler(time_type="flow").set_timesteps(**kwargs)


def test_dynamic_shift_needs_mu():
    with pytest.raises(ValueError, match="mu"):
        ConsistencyScheduler(time_type="flow", use_dynamic_shifting=True).set_timesteps(2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"time_type": "flow", "prediction_type": "epsilon"}, "cannot be used"),
        ({"time_type": "vp", "prediction_type": "flow"}, "cannot be used"),
        ({"time_type": "trigflow", "prediction_type": "v_prediction"}, "cannot be used"),
        ({"time_type": "edm"}, "time_type"),
        ({"time_type": "vp", "shift": 3.0}, "shift"),
        ({"time_type": "flow", "shift": -1.0}, "shift"),
        ({"timestep_preset": "bogus"}, "bogus"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyScheduler(**kwargs).set_timesteps(2)


def test_tdm_refuses_trigflow():
    with pytest.raises(ValueError, match="does not support"):
        TDMScheduler(time_type="trigflow")


@pytest.mark.parametrize("cls", [ConsistencyScheduler, FlowMapScheduler, TDMScheduler])
def test_step_before_set_timesteps(cls):
    s = cls.from_config(FlowMatchEulerDiscreteScheduler().config)
    with pytest.raises(ValueError, match="before set_timesteps"):
        s.step(torch.randn(SHAPE), 999, torch.randn(SHAPE))


@pytest.mark.parametrize("cls", [ConsistencyScheduler, FlowMapScheduler, TDMScheduler])
def test_nan_model_output_names_the_step(cls):
    s = cls.from_config(FlowMatchEulerDiscreteScheduler().config)
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    x = s.step(torch.randn(SHAPE), s.timesteps[0], x).prev_sample
    bad = torch.randn(SHAPE)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"step 2/4 \(timestep 750"):
        s.step(bad, s.timesteps[1], x)


def test_nan_check_on_accelerators_waits_for_the_last_step_and_names_the_first_bad_one():
    s = FlowMapScheduler()
    s._immediate_check_devices = ()  # behave as on an accelerator: no host read until the last step
    s.set_timesteps(3)
    x = torch.randn(SHAPE)
    bad = torch.full(SHAPE, float("nan"))
    x = s.step(torch.randn(SHAPE), s.timesteps[0], x).prev_sample
    x = s.step(bad, s.timesteps[1], x).prev_sample  # no error yet
    with pytest.raises(ValueError, match=r"step 2/3 \(timestep"):
        s.step(torch.randn(SHAPE), s.timesteps[2], x)


def test_check_finite_can_be_turned_off():
    s = ConsistencyScheduler(check_finite=False)
    s.set_timesteps(1)
    out = s.step(torch.full(SHAPE, float("nan")), s.timesteps[0], torch.randn(SHAPE)).prev_sample
    assert torch.isnan(out).all()


def test_too_many_steps_and_shape_mismatch():
    s = ConsistencyScheduler()
    s.set_timesteps(1)
    x = s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE)).prev_sample
    with pytest.raises(ValueError, match="called 2 times"):
        s.step(torch.randn(SHAPE), s.timesteps[0], x)
    s.set_timesteps(1)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.randn(1, 3, 4, 4), s.timesteps[0], x)
    s.set_timesteps(2)
    with pytest.raises(ValueError, match="not on the current schedule"):
        s.step(torch.randn(SHAPE), 123, x)
