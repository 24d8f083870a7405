"""SiD (score identity distillation): the generator loss against its formula, its gradient through both denoisers'
inputs, the fake score's own gradients left alone by the generator update, and SiD students through the trainer
(one and two processes, LSG, LoRA, GAN head, resume, model card)."""

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline

from onestep_pipelines.schedulers import ConsistencyScheduler
from onestep_pipelines.training.methods.base import FiniteGuard
from onestep_pipelines.training.methods.sid import SiD, sid_generator_loss
from onestep_pipelines.training.trainer import DistillConfig, distill

from test_scaling import FSDP, argv, assert_same_student, workers
from test_training import student_weights, tiny


def test_generator_loss_matches_a_hand_computed_case():
    # one pixel per sample: x_g = 1, f_phi = 0.5, f_psi = 0.25 -> w = 1 / |1 - 0.5| = 2, d = f_phi - f_psi = 0.25:
    # 2 [(1 - 1.2) 0.0625 + 0.25 (0.25 - 1)] = -0.4; second sample x_g = -1, f_phi = 0, f_psi = 0: 0
    x_g = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1).requires_grad_(True)
    real, fake = torch.tensor([0.5, 0.0]).view(2, 1, 1, 1), torch.tensor([0.25, 0.0]).view(2, 1, 1, 1)
    loss = sid_generator_loss(x_g, real, fake, alpha=1.2)
    torch.testing.assert_close(loss, torch.tensor(-0.2))  # (-0.4 + 0) / 2
    (grad,) = torch.autograd.grad(loss, x_g)
    # with the predictions held fixed the gradient is DMD's: (f_psi - f_phi) / mean|x_g - f_phi|, over the batch of 2
    torch.testing.assert_close(grad.flatten(), torch.tensor([(0.25 - 0.5) / 0.5 / 2, 0.0]))
    torch.testing.assert_close(sid_generator_loss(x_g, real, fake, alpha=1.0), torch.tensor(2 * 0.25 * (0.25 - 1) / 2))
    weighted = sid_generator_loss(x_g, real, fake, alpha=1.2, weights=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(weighted, torch.tensor(-0.6))


def _method(tiny_teacher, **overrides):
    from onestep_pipelines.training.teachers import load_teacher

    teacher = load_teacher(tiny_teacher)
    student = copy.deepcopy(teacher.model).requires_grad_(True)
    config = tiny(tiny_teacher, "unused", method="sid", **overrides)
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, backward=lambda loss: loss.backward(), scaler=None)
    method = SiD(teacher, student, ConsistencyScheduler.from_config(teacher.convention.config), config, accelerator=accelerator, guard=FiniteGuard("cpu"))
    method.place(student, torch.optim.AdamW(student.parameters(), lr=1e-3))
    method.build_optimizers()
    with torch.no_grad():  # a fake score that has learned something: it differs from the teacher
        for p in method.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return method


