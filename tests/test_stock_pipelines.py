"""Drop-in: stock diffusers pipelines that take a few-step scheduler run with ours, text-to-image and image-to-image
(strength, begin index, inpainting), on the tiny offline models; where the math overlaps with a stock scheduler (DDIM
for gamma 0, LCM for gamma 1, FlowMatchEuler on its own grid) the latents are the stock scheduler's."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    LatentConsistencyModelImg2ImgPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
)
from PIL import Image

from onestep_pipelines import ConsistencyScheduler
from onestep_pipelines.testing import tiny_pipeline
from onestep_pipelines.testing.tiny_pipelines import _tiny_unet

IMAGE = Image.new("RGB", (32, 32), (200, 60, 30))
MASK = Image.new("L", (32, 32), 0).crop((0, 0, 32, 32))
MASK.paste(255, (8, 8, 24, 24))
PIPELINES = {
    ("sd", "text"): StableDiffusionPipeline, ("sd", "image"): StableDiffusionImg2ImgPipeline,
    ("sdxl", "text"): StableDiffusionXLPipeline, ("sdxl", "image"): StableDiffusionXLImg2ImgPipeline, ("sdxl", "inpaint"): StableDiffusionXLInpaintPipeline,
    ("sd3", "text"): StableDiffusion3Pipeline, ("sd3", "image"): StableDiffusion3Img2ImgPipeline,
    ("flux", "text"): FluxPipeline, ("flux", "image"): FluxImg2ImgPipeline,
}


def build(arch: str, task: str):
    components = dict(tiny_pipeline(arch).components)
    cls = PIPELINES[(arch, task)]
    if arch == "sdxl" and task != "text":
        components["requires_aesthetics_score"] = False
    expected, optional = cls._get_signature_keys(cls)
    pipe = cls(**{k: v for k, v in components.items() if k in {*expected, *optional}})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, arch: str, task: str, **kwargs):
    args = {"prompt": "a cat", "generator": torch.Generator().manual_seed(0), "output_type": "latent", "guidance_scale": 1.0, **kwargs}
    if task != "text":
        args.update(image=IMAGE, strength=0.6)
    if task == "inpaint":
        args["mask_image"] = MASK
    if task == "text" or arch in ("sd3", "flux"):
        args.update(height=32, width=32)
    if arch in ("sd3", "flux"):
        args["max_sequence_length"] = 16
    return pipe(**args).images


@pytest.mark.parametrize("arch,task", sorted(PIPELINES))
def test_stock_pipeline_runs_with_ours_from_its_own_config(arch, task):
    pipe = build(arch, task)
    pipe.scheduler = ConsistencyScheduler.from_config(pipe.scheduler.config)
    out = call(pipe, arch, task, num_inference_steps=4)
    assert torch.isfinite(out).all()


def _reference(arch: str):
    """The stock scheduler whose math ours overlaps with for ``arch`` and the matching settings of ours."""
    if arch in ("sd3", "flux"):  # FlowMatchEuler: Euler = gamma 0, on the stock grid ("linspace")
        return None, {"gamma": 0.0, "timestep_preset": "linspace"}
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return ddim, {"gamma": 0.0}  # DDIM (eta 0) = gamma 0, on DDIM's own timesteps


@pytest.mark.parametrize("arch,task", sorted(PIPELINES))
def test_results_equal_the_stock_scheduler_where_the_math_overlaps(arch, task):
    pipe = build(arch, task)
    stock, settings = _reference(arch)
    if stock is not None:
        pipe.scheduler = stock
    stock_scheduler = pipe.scheduler
    expected = call(pipe, arch, task, num_inference_steps=4)
    pipe.scheduler = ConsistencyScheduler.from_config(stock_scheduler.config, **settings)
    if arch in ("sd3", "flux"):
        got = call(pipe, arch, task, num_inference_steps=4)
    else:  # DDIM's "leading" timesteps, passed as a custom schedule (and cut by strength by the pipeline, as stock's)
        stock_scheduler.set_timesteps(4)
        got = call(pipe, arch, task, timesteps=stock_scheduler.timesteps.tolist())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def lcm_pipeline(image: bool):
    sd = tiny_pipeline("sd")
    torch.manual_seed(1)
    unet = _tiny_unet(cross_attention_dim=32, attention_head_dim=4, time_cond_proj_dim=8)  # LCM's guidance embedding
    cls = LatentConsistencyModelImg2ImgPipeline if image else LatentConsistencyModelPipeline
    pipe = cls(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet.eval(), scheduler=LCMScheduler(),
               safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("image", [False, True], ids=["text2img", "img2img"])
@pytest.mark.parametrize("original_inference_steps", [None, 25])
def test_latent_consistency_pipelines_equal_lcm(image, original_inference_steps):
    pipe = lcm_pipeline(image)
    kwargs = {"prompt": "a cat", "num_inference_steps": 4, "guidance_scale": 4.0, "output_type": "latent",
              "original_inference_steps": original_inference_steps, **({"image": IMAGE, "strength": 0.5} if image else {"height": 32, "width": 32})}
    expected = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.scheduler = ConsistencyScheduler.from_config(pipe.scheduler.config, lcm_boundary_condition=True)
    got = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    saved = LCMScheduler()  # a saved LCM config names its class: the boundary condition comes with it
    saved.register_to_config(_class_name="LCMScheduler")
    assert ConsistencyScheduler.from_config({**saved.config, "_class_name": "LCMScheduler"}).config.lcm_boundary_condition


def test_tcd_users_pass_eta_per_call():
    """TCD's documented use: ``pipe(..., eta=0.3)``. With a TCD config (gamma from eta) ours follows every call's eta;
    with another config a per-call eta > 0 replaces gamma, and the stock pipelines' default eta 0 keeps it."""
    pipe = build("sd", "text")
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    runs = {}
    for eta in (0.0, 0.3):
        runs[("stock", eta)] = call(pipe, "sd", "text", num_inference_steps=4, eta=eta)
    pipe.scheduler = ConsistencyScheduler.from_config({**pipe.scheduler.config, "_class_name": "TCDScheduler"})
    assert pipe.scheduler.config.gamma_from_eta
    for eta in (0.0, 0.3):
        torch.testing.assert_close(call(pipe, "sd", "text", num_inference_steps=4, eta=eta), runs[("stock", eta)], rtol=1e-4, atol=1e-4)
    lcm_like = ConsistencyScheduler.from_config(pipe.scheduler.config, gamma_from_eta=False, gamma=1.0)
    pipe.scheduler = lcm_like
    full = call(pipe, "sd", "text", num_inference_steps=4)  # the pipeline passes eta=0.0: gamma 1 stays
    torch.testing.assert_close(call(pipe, "sd", "text", num_inference_steps=4, eta=0.0), full)
    torch.testing.assert_close(call(pipe, "sd", "text", num_inference_steps=4, eta=0.3), runs[("stock", 0.3)], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eta"):
        call(pipe, "sd", "text", num_inference_steps=4, eta=1.5)


def _per_image_generators():
    return [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]


@pytest.mark.parametrize("arch,stock_cls,kwargs", [
    ("sd", LCMScheduler, {}),
    ("sd", TCDScheduler, {"eta": 0.3}),
    ("sdxl", LCMScheduler, {}),
], ids=["sd-lcm", "sd-tcd", "sdxl-lcm"])
def test_one_generator_per_image_equals_the_stock_scheduler(arch, stock_cls, kwargs):
    """``pipe(..., num_images_per_prompt=2, generator=[g0, g1])``: every re-noising draws image b from g_b, as stock.
    (The stock SD3 / Flux loops pass no generator to ``step``, so their stock schedulers draw from the global RNG; our
    few-step pipelines pass the call's generator: ``test_students.py``. FlowMatchLCM's rows: ``benchmarks/parity.py``.)"""
    pipe = build(arch, "text")
    stock = stock_cls.from_config(pipe.scheduler.config)
    pipe.scheduler = stock
    run = dict(num_inference_steps=4, num_images_per_prompt=2, **kwargs)
    expected = call(pipe, arch, "text", generator=_per_image_generators(), **run)
    named = {**stock.config, "_class_name": stock_cls.__name__}
    pipe.scheduler = ConsistencyScheduler.from_config(named)
    got = call(pipe, arch, "text", generator=_per_image_generators(), **run)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], got[1])
