"""sCM (continuous-time consistency in TrigFlow): the flow-to-TrigFlow view of a network against the chain rule, the
JVP tangent against finite differences, the loss's tangent against a hand-computed case, and sCM students through
the trainer (load, sample on the scm preset, resume, LoRA, refusals)."""

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline

from onestep_pipelines.schedulers import ConsistencyScheduler
from onestep_pipelines.training.methods.scm import SCM, scm_tangent
from onestep_pipelines.training.trainer import DistillConfig, distill

from test_training import student_weights, tiny


def _method(tiny_teacher, **overrides):
    from onestep_pipelines.training.teachers import load_teacher

    teacher = load_teacher(tiny_teacher)
    student = copy.deepcopy(teacher.model).requires_grad_(True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method = SCM(teacher, student, ConsistencyScheduler.from_config(teacher.convention.config, timestep_preset="scm"),
                 tiny(tiny_teacher, "unused", method="scm", **overrides), accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    return method


def test_trigflow_view_of_a_flow_network_is_its_chain_rule_velocity(tiny_teacher):
    """x_t = (cos t + sin t) x_flow at sigma = sin t / (sin t + cos t), so dx_t/dt = (cos t - sin t) x_flow + u / (cos t + sin t)
    for the flow velocity u at (x_flow, sigma)."""
    torch.manual_seed(0)
    method = _method(tiny_teacher)
    teacher = method.teacher
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 0.8, 1.4])
    conditions = {"class_labels": torch.tensor([1, 4, 7])}
    cos, sin = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    x_flow, sigma = x_t / (cos + sin), torch.sin(t) / (torch.sin(t) + torch.cos(t))
    with torch.no_grad():
        u = teacher.call(teacher.model, x_flow, sigma, conditions).float()
        expected = (cos - sin) * x_flow + u / (cos + sin)
        torch.testing.assert_close(method.trigflow(teacher.model, x_t, t, conditions), expected, rtol=1e-4, atol=1e-5)


def test_tangent_jvp_matches_finite_differences(tiny_teacher):
    """Exact (``--tangent-time-step 0``): central differences along (v, 1) with a small step; time-smoothed: the JVP
    along (v, 0) plus a central difference in t over the step."""
    torch.manual_seed(1)
    method = _method(tiny_teacher, tangent_time_step=0.0)
    x_t, v, t = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.tensor([0.4, 0.9, 1.3])
    conditions = {"class_labels": torch.tensor([0, 5, 9])}
    cs = (torch.cos(t) * torch.sin(t)).view(-1, 1, 1, 1)
    F = lambda x, t: method.trigflow(method.student, x, t, conditions)  # noqa: E731
    dF = method.tangent(x_t, t, v, conditions)
    h = 2e-5  # the network's time enters as 1000 sigma: central differences in float32 need a small step
    with torch.no_grad():
        exact = cs * (F(x_t + h * v, t + h) - F(x_t - h * v, t - h)) / (2 * h)
        x_part = cs * (F(x_t + h * v, t) - F(x_t - h * v, t)) / (2 * h)
        smooth_t = cs * (F(x_t, t + 0.01) - F(x_t, t - 0.01)) / 0.02
    torch.testing.assert_close(dF, exact, rtol=3e-2, atol=2e-2)  # float32 round-off / h
    assert dF.abs().mean() > 1e-2
    method.config.tangent_time_step = 0.01
    torch.testing.assert_close(method.tangent(x_t, t, v, conditions), x_part + smooth_t, rtol=3e-2, atol=2e-2)


def test_tangent_target_matches_a_hand_computed_case():
    # one pixel, t = pi/4 (cos = sin = 1/sqrt 2): F = 1, dx/dt = 0.5, JVP = 0.2, x_t = 1:
    # g = -0.5 (1 - 0.5) - r (0.5 + 0.2); r = 1: -0.95 -> -0.95 / (0.95 + 0.1); r = 0 (warm-up start): -0.25 / 0.35
    one = lambda v: torch.tensor([v]).view(1, 1, 1, 1)  # noqa: E731
    t = torch.tensor([math.pi / 4])
    torch.testing.assert_close(scm_tangent(one(1.0), one(0.5), one(0.2), one(1.0), t, 1.0), one(-0.95 / 1.05))
    torch.testing.assert_close(scm_tangent(one(1.0), one(0.5), one(0.2), one(1.0), t, 0.0), one(-0.25 / 0.35))