@pytest.mark.parametrize("lsg_scale", [1.0, 2.0])
def test_generator_gradient_goes_through_both_denoisers(tiny_teacher, lsg_scale):
    """Central differences of the loss in the student sample agree with autograd (the normalisation w held at its
    value, as its stop-gradient says); holding the two predictions fixed (DMD's gradient) would not: SiD
    differentiates through the teacher's and the fake score's inputs."""
    torch.manual_seed(0)
    method = _method(tiny_teacher, lsg_scale=lsg_scale)
    teacher = method.teacher
    for label, t in ((0, 0.9), (3, 0.6), (5, 0.4), (9, 0.2)):  # one sample at a time: the loss is w(x) S(x)
        x, noise, v = (torch.randn(1, 1, 8, 8) for _ in range(3))
        t, conditions = torch.tensor([t]), {"class_labels": torch.tensor([label])}

        def loss_and_weight(x, fixed=False):
            x_t = teacher.add_noise(x, t, noise)
            real = teacher.predict(teacher.model, x_t, t, conditions)[0]
            w = 1 / (x - real).abs().mean()
            if fixed:  # DMD-style: the predictions as constants
                return sid_generator_loss(x, real.detach(), method.fake_prediction(x_t, t, conditions).detach(), method.config.sid_alpha), w
            return method.generator_losses(x, x_t, t, conditions, rng=None)[0], w

        x.requires_grad_(True)
        (full,) = torch.autograd.grad(loss_and_weight(x)[0], x)
        (direct,) = torch.autograd.grad(loss_and_weight(x, fixed=True)[0], x)
        h = 1e-2
        with torch.no_grad():
            w0 = loss_and_weight(x)[1]
            ahead, behind = (loss / w for loss, w in (loss_and_weight(x + h * v), loss_and_weight(x - h * v)))
            numeric = w0 * (ahead - behind) / (2 * h)
        analytic, held = (full * v).sum(), (direct * v).sum()
        torch.testing.assert_close(analytic, numeric, rtol=2e-2, atol=1e-3)
        assert abs(float(analytic - held)) > 0.1 * abs(float(analytic))  # the networks' part is not negligible


def test_generator_update_leaves_the_fake_score_and_teacher_alone(tiny_teacher):
    method = _method(tiny_teacher, gan_weight=0.1)
    teacher_before = {k: v.clone() for k, v in method.teacher.model.state_dict().items()}
    student_before = {k: v.clone() for k, v in method.student.state_dict().items()}
    batch = {"conditions": {"class_labels": torch.arange(8) % 10}, "images": torch.randn(8, 1, 8, 8)}
    from onestep_pipelines.training.draws import Draws

    logs = method.train_step(batch, Draws(0, 0, 0, 8, "cpu"))
    assert {"generator", "gan", "fake", "discriminator"} <= set(logs)
    # the fake-score update zeroed its gradients after stepping; the generator's backward reached the fake score and the
    # head (their inputs) but what it left there was discarded
    assert all(p.grad is None for p in method._discriminator_params())
    assert all(torch.equal(v, teacher_before[k]) for k, v in method.teacher.model.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in method.student.state_dict().items())


@pytest.mark.parametrize("overrides", [{"num_steps": 2, "lora_rank": 4, "lsg_scale": 1.5}, {"gan_weight": 0.1, "divergence": "js", "fake_lora_rank": 4}])
def test_sid_students_load_and_sample(tiny_teacher, tmp_path, overrides):
    result = distill(tiny(tiny_teacher, tmp_path / "run", method="sid", **overrides))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.student.method == "sid" and pipe.student.num_inference_steps == overrides.get("num_steps", 1)
    assert isinstance(pipe.scheduler, ConsistencyScheduler) and pipe.scheduler.config.gamma == 1.0
    images = pipe(class_labels=[3, 4], output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    card = open(os.path.join(result["student_dir"], "README.md")).read()
    assert "| method | sid ([Zhou et al. 2024, Score identity Distillation](https://arxiv.org/abs/2404.04057)) |" in card


def test_sid_resumes_exactly(tiny_teacher, tmp_path):
    distill(tiny(tiny_teacher, tmp_path / "straight", max_train_steps=4, method="sid", lsg_scale=1.5))
    distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=2, method="sid", lsg_scale=1.5))
    distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=4, method="sid", lsg_scale=1.5, resume="latest"))
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("gan_max_time", [0.0, 0.1])
def test_the_gan_head_sees_low_noise_times_of_its_own(tiny_teacher, gan_max_time):
    """--gan-max-time: the discriminator (student and real samples in one forward) and the generator's GAN term see
    times in [0.02, gan_max_time]; the fake score's own loss and SiD's keep theirs. Without it: the same times."""
    method = _method(tiny_teacher, gan_weight=0.1, gan_max_time=gan_max_time)
    calls, predict = [], method.fake_prediction
    method.fake_prediction = lambda x_t, t, conditions: calls.append(t.clone()) or predict(x_t, t, conditions)
    batch = {"conditions": {"class_labels": torch.arange(8) % 10}, "images": torch.randn(8, 1, 8, 8)}
    from onestep_pipelines.training.draws import Draws

    logs = method.train_step(batch, Draws(0, 0, 0, 8, "cpu"))
    assert {"generator", "gan", "fake", "discriminator"} <= set(logs)
    if not gan_max_time:  # discriminator + fake loss in one forward, then the generator's
        assert [len(t) for t in calls] == [16, 8] and torch.equal(calls[0][:8], calls[0][8:])
        return
    # one forward per update (FSDP2 shards expect one per backward): the fake loss's inputs at their times, then the
    # head's (student + real at its own times); the generator's: SiD's at its times, then the head's
    assert [len(t) for t in calls] == [24, 16] and torch.equal(calls[0][8:16], calls[0][16:])
    for head_times in (calls[0][8:], calls[1][8:]):
        assert head_times.min() >= 0.02 and head_times.max() <= 0.1
    assert calls[0][:8].max() > 0.1 and calls[1][:8].max() > 0.1


