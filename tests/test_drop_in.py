"""Our schedulers inside stock diffusers pipelines (tiny random models, offline)."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from onestep_pipelines import ConsistencyScheduler, FlowMapScheduler, TDMScheduler
from onestep_pipelines.testing import ARCHITECTURES, tiny_call_kwargs, tiny_pipeline

FLOW = ("sd3", "flux", "qwen_image", "flux2", "flux2_klein", "z_image")
TWO_CALL_CFG = ("qwen_image", "flux2_klein")  # their CFG calls the model twice per step (the others batch it)
CASES = [(a, cls) for a in ARCHITECTURES for cls in (ConsistencyScheduler, TDMScheduler, FlowMapScheduler) if a in FLOW or cls is not FlowMapScheduler]


@pytest.fixture(scope="module")
def pipes():
    return {a: tiny_pipeline(a) for a in ARCHITECTURES}


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@pytest.mark.parametrize("arch,cls", CASES, ids=[f"{a}-{c.__name__}" for a, c in CASES])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scheduler_drops_into_stock_pipeline(pipes, arch, cls, steps):
    pipe = pipes[arch]
    stock = pipe.scheduler
    try:
        pipe.scheduler = cls.from_config(stock.config)
        calls = []
        handle = _denoiser(pipe).register_forward_hook(lambda *a: calls.append(1))
        try:
            images = pipe(**tiny_call_kwargs(arch, steps)).images
        finally:
            handle.remove()
        assert np.isfinite(np.asarray(images)).all()
        assert len(calls) == steps * (2 if arch in TWO_CALL_CFG else 1)
        assert pipe.scheduler.step_index == steps
        expected_time = "flow" if arch in FLOW else "vp"
        assert pipe.scheduler.config.time_type == expected_time
    finally:
        pipe.scheduler = stock


def test_flow_map_scheduler_refuses_vp_pipelines(pipes):
    with pytest.raises(ValueError, match="time_type='vp'"):
        FlowMapScheduler.from_config(pipes["sd"].scheduler.config)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pipeline_save_load_keeps_scheduler(pipes, arch, tmp_path):
    pipe = pipes[arch]
    stock = pipe.scheduler
    try:
        pipe.scheduler = ConsistencyScheduler.from_config(stock.config, gamma=0.3, timestep_preset="dmd2")
        pipe.save_pretrained(tmp_path)
        loaded = DiffusionPipeline.from_pretrained(tmp_path)
        assert type(loaded.scheduler) is ConsistencyScheduler
        assert loaded.scheduler.config.gamma == 0.3 and loaded.scheduler.config.timestep_preset == "dmd2"
        assert loaded.scheduler.config.time_type == pipe.scheduler.config.time_type
        loaded.set_progress_bar_config(disable=True)
        torch.manual_seed(0)  # DiTPipeline does not pass its generator to scheduler.step
        a = pipe(**tiny_call_kwargs(arch, 2)).images
        torch.manual_seed(0)
        b = loaded(**tiny_call_kwargs(arch, 2)).images
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    finally:
        pipe.scheduler = stock


def test_consistency_gamma0_reproduces_flow_match_euler_in_sd3(pipes):
    """Same sigmas, same weights: the stock Euler scheduler and ours with gamma=0 give the same latents."""
    pipe = pipes["sd3"]
    stock = pipe.scheduler
    kwargs = {**tiny_call_kwargs("sd3", 4), "output_type": "latent", "sigmas": [1.0, 0.75, 0.5, 0.25]}
    try:
        a = pipe(**kwargs).images
        pipe.scheduler = ConsistencyScheduler.from_config(stock.config, gamma=0.0)
        b = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    finally:
        pipe.scheduler = stock
