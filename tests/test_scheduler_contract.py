"""What a diffusers user may expect of our schedulers as stand-ins for the stock ones (one test per point of the
drop-in contract; diffusers' own test files run against them in test_diffusers_contract.py)."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FlowMapEulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    LCMScheduler,
    SCMScheduler,
    TCDScheduler,
)

from onestep_pipelines import ConsistencyScheduler, FlowMapScheduler, TDMScheduler
from onestep_pipelines.testing.tiny_pipelines import FLUX2_SCHEDULER, QWEN_IMAGE_SCHEDULER, Z_IMAGE_SCHEDULER, tiny_pipeline

SHAPE = (2, 4, 8, 8)


def run(scheduler, outputs, x, generator_seed=0, **step_kwargs):
    g = torch.Generator().manual_seed(generator_seed)
    for t, out in zip(scheduler.timesteps, outputs):
        x = scheduler.step(out, t, x, generator=g, **step_kwargs).prev_sample
    return x


# 1. the LCM pipelines' set_timesteps arguments --------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"original_inference_steps": 25}, {"strength": 0.5}, {"original_inference_steps": 20, "strength": 0.6}])
def test_set_timesteps_takes_lcm_arguments_and_matches_lcm(kwargs):
    stock, ours = LCMScheduler(), ConsistencyScheduler.from_config(LCMScheduler().config)
    stock.set_timesteps(4, **kwargs)
    ours.set_timesteps(4, **kwargs)
    assert ours.timesteps.tolist() == stock.timesteps.tolist()
    custom = ConsistencyScheduler.from_config(LCMScheduler().config)
    custom.set_timesteps(timesteps=[999, 759, 499, 259], strength=0.5)  # the first steps dropped, as LCM does
    stock.set_timesteps(timesteps=[999, 759, 499, 259], strength=0.5)
    assert custom.timesteps.tolist() == stock.timesteps.tolist() == [499, 259]


# 2. eta ------------------------------------------------------------------------------------------------------
def test_tcd_eta_positional_or_keyword_overrides_gamma_for_the_call():
    g = torch.Generator().manual_seed(0)
    x, outs = torch.randn(SHAPE, generator=g), [torch.randn(SHAPE, generator=g) for _ in range(4)]
    stock = TCDScheduler()
    ours = ConsistencyScheduler.from_config({**TCDScheduler().config, "_class_name": "TCDScheduler"})
    for eta in (0.0, 0.3, 1.0):
        stock.set_timesteps(4)
        ours.set_timesteps(4)
        a, b = x.clone(), x.clone()
        ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for t, out in zip(stock.timesteps, outs):
            a = stock.step(out, t, a, eta, ga).prev_sample
            b = ours.step(out, t, b, eta, gb).prev_sample  # TCD's positional order: eta, generator
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    lcm_like = ConsistencyScheduler(gamma=1.0, timestep_preset="tcd", set_alpha_to_one=False)
    lcm_like.set_timesteps(4)
    gamma_one = run(lcm_like, outs, x.clone())
    lcm_like.set_timesteps(4)
    assert torch.equal(run(lcm_like, outs, x.clone(), eta=0.0), gamma_one)  # the stock pipelines' default eta keeps gamma
    lcm_like.set_timesteps(4)
    stock.set_timesteps(4)
    torch.testing.assert_close(run(lcm_like, outs, x.clone(), eta=0.3), run(stock, outs, x.clone(), eta=0.3), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eta"):
        lcm_like.set_timesteps(4)
        lcm_like.step(outs[0], lcm_like.timesteps[0], x, eta=-0.5)


# 3. compatibles --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", [
    ConsistencyScheduler(gamma=0.3, timestep_preset="dmd2"), ConsistencyScheduler(time_type="flow", shift=3.0),
    ConsistencyScheduler(time_type="trigflow"), FlowMapScheduler(shift=2.0, gamma=0.5), TDMScheduler(), TDMScheduler(time_type="flow"),
], ids=["consistency-vp", "consistency-flow", "consistency-trigflow", "flowmap", "tdm-vp", "tdm-flow"])
def test_compatibles_list_only_what_converts_and_round_trips_keep_the_time_type(scheduler):
    names = [c.__name__ for c in scheduler.compatibles]
    assert names[-1] == type(scheduler).__name__
    for cls in scheduler.compatibles:
        other = cls.from_config(scheduler.config)  # every listed class builds from our config ...
        back = type(scheduler).from_config(other.config)  # ... and converts back to the same time parametrisation
        assert back.config.time_type == scheduler.config.time_type, cls.__name__
        assert back.config.prediction_type == scheduler.config.prediction_type, cls.__name__
    time_type = scheduler.config.time_type
    if time_type == "vp":
        assert not any(n.startswith(("FlowMatch", "FlowMap", "SCM")) for n in names)
    else:
        assert "DDIMScheduler" not in names and "LCMScheduler" not in names
    if time_type != "trigflow":
        assert "SCMScheduler" not in names


@pytest.mark.parametrize("scheduler", [
    ConsistencyScheduler(), ConsistencyScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction"),
    TDMScheduler(), ConsistencyScheduler(time_type="flow", shift=3.0), FlowMapScheduler(), ConsistencyScheduler(time_type="trigflow"),
], ids=["consistency-vp-defaults", "consistency-vp-linear-v", "tdm-vp", "consistency-flow", "flowmap-defaults", "consistency-trigflow"])
def test_stock_classes_read_our_values_even_where_they_are_our_defaults(scheduler):
    """``DDPMScheduler.from_config(ours.config)`` gives back the betas, prediction and shift ours samples with (diffusers
    drops the keys a config marks as its class's defaults, and ours are not the stock classes' defaults)."""
    for cls in scheduler.compatibles:
        other = cls.from_config(scheduler.config)
        differ = {k: (v, other.config[k]) for k, v in scheduler.config.items()
                  if not k.startswith("_") and k in other.config and k not in ("gamma", "timestep_preset") and other.config[k] != v}
        assert not differ, (cls.__name__, differ)
        if hasattr(other, "alphas_cumprod") and scheduler.alphas_cumprod is not None:
            torch.testing.assert_close(other.alphas_cumprod, scheduler.alphas_cumprod)


def test_flow_map_is_not_built_from_a_vp_config():
    with pytest.raises(ValueError, match="time_type='vp'"):
        FlowMapScheduler.from_config(DDIMScheduler().config)


# 4. FlowMatchEuler's schedule options --------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"shift_terminal": 0.1}, {"shift": 3.0, "shift_terminal": 0.02}, {"shift": 3.0, "use_karras_sigmas": True},
    {"shift": 3.0, "use_exponential_sigmas": True}, {"shift": 3.0, "use_beta_sigmas": True},
    {"use_dynamic_shifting": True, "time_shift_type": "linear"},
])
def test_flow_match_schedule_options_are_honoured(options):
    pytest.importorskip("scipy") if options.get("use_beta_sigmas") else None
    stock = FlowMatchEulerDiscreteScheduler(**options)
    ours = ConsistencyScheduler.from_config(stock.config, timestep_preset="linspace", gamma=0.0)
    mu = {"mu": 0.8} if options.get("use_dynamic_shifting") else {}
    stock.set_timesteps(8, **mu)
    ours.set_timesteps(8, **mu)
    torch.testing.assert_close(ours.sigmas, stock.sigmas.float(), rtol=1e-5, atol=1e-6)
    sigmas = [1.0, 0.75, 0.5, 0.25]  # the Flux pipeline's custom sigmas go through the same options
    stock.set_timesteps(sigmas=sigmas, **mu)
    ours.set_timesteps(sigmas=sigmas, **mu)
    torch.testing.assert_close(ours.sigmas, stock.sigmas.float(), rtol=1e-5, atol=1e-6)


# The schedules of the 2026 families, called as their diffusers 0.42 pipelines call them: sigmas linspace(1, 1/N, N),
# a mu (QwenImagePipeline and ZImagePipeline: calculate_shift of the image tokens; Flux2Pipeline: compute_empirical_mu),
# set_begin_index(0), step(velocity, t, latents). Scheduler configs as on their Hub repos (Qwen/Qwen-Image,
# black-forest-labs/FLUX.2-dev, Tongyi-MAI/Z-Image-Turbo).
FAMILY_SCHEDULES = {
    "qwen-image": QWEN_IMAGE_SCHEDULER,
    "flux2": FLUX2_SCHEDULER,
    "z-image": Z_IMAGE_SCHEDULER,
}


def _family_mu(family: str, config, image_seq_len: int, steps: int) -> float:
    if family == "flux2":
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_seq_len, steps)
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    return calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)


@pytest.mark.parametrize("family", sorted(FAMILY_SCHEDULES))
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_the_2026_families_schedules_equal_flow_match_euler_as_their_pipelines_call_them(family, steps):
    stock = FlowMatchEulerDiscreteScheduler(**FAMILY_SCHEDULES[family])
    ours = ConsistencyScheduler.from_config(stock.config, gamma=0.0)  # gamma 0: the Euler / DDIM update
    mu = _family_mu(family, stock.config, image_seq_len=4096, steps=steps)  # 1024 px: (1024 / 16)^2 packed tokens
    sigmas = np.linspace(1.0, 1 / steps, steps)
    latents = {}
    for name, scheduler in (("stock", stock), ("ours", ours)):
        with np.errstate(divide="ignore", invalid="ignore"):  # the stock 1-step Qwen-Image schedule (below)
            scheduler.set_timesteps(steps, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            velocity = torch.sin(x + t / 1000) - 0.5 * x  # any smooth field, equal for both
            x = scheduler.step(velocity, t, x, return_dict=False)[0]
        latents[name] = x
    if family == "qwen-image" and steps == 1:  # shift_terminal stretches 1 - sigma by 1 / (1 - sigma_last) = 1 / 0: stock NaN
        assert stock.sigmas[:-1].isnan().all() and latents["stock"].isnan().all()
        assert ours.sigmas.tolist() == [1.0, 0.0] and latents["ours"].isfinite().all()  # ours: the one step from noise to data
        return
    torch.testing.assert_close(ours.sigmas, stock.sigmas.float(), rtol=1e-5, atol=1e-6)
    assert (latents["ours"] - latents["stock"]).norm() <= 1e-5 * latents["stock"].norm()


# each family's stock pipeline with and without its CFG (FLUX.2 [dev]: two values of its guidance embedding)
FAMILY_CALLS = {
    "qwen_image": [{"true_cfg_scale": 1.0}, {"negative_prompt": "blurry", "true_cfg_scale": 4.0}],
    "flux2": [{"guidance_scale": 1.0}, {"guidance_scale": 4.0}],
    "flux2_klein": [{"guidance_scale": 1.0}, {"guidance_scale": 4.0}],
    "z_image": [{"guidance_scale": 0.0}, {"negative_prompt": "blurry", "guidance_scale": 3.0}],
}


@pytest.mark.parametrize("family", sorted(FAMILY_CALLS))
@pytest.mark.parametrize("steps", [1, 4])
def test_our_schedulers_drop_into_the_stock_pipelines_of_the_2026_families(family, steps):
    """The stock QwenImagePipeline, Flux2Pipeline, Flux2KleinPipeline and ZImagePipeline (tiny, random, offline
    tokenizers, their Hub scheduler configs: each computes its own mu) with ours in place of FlowMatchEuler: the same
    images within 1e-5 with their CFG and without; at one step Qwen-Image's ``shift_terminal`` makes FlowMatchEuler's
    image NaN and ours is the one Euler step from noise."""
    pipe = tiny_pipeline(family)
    stock_scheduler = pipe.scheduler

    def images(**kwargs):
        with np.errstate(divide="ignore", invalid="ignore"):
            return pipe(prompt="a digit seven", num_inference_steps=steps, height=32, width=32, max_sequence_length=16, output_type="pt",
                        generator=torch.Generator().manual_seed(0), **kwargs).images

    stock = [images(**kwargs) for kwargs in FAMILY_CALLS[family]]
    for ours in (ConsistencyScheduler.from_config(stock_scheduler.config, gamma=0.0), FlowMapScheduler.from_config(stock_scheduler.config)):
        pipe.scheduler = ours
        for kwargs, expected in zip(FAMILY_CALLS[family], stock):
            image = images(**kwargs)
            if steps == 1 and family == "qwen_image":
                assert expected.isnan().all() and image.isfinite().all(), type(ours).__name__
            else:
                assert (image - expected).norm() <= 1e-5 * expected.norm(), (type(ours).__name__, kwargs)


def test_mochi_inverted_sigmas_are_refused_by_name():
    with pytest.raises(ValueError, match="invert_sigmas=True"):
        ConsistencyScheduler.from_config(FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config)
    with pytest.raises(ValueError, match="only one of"):
        ConsistencyScheduler(time_type="flow", use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="shift_terminal"):
        ConsistencyScheduler(time_type="flow", shift_terminal=1.5)


# 5. stock default grids ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stock,preset,n", [
    (LCMScheduler(), "lcm", 4), (TCDScheduler(), "tcd", 6), (FlowMatchEulerDiscreteScheduler(shift=3.0), "linspace", 28),
    (FlowMatchLCMScheduler(shift=3.0), "linspace", 4), (SCMScheduler(), "scm", 2), (SCMScheduler(), "scm", 4),
])
def test_one_preset_reproduces_each_stock_default_grid(stock, preset, n):
    ours = ConsistencyScheduler.from_config(stock.config, timestep_preset=preset)
    if isinstance(stock, SCMScheduler):
        stock.set_timesteps(n, intermediate_timesteps=1.3 if n == 2 else None)
        expected = stock.timesteps[:-1]
    else:
        stock.set_timesteps(n)
        expected = stock.timesteps
    ours.set_timesteps(n)
    torch.testing.assert_close(ours.timesteps.double(), expected.double(), rtol=1e-6, atol=1e-4)


def test_the_default_flow_grid_is_trailing_and_differs_from_stock_by_design():
    ours = ConsistencyScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    ours.set_timesteps(28)
    assert ours.config.timestep_preset is None and ours.timesteps[-1] == pytest.approx(100.0)  # shift(1/28) * 1000


# 6. custom flow timesteps ----------------------------------------------------------------------------------------------
def test_custom_flow_timesteps_follow_the_stock_scheduler_stood_in_for():
    stock = FlowMapEulerDiscreteScheduler(shift=5.0)
    stock.set_timesteps(timesteps=[900, 700, 400, 100])
    flow_map = FlowMapScheduler(shift=5.0)
    flow_map.set_timesteps(timesteps=[900, 700, 400, 100])  # shifted, as FlowMapEulerDiscreteScheduler does
    torch.testing.assert_close(flow_map.timesteps.double(), stock.timesteps.double(), rtol=1e-6, atol=1e-3)
    assert flow_map.timesteps.tolist() == pytest.approx([978.26, 921.05, 769.23, 357.14], abs=0.01)

    euler = FlowMatchEulerDiscreteScheduler(shift=5.0)  # FlowMatchEuler: the model gets the timesteps as given, the
    consistency = ConsistencyScheduler.from_config(euler.config, gamma=0.0)  # steps use their shifted sigmas
    g = torch.Generator().manual_seed(0)
    x, outs = torch.randn(SHAPE, generator=g), [torch.randn(SHAPE, generator=g) for _ in range(4)]
    for extra in ({}, {"sigmas": [1.0, 0.6, 0.3, 0.1]}):  # timesteps alone, or with the sigmas they go with
        for s in (euler, consistency):
            s.set_timesteps(timesteps=[900, 700, 400, 100], **extra)
        assert consistency.timesteps.tolist() == euler.timesteps.tolist() == [900, 700, 400, 100]
        torch.testing.assert_close(consistency.sigmas, euler.sigmas, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(run(consistency, outs, x.clone()), run(euler, outs, x.clone()), rtol=1e-5, atol=1e-5)
        noise, t = torch.randn(SHAPE), consistency.timesteps[1:2]  # image-to-image noising at a custom timestep
        torch.testing.assert_close(consistency.scale_noise(x, t, noise), euler.scale_noise(x, t, noise), rtol=1e-6, atol=1e-6)
    assert consistency.native_times(consistency.timesteps[1:2]).item() == pytest.approx(euler.sigmas[1].item())  # not 700 / T
    with pytest.raises(ValueError, match="same length"):
        consistency.set_timesteps(timesteps=[900, 100], sigmas=[1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match="flow only"):
        ConsistencyScheduler().set_timesteps(timesteps=[900, 100], sigmas=[1.0, 0.5])


# 7. FlowMapScheduler is a superset of FlowMapEulerDiscreteScheduler -------------------------------------------------------
def test_flow_map_scheduler_does_what_flow_map_euler_does():
    ours, stock = FlowMapScheduler(shift=3.0), FlowMapEulerDiscreteScheduler(shift=3.0)
    sigmas = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    torch.testing.assert_close(ours.apply_shift(sigmas), stock.apply_shift(sigmas))
    ours.set_timesteps(4)
    stock.set_timesteps(4)
    x, u = torch.randn(SHAPE), torch.randn(SHAPE)
    t, r = ours.timesteps[0:1], ours.timesteps[2:3]  # any (t, r) on the schedule ...
    torch.testing.assert_close(ours.step(u, t, x, r_timestep=r).prev_sample, stock.step(u, stock.timesteps[0:1], x, r_timestep=stock.timesteps[2:3]).prev_sample)
    (prev,) = ours.step(u, t, x, r_timestep=r, return_dict=False)  # a 1-tuple, as stock
    assert prev.shape == x.shape
    assert torch.equal(ours.step(u, t, x, r_timestep=t).prev_sample, x)  # r == t: the identity
    ours.set_timesteps(8)
    off = ours.step(u, torch.tensor([777.7]), x, r_timestep=torch.tensor([123.4])).prev_sample  # ... or off the schedule
    torch.testing.assert_close(off, x - (0.7777 - 0.1234) * u)
    assert ours.step_index == 1


# 8. clip_sample, thresholding, previous_timestep -------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"clip_sample": True, "clip_sample_range": 0.5}, {"thresholding": True, "sample_max_value": 1.5},
                                     {"thresholding": True, "prediction_type": "v_prediction", "sample_max_value": 2.0}])
def test_clip_and_thresholding_equal_lcm(options):
    g = torch.Generator().manual_seed(0)
    x, outs = torch.randn(SHAPE, generator=g) * 2, [torch.randn(SHAPE, generator=g) for _ in range(4)]
    stock = LCMScheduler(**options)
    ours = ConsistencyScheduler.from_config({**stock.config, "_class_name": "LCMScheduler"})
    stock.set_timesteps(4)
    ours.set_timesteps(4)
    torch.testing.assert_close(run(ours, outs, x.clone()), run(stock, outs, x.clone()), rtol=1e-5, atol=1e-5)


def test_previous_timestep_as_lcm_and_tcd():
    for stock_cls in (LCMScheduler, TCDScheduler):
        stock, ours = stock_cls(), ConsistencyScheduler.from_config(stock_cls().config)
        for s in (stock, ours):
            s.set_timesteps(timesteps=[100, 87, 50, 1, 0])
        assert [int(ours.previous_timestep(t)) for t in ours.timesteps] == [int(stock.previous_timestep(t)) for t in stock.timesteps] == [87, 50, 1, 0, -1]