def test_init_from_starts_sida_from_a_sid_checkpoint(tiny_teacher, tmp_path, monkeypatch, capsys):
    """--init-from: the student, its EMA and the fake score from another run's checkpoint, a new GAN head, update 0;
    anything but a checkpoint of the same method is refused by name."""
    from safetensors.torch import load_file

    from onestep_pipelines.training import trainer

    distill(tiny(tiny_teacher, tmp_path / "sid", method="sid", max_train_steps=2, sid_alpha=1.0))
    ckpt = tmp_path / "sid" / "checkpoints" / "step-2"
    seen, train = {}, trainer._train

    def recording(run, config, placed, data, export, start, parts):
        seen.update(start=start, student={k: v.clone() for k, v in placed.method.student.state_dict().items()},
                    fake={k: v.clone() for k, v in placed.method.fake.state_dict().items()},
                    ema=dict(zip(placed.names, (s.clone() for s in placed.ema.shadow_params))))
        return train(run, config, placed, data, export, start, parts)

    monkeypatch.setattr(trainer, "_train", recording)
    capsys.readouterr()
    sida = dict(method="sid", sid_alpha=1.0, gan_weight=0.1, gan_max_time=0.1, max_train_steps=1)
    distill(tiny(tiny_teacher, tmp_path / "sida", init_from=str(ckpt), **sida))
    assert f"started from {ckpt}: its student, EMA and fake; new: head" in capsys.readouterr().out
    assert seen["start"] == 0
    for part, weights in (("student", seen["student"]), ("fake", seen["fake"]), ("ema", seen["ema"])):
        saved = load_file(ckpt / f"{part}.safetensors")
        assert saved and all(torch.equal(weights[k], v) for k, v in saved.items())
    with pytest.raises(ValueError, match="--init-from .*not a checkpoint of this trainer"):
        distill(tiny(tiny_teacher, tmp_path / "bad", init_from=str(tmp_path / "sid"), **sida))
    with pytest.raises(ValueError, match="--init-from .*a checkpoint of --method sid; this run is --method dmd2"):
        distill(tiny(tiny_teacher, tmp_path / "bad", init_from=str(ckpt), method="dmd2"))
    with pytest.raises(ValueError, match="--gan-max-time needs the GAN head"):
        tiny(tiny_teacher, tmp_path / "bad", method="sid", gan_max_time=0.1)


