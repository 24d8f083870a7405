"""pi-Flow policies: the GM policy's closed-form conditioning against the exact posterior of a Gaussian-mixture data
distribution, the roll-out against a fine Euler integration of that distribution's exact ODE, the DX policy's
interpolation, PolicyScheduler (save / load, the core's roll-out, bad model outputs), policy students in the digits
pipeline (wrong scheduler, CFG) and through the trainer (load, sample, resume, bad options)."""

import math
import os

import pytest
import torch
from diffusers import DiffusionPipeline

from onestep_pipelines import DigitsPipeline
from onestep_pipelines.sampling.policies import make_policy, policy_channels, policy_rollout, policy_x0
from onestep_pipelines.schedulers import ConsistencyScheduler, PolicyScheduler
from onestep_pipelines.training.config import DistillConfig
from onestep_pipelines.training.trainer import distill

from test_training import student_weights, tiny

# a 1-channel, 2x2-pixel data distribution: per pixel a 3-component Gaussian mixture
MEANS = torch.tensor([-0.8, 0.1, 0.7])
WEIGHTS = torch.tensor([0.5, 0.2, 0.3])
STD0 = 0.15


def exact_posterior(x, s):
    """Mixture parameters of p(x0 | x_s) for the GM data distribution (flow: alpha = 1 - s, sigma = s), per pixel:
    component means (B, K, 1, H, W), logits and the shared variance."""
    alpha, sigma = 1 - s, s
    var = 1 / (1 / STD0**2 + alpha**2 / sigma**2)
    m = MEANS.view(1, -1, 1, 1, 1)
    means = var * (m / STD0**2 + alpha * x.unsqueeze(1) / sigma**2)
    evidence = alpha**2 * STD0**2 + sigma**2
    logits = WEIGHTS.log().view(1, -1, 1, 1, 1) - 0.5 * (x.unsqueeze(1) - alpha * m) ** 2 / evidence
    return means, logits, var


def exact_x0(x, s):
    means, logits, _ = exact_posterior(x, s)
    return (logits.softmax(1) * means).sum(1)


def policy_of_exact_posterior(x_t, t, t_end):
    """The network output whose GM policy at (x_t, t) is the exact posterior there."""
    means, logits, var = exact_posterior(x_t, t)
    u = (x_t.unsqueeze(1) - means) / t  # means = x_t - t u
    log_s = torch.full_like(x_t, 0.5 * math.log(var))
    out = torch.cat([u.flatten(1, 2), logits.flatten(1, 2), log_s], dim=1)
    return make_policy("gmflow", out, x_t, t, t_end, 3)


@pytest.mark.parametrize("t", [1.0, 0.7])
def test_gm_policy_conditions_in_closed_form(t):
    x_t = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * (t if t < 1 else 1)
    policy = policy_of_exact_posterior(x_t, t, 0.0)
    torch.testing.assert_close(policy_x0(policy, x_t, torch.tensor(t)), exact_x0(x_t, t))
    for s in (0.5, 0.2, 0.02):  # at any later (x_s, s) the conditioned mixture is the exact posterior there
        x_s = (1 - s) * torch.randn(4, 1, 2, 2) * 0.5 + s * torch.randn(4, 1, 2, 2)
        torch.testing.assert_close(policy_x0(policy, x_s, torch.tensor(s)), exact_x0(x_s, s), atol=1e-5, rtol=1e-4)


def test_gm_rollout_follows_the_exact_ode():
    """Anchored at the exact posterior, the policy's velocity field is the data distribution's own: its roll-out
    matches a fine Euler integration of the exact ODE, and converges with substeps."""
    x_1 = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    policy = policy_of_exact_posterior(x_1, 1.0, 0.0)
    fine = x_1
    n = 4096
    for j in range(n):
        s = 1 - j / n
        fine = fine - (1 / n) * (fine - exact_x0(fine, s)) / s
    rolled = policy_rollout(policy, n)
    torch.testing.assert_close(rolled, fine, atol=1e-4, rtol=0)
    coarse_error = (policy_rollout(policy, 32) - fine).abs().max()
    assert coarse_error < 0.05 and coarse_error > (policy_rollout(policy, 256) - fine).abs().max()
    # the ODE carries noise to the data modes
    assert bool(((rolled.unsqueeze(-1) - MEANS).abs().min(-1).values < 3 * STD0).all())


def test_dx_policy_interpolates_its_nodes():
    x_t = torch.randn(2, 1, 4, 4)
    nodes = torch.randn(2, 3, 1, 4, 4)
    t, t_end = 0.8, 0.2
    out = ((x_t.unsqueeze(1) - nodes) / t).flatten(1, 2)
    policy = make_policy("dx", out, x_t, t, t_end, 3)
    for s, expected in ((0.8, nodes[:, 0]), (0.5, nodes[:, 1]), (0.2, nodes[:, 2]), (0.65, (nodes[:, 0] + nodes[:, 1]) / 2)):
        torch.testing.assert_close(policy_x0(policy, torch.zeros_like(x_t), torch.tensor(s)), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"needs 3 channels"):
        make_policy("dx", out[:, :2], x_t, t, t_end, 3)
    assert policy_channels("gmflow", 8, 1) == 17 and policy_channels("dx", 4, 3) == 12
    with pytest.raises(ValueError, match="at least 2 nodes"):
        policy_channels("dx", 1, 1)