@pytest.mark.parametrize("overrides", [{"num_steps": 2}, {"lora_rank": 4, "guidance_scale": 1.5, "tangent_warmup": 0, "dmd_weight": 0.1, "fake_lora_rank": 4}])
def test_scm_students_load_and_sample_on_the_scm_preset(tiny_teacher, tmp_path, overrides):
    result = distill(tiny(tiny_teacher, tmp_path / "run", method="scm", **overrides))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.student.method == "scm" and isinstance(pipe.scheduler, ConsistencyScheduler)
    assert pipe.scheduler.config.timestep_preset == "scm" and pipe.scheduler.config.gamma == 1.0
    pipe.scheduler.set_timesteps(2)  # sCM's TrigFlow times 1.5708 and 1.3 as flow sigmas, by SNR
    torch.testing.assert_close(pipe.scheduler.sigmas[:2], torch.tensor([1.0, math.sin(1.3) / (math.sin(1.3) + math.cos(1.3))]), atol=1e-4, rtol=0)
    assert pipe(class_labels=[3, 4], output_type="np").images.shape == (2, 8, 8, 1)
    card = open(os.path.join(result["student_dir"], "README.md")).read()
    assert "https://arxiv.org/abs/2410.11081" in card


def test_scm_resumes_exactly(tiny_teacher, tmp_path):
    for out, steps, resume in (("straight", 4, ""), ("split", 2, ""), ("split", 4, "latest")):  # rCM: with the fake score
        distill(tiny(tiny_teacher, tmp_path / out, max_train_steps=steps, method="scm", tangent_warmup=3, dmd_weight=0.1, resume=resume))
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scm_refuses_vp_teachers_models_without_forward_ad_and_bad_options(tiny_teacher, stock_teachers, tmp_path, without_forward_ad):
    folders, data = stock_teachers
    with pytest.raises(ValueError, match="--method scm needs a flow teacher.*is a VP"):
        distill(DistillConfig(method="scm", teacher=folders["sd"], data=data, resolution=32, output_dir=str(tmp_path / "vp"), max_train_steps=1, batch_size=2, evaluate=False))
    for option, message in (({"tangent_warmup": -1}, "--tangent-warmup must be 0 \\(none\\) or positive, got -1"),
                            ({"dmd_weight": -1.0}, "--dmd-weight must be 0 \\(off\\) or positive"),
                            ({"tangent_time_step": 0.5}, "--tangent-time-step must lie in \\[0, 0.2\\]"),
                            ({"gan_weight": 0.1}, "--gan-weight applies to --method dmd2, tdm, sid, reward, not scm"),
                            ({"method": "dmd2", "dmd_weight": 0.1}, "--dmd-weight applies to --method scm, hyper-sd, not dmd2")):
        with pytest.raises(ValueError, match=message):
            tiny(tiny_teacher, tmp_path / "bad", **({"method": "scm"} | option))

    method = _method(tiny_teacher)
    without_forward_ad(method.student.out)
    with pytest.raises(ValueError, match="--method scm: DigitsTransformer2DModel cannot do forward-mode AD here"):
        method.tangent(torch.randn(2, 1, 8, 8), torch.tensor([0.5, 1.0]), torch.randn(2, 1, 8, 8), {"class_labels": torch.tensor([1, 2])})


@pytest.mark.slow
def test_two_fsdp_processes_end_with_the_one_process_rcm_student(tiny_teacher, tmp_path):
    """sCM's weighting network and rCM's fake score sharded over two processes; the same student as one process."""
    from test_scaling import FSDP, argv, assert_same_student, workers

    options = {"tangent_warmup": 2, "dmd_weight": 0.1}
    distill(tiny(tiny_teacher, tmp_path / "one", max_train_steps=4, batch_size=8, method="scm", **options))
    summary = workers(2, argv(tiny_teacher, tmp_path / "two", 4, 4, "--method", "scm", "--tangent-warmup", "2", "--dmd-weight", "0.1"), FSDP)
    assert summary["engine"] == "fsdp" and summary["processes"] == 2
    assert_same_student(tmp_path / "one", tmp_path / "two")


def test_scm_on_a_tiny_sd3_teacher_writes_a_student_on_the_scm_preset(stock_teachers, tmp_path):
    folders, data = stock_teachers
    result = distill(DistillConfig(method="scm", teacher=folders["sd3"], data=data, resolution=32, num_steps=2, output_dir=str(tmp_path / "run"),
                                   max_train_steps=2, batch_size=2, evaluate=False, preview_every=0, lora_rank=4, dmd_weight=0.1, fake_lora_rank=4))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.student.method == "scm" and pipe.scheduler.config.timestep_preset == "scm" and pipe.scheduler.config.time_type == "flow"
    assert torch.isfinite(pipe(prompt="a cat", height=32, width=32, output_type="latent", max_sequence_length=16).images).all()
