"""The k-diffusion-style loops of the sampling core (what the ComfyUI samplers run) against the diffusers
schedulers: same model, same initial noise, same re-noising noise, same samples."""

import pytest
import torch

from onestep_pipelines.sampling import SigmaSpace, sample_consistency, sample_flow_map
from onestep_pipelines.schedulers import ConsistencyScheduler, FlowMapScheduler, TDMScheduler

SHAPE = (2, 3, 6, 6)


def _net(seed):
    """A fixed smooth random function of (x, time) standing in for a network output."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(3, 3, generator=g) * 0.3, torch.randn(3, generator=g) * 0.1
    return lambda x, t, r=0.0: torch.einsum("oc,bchw->bohw", w, x) + torch.tanh(b.view(1, 3, 1, 1) * (t - r).view(-1, 1, 1, 1) / 100)


def _diffusers_loop(scheduler, net, noise, generator, r=False):
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        kwargs = {"r": scheduler.r_timestep_for()} if r else {}
        out = net(x, t.float().expand(len(x)), **kwargs)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def _noise_sampler(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma,preset,steps", [(1.0, "lcm", 4), (0.3, "tcd", 4), (0.0, "trailing", 3), (0.5, "dmd2", 4), (1.0, "trailing", 1)])
def test_consistency_loop_matches_the_scheduler_on_vp_models(prediction_type, gamma, preset, steps):
    scheduler = ConsistencyScheduler(gamma=gamma, timestep_preset=preset, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    net = _net(0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    expected = _diffusers_loop(scheduler, net, noise, torch.Generator().manual_seed(2))

    abar = scheduler.alphas_cumprod
    table = ((1 - abar) / abar).sqrt()  # the model's sigma per training timestep, as ComfyUI's ModelSamplingDiscrete
    space = SigmaSpace(flow=False, discrete_sigmas=table)

    def denoiser(x, sigma):  # ComfyUI's EPS / V_PREDICTION denoiser in VE form
        s = sigma.view(-1, 1, 1, 1)
        x_vp = x / (1 + s**2).sqrt()
        out = net(x_vp, space.timestep(sigma).float())
        alpha, sig = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
        x0 = (x_vp - sig * out) / alpha if prediction_type == "epsilon" else alpha * x_vp - sig * out
        return x0

    sigmas = torch.cat([table[scheduler.timesteps], torch.zeros(1)])
    x = noise * (1 + sigmas[0] ** 2).sqrt()  # ComfyUI's max-denoise noise scaling
    got = sample_consistency(denoiser, x, sigmas, gamma=gamma, space=space, noise_sampler=_noise_sampler(2), disable=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheduler_cls,gamma,steps", [(ConsistencyScheduler, 1.0, 4), (ConsistencyScheduler, 0.4, 3), (TDMScheduler, 0.0, 4)])
def test_consistency_loop_matches_the_scheduler_on_flow_models(scheduler_cls, gamma, steps):
    kwargs = {} if scheduler_cls is TDMScheduler else {"gamma": gamma}
    scheduler = scheduler_cls(time_type="flow", shift=3.0, **kwargs)
    scheduler.set_timesteps(steps)
    net = _net(3)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    expected = _diffusers_loop(scheduler, net, noise, torch.Generator().manual_seed(5))

    def denoiser(x, sigma):  # ComfyUI's CONST denoiser: x0 = x - sigma v
        return x - sigma.view(-1, 1, 1, 1) * net(x, sigma * 1000)

    got = sample_consistency(denoiser, noise.clone(), scheduler.sigmas, gamma=gamma, noise_sampler=_noise_sampler(5), disable=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gamma,steps", [(0.0, 1), (0.0, 4), (0.5, 3)])
def test_flow_map_loop_passes_r_and_matches_flow_map_scheduler(gamma, steps):
    scheduler = FlowMapScheduler(gamma=gamma, shift=2.0)
    scheduler.set_timesteps(steps)
    net = _net(6)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    expected = _diffusers_loop(scheduler, net, noise, torch.Generator().manual_seed(8), r=True)
    seen = []

    def denoiser(x, sigma, r_sigma):
        seen.append(r_sigma[0].item())
        return x - sigma.view(-1, 1, 1, 1) * net(x, sigma * 1000, r_sigma * 1000)

    got = sample_flow_map(denoiser, noise.clone(), scheduler.sigmas, gamma=gamma, noise_sampler=_noise_sampler(8), disable=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(seen), scheduler.r_timesteps.float() / 1000)


def test_loops_refuse_bad_gamma_and_vp_spaces_without_a_grid():
    denoiser = lambda x, sigma: x  # noqa: E731
    with pytest.raises(ValueError, match="gamma must be in \\[0, 1\\], got 1.5"):
        sample_consistency(denoiser, torch.zeros(SHAPE), torch.tensor([1.0, 0.0]), gamma=1.5)
    with pytest.raises(ValueError, match="gamma must be in \\[0, 1\\], got -0.1"):
        sample_flow_map(denoiser, torch.zeros(SHAPE), torch.tensor([1.0, 0.0]), gamma=-0.1)
    with pytest.raises(ValueError, match="needs the model's discrete_sigmas"):
        SigmaSpace(flow=False)