def test_policy_scheduler_steps_with_the_core_and_round_trips(tmp_path):
    scheduler = PolicyScheduler(num_components=3, substeps=16)
    scheduler.save_pretrained(tmp_path)
    loaded = PolicyScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    loaded.set_timesteps(2)
    torch.testing.assert_close(loaded.timesteps, torch.tensor([1000.0, 500.0]))
    x = torch.randn(2, 1, 2, 2)
    out = torch.randn(2, 7, 2, 2) * 0.1
    step = loaded.step(out, loaded.timesteps[0], x)
    expected = policy_rollout(make_policy("gmflow", out, x, 1.0, 0.5, 3), 16)
    torch.testing.assert_close(step.prev_sample, expected)
    with pytest.raises(ValueError, match=r"is not a gmflow policy with 3 components .* PolicyScheduler samples pi-Flow policy students only"):
        loaded.step(torch.randn(2, 1, 2, 2), loaded.timesteps[1], x)
    with pytest.raises(ValueError, match="substeps must be a positive integer"):
        PolicyScheduler(substeps=0)
    with pytest.raises(ValueError, match="policy 'mixture' is unknown"):
        PolicyScheduler(policy="mixture")


@pytest.fixture(scope="module")
def policy_students(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("piflow")
    gm = distill(tiny(tiny_teacher, out / "gm", method="piflow", policy_components=4, policy_substeps=8))
    dx = distill(tiny(tiny_teacher, out / "dx", method="piflow", policy="dx", policy_components=3, num_steps=2, guidance_scale=2.0))
    return gm["student_dir"], dx["student_dir"]


def test_policy_students_load_and_sample(policy_students):
    for folder, kind, steps in zip(policy_students, ("gmflow", "dx"), (1, 2)):
        pipe = DiffusionPipeline.from_pretrained(folder)
        assert isinstance(pipe, DigitsPipeline) and isinstance(pipe.scheduler, PolicyScheduler)
        assert pipe.student.method == "piflow" and pipe.student.num_inference_steps == steps and pipe.scheduler.config.policy == kind
        assert pipe.transformer.config.out_channels == policy_channels(kind, pipe.scheduler.config.num_components, 1)
        images = pipe(class_labels=[3, 4], output_type="latent", generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
        card = open(os.path.join(folder, "README.md")).read()
        assert "pi-Flow" in card and "2510.14974" in card
    pipe = DiffusionPipeline.from_pretrained(policy_students[1])
    with pytest.raises(ValueError, match="guidance_scale=3.0: a policy student takes no classifier-free guidance"):
        pipe(class_labels=[1], guidance_scale=3.0)
    pipe.scheduler = ConsistencyScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="This is a pi-Flow policy student: its transformer outputs a policy, which PolicyScheduler integrates"):
        pipe(class_labels=[1])
    pipe.set_student(pipe.student)
    assert isinstance(pipe.scheduler, PolicyScheduler)


def test_more_substeps_is_a_sampling_knob(policy_students):
    pipe = DiffusionPipeline.from_pretrained(policy_students[0])
    few = pipe(class_labels=[3], output_type="latent", generator=torch.Generator().manual_seed(0)).images
    pipe.scheduler = PolicyScheduler.from_config(pipe.scheduler.config, substeps=64)
    many = pipe(class_labels=[3], output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert 0 < float((few - many).abs().max()) < 0.5


def test_piflow_resumes_exactly_and_refuses_bad_options(tiny_teacher, tmp_path, stock_teachers):
    common = dict(method="piflow", policy_components=2, policy_substeps=4)
    distill(tiny(tiny_teacher, tmp_path / "straight", max_train_steps=4, **common))
    distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=2, **common))
    distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=4, resume="latest", **common))
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--policy applies to --method piflow, not dmd2"):
        DistillConfig(policy="dx")
    with pytest.raises(ValueError, match="--lora-rank is not supported"):
        DistillConfig(method="piflow", lora_rank=4)
    with pytest.raises(ValueError, match="--policy-components must be at least 2 for --policy dx"):
        DistillConfig(method="piflow", policy="dx", policy_components=1)
    folders, data = stock_teachers
    with pytest.raises(ValueError, match="--method piflow builds its policy head on the digits DiT"):
        distill(DistillConfig(method="piflow", teacher=folders["sd3"], prompts=os.path.join(data, "prompts.txt"), resolution=32,
                              output_dir=str(tmp_path / "sd3"), max_train_steps=1, batch_size=2, evaluate=False, preview_every=0))