@pytest.mark.slow
def test_two_fsdp_processes_end_with_the_one_process_sid_student(tiny_teacher, tmp_path):
    """The generator's gradient through the sharded fake score's input, with the fake score's own set aside."""
    distill(tiny(tiny_teacher, tmp_path / "one", max_train_steps=4, batch_size=8, method="sid", lsg_scale=1.5))
    summary = workers(2, argv(tiny_teacher, tmp_path / "two", 4, 4, "--method", "sid", "--lsg-scale", "1.5"), FSDP)
    assert summary["engine"] == "fsdp" and summary["processes"] == 2
    assert_same_student(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_end_with_the_one_process_sida_student_of_a_low_noise_head(tiny_teacher, tmp_path, engine):
    """--gan-max-time batches the head's inputs into the fake score's one forward per backward (FSDP2 shards)."""
    distill(tiny(tiny_teacher, tmp_path / "one", max_train_steps=4, batch_size=8, method="sid", gan_weight=0.1, gan_max_time=0.1))
    summary = workers(2, argv(tiny_teacher, tmp_path / "two", 4, 4, "--method", "sid", "--gan-weight", "0.1", "--gan-max-time", "0.1"),
                      FSDP if engine == "fsdp" else None)
    assert summary["engine"] == engine and summary["processes"] == 2
    assert_same_student(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("arch", ["sd", "flux"])
def test_sid_on_tiny_text_to_image_teachers(stock_teachers, tmp_path, arch):
    folders, data = stock_teachers
    result = distill(DistillConfig(method="sid", teacher=folders[arch], prompts=os.path.join(data, "prompts.txt"), resolution=32, num_steps=2,
                                   output_dir=str(tmp_path / "run"), max_train_steps=2, batch_size=2, evaluate=False, preview_every=0,
                                   lora_rank=4, fake_lora_rank=4, lsg_scale=1.5))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.student.method == "sid" and pipe.student.architecture == arch
    extra = {"max_sequence_length": 16} if arch == "flux" else {}
    assert torch.isfinite(pipe(prompt="a cat", height=32, width=32, output_type="latent", **extra).images).all()


# ------------------------------------------------------------------------------------------- Uni-Instruct (--uni-instruct)
def _uni_toy(theta0: float, divergence: str, s=0.8, sigma=0.9, n=2_000_000, diff_instruct=False):
    """1-D: student p = N(theta, s^2), teacher q = N(0, 1), noised by x_t = x + sigma e (alpha 1): exact denoisers and
    density ratio. Returns (autograd gradient of the mean loss in theta, central difference of
    J(theta) = E_p_t[h(r) |s_p - s_q|^2], J). ``diff_instruct``: the loss is DMD2's with Diff-Instruct's gradient
    ``x0_fake - x0_real``, whose J is ``sigma^2 KL(p_t || q_t)``."""
    import math

    from onestep_pipelines.training.methods.sid import F_WEIGHTS, uni_instruct_loss

    gen = torch.Generator().manual_seed(0)
    vp, vq = s * s + sigma * sigma, 1 + sigma * sigma
    log_n = lambda x, m, v: -0.5 * (x - m) ** 2 / v - 0.5 * math.log(2 * math.pi * v)  # noqa: E731
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    x_g = (theta + s * torch.randn(n, generator=gen, dtype=torch.float64)).view(-1, 1, 1, 1)
    x_t = x_g + sigma * torch.randn(n, generator=gen, dtype=torch.float64).view(-1, 1, 1, 1)
    x0_fake = theta0 + s * s / vp * (x_t - theta0)  # the fake score: frozen at the current theta, differentiable in x_t
    x0_real = x_t / vq
    r = torch.exp(log_n(x_t, 0, vq) - log_n(x_t, theta0, vp)).detach().flatten()
    if diff_instruct:  # DMD2's generator loss 0.5 ||x - sg(x - g)||^2 (mean over the batch) with g = x0_fake - x0_real
        loss = 0.5 * ((x_g - (x_g - (x0_fake - x0_real)).detach()) ** 2).mean()
    else:
        loss = uni_instruct_loss(x_g, x_t, x0_real, x0_fake, r, divergence, torch.tensor(1.0, dtype=torch.float64),
                                 torch.tensor(sigma, dtype=torch.float64), w=torch.full((n,), sigma**-4, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, theta)
    grid = torch.linspace(-20, 20, 400_001, dtype=torch.float64)

    def J(th):
        p, q = torch.exp(log_n(grid, th, vp)), torch.exp(log_n(grid, 0, vq))
        if diff_instruct:
            return float(sigma**2 * (p * (torch.log(p) - torch.log(q))).sum() * (grid[1] - grid[0]))
        h = F_WEIGHTS[divergence](q / p)[0]
        return float((p * h * (-(grid - th) / vp + grid / vq) ** 2).sum() * (grid[1] - grid[0]))

    return float(grad), (J(theta0 + 1e-4) - J(theta0 - 1e-4)) / 2e-4, J


@pytest.mark.parametrize("divergence", ["reverse-kl", "forward-kl", "js", "diff-instruct"])
def test_uni_instruct_loss_has_the_gradient_of_the_expanded_f_divergence(divergence):
    """Against the divergence itself on a Gaussian toy where everything is exact (Uni-Instruct's expansion at one t;
    Diff-Instruct's gradient: that of sigma^2 KL(p_t || q_t))."""
    grad, expected, _ = _uni_toy(0.7, divergence.replace("diff-instruct", "reverse-kl"), diff_instruct=divergence == "diff-instruct")
    assert grad == pytest.approx(expected, rel=0.03), (grad, expected)


@pytest.mark.parametrize("divergence", ["forward-kl", "js", "diff-instruct"])
def test_a_few_uni_instruct_and_diff_instruct_updates_lower_their_divergence(divergence):
    """Gradient descent on the student's mean with the sampled losses lowers the divergence they estimate (the
    expanded f-divergence; Diff-Instruct's KL between the noised distributions)."""
    theta, start = 0.7, None
    for _ in range(4):
        grad, _, J = _uni_toy(theta, divergence.replace("diff-instruct", "reverse-kl"), n=200_000, diff_instruct=divergence == "diff-instruct")
        start = J(theta) if start is None else start
        theta -= 0.2 * grad / abs(grad)  # (steps of a fixed length along the sampled gradient's sign: Adam-like)
    assert J(theta) < 0.5 * start and abs(theta) < 0.7


def test_uni_instruct_reverse_kl_is_sid_at_alpha_one_half():
    from onestep_pipelines.training.methods.sid import uni_instruct_loss

    torch.manual_seed(0)
    x_g = torch.randn(3, 1, 2, 2, requires_grad=True)
    x0_real, x0_fake = 0.5 * x_g + 0.1, 0.3 * x_g
    uni = uni_instruct_loss(x_g, x_g, x0_real, x0_fake, torch.ones(3), "reverse-kl", torch.tensor(0.5), torch.tensor(1.0))  # (time weight 1)
    torch.testing.assert_close(uni, 2 * sid_generator_loss(x_g, x0_real, x0_fake, alpha=0.5))
    with pytest.raises(ValueError, match="--uni-instruct replaces SiD's loss"):
        DistillConfig(method="sid", uni_instruct=True, sid_alpha=1.0)
    with pytest.raises(ValueError, match="--uni-instruct applies to --method sid, not dmd2"):
        DistillConfig(method="dmd2", uni_instruct=True)


@pytest.mark.parametrize("options", [{"method": "sid", "uni_instruct": True, "divergence": "forward-kl", "gan_weight": 0.1},
                                     {"method": "dmd2", "diff_instruct": True}])
def test_uni_instruct_and_diff_instruct_students(tiny_teacher, tmp_path, options):
    result = distill(tiny(tiny_teacher, tmp_path / "run", **options))
    assert result["steps"] == 3 and os.path.isfile(os.path.join(result["student_dir"], "model_index.json"))
    card = open(os.path.join(result["student_dir"], "README.md")).read()
    name, arxiv = ("uni-instruct", "2505.20755") if options["method"] == "sid" else ("diff-instruct", "2305.18455")
    assert DiffusionPipeline.from_pretrained(result["student_dir"]).student.method == name
    assert f"{name} few-step student" in card and arxiv in card
