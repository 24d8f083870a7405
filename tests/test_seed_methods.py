"""Progressive distillation, Phased DMD, TwinFlow, TDD and Hyper-SD: each method's math against a hand-computed case, a
few updates on the shipped digits teacher lower its loss and write a student that loads and samples with the
scheduler it was trained for, and resuming continues exactly (the longer runs in CI's slow lane)."""

import os

import pytest
import torch
from diffusers import DiffusionPipeline

from onestep_pipelines import DigitsPipeline
from onestep_pipelines.schedulers import ConsistencyScheduler, FlowMapScheduler
from onestep_pipelines.training.methods.progressive import ProgressiveDistillation, one_step_x0, stage_at, stage_count
from onestep_pipelines.training.trainer import DistillConfig, distill

from test_training import student_weights


def run(out, **options):
    """A short run on the shipped (learned) digits teacher, losses logged at every update."""
    values = dict(teacher="digits", output_dir=str(out), batch_size=32, evaluate=False, checkpoint_every=2, preview_every=0, log_every=1,
                  log_with="none", cpu_threads=1)
    return distill(DistillConfig(**{**values, **options}))


def losses(result, name):
    return [entry[name] for entry in result["parts"][-1]["losses"]]


def loads_and_samples(result, method, steps, gamma, scheduler=ConsistencyScheduler):
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert isinstance(pipe, DigitsPipeline) and type(pipe.scheduler) is scheduler
    assert pipe.student.method == method and pipe.student.num_inference_steps == steps and pipe.scheduler.config.gamma == gamma
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[3, 7], output_type="np").images
    assert images.shape == (2, 8, 8, 1) and (images >= 0).all()
    assert method in open(os.path.join(result["student_dir"], "README.md")).read()
    return pipe


# ------------------------------------------------------------------------------------------- progressive distillation
def test_progressive_target_is_the_x0_of_one_ddim_step_landing_where_two_teacher_steps_land():
    torch.manual_seed(0)
    z_t, z_s = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    for (a_t, s_t), (a_s, s_s) in [((0.3, 0.95), (0.8, 0.6)), ((0.0, 1.0), (0.5, 0.5)), ((0.6, 0.8), (1.0, 0.0))]:
        x = one_step_x0(z_t, z_s, torch.tensor(a_t), torch.tensor(s_t), torch.tensor(a_s), torch.tensor(s_s))
        eps = (z_t - a_t * x) / s_t
        torch.testing.assert_close(a_s * x + s_s * eps, z_s)  # one DDIM step with x from t lands on z_s


def test_progressive_stages_halve_the_steps_and_split_the_updates_evenly():
    assert stage_count(32, 1) == 5 and stage_count(32, 4) == 3 and stage_count(4, 2) == 1
    assert [stage_at(u, 3, 9) for u in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [stage_at(u, 2, 5) for u in range(5)] == [0, 0, 0, 1, 1]
    for bad in ({"ode_steps": 12, "num_steps": 4}, {"ode_steps": 4, "num_steps": 4}, {"ode_steps": 6, "num_steps": 2}):
        with pytest.raises(ValueError, match="must be --num-steps .* times a power of 2"):
            DistillConfig(method="progressive", **bad)
    with pytest.raises(ValueError, match="--phases applies to --method consistency, phased-dmd, hyper-sd, not progressive"):
        DistillConfig(method="progressive", phases=2)


def test_progressive_distillation_lowers_its_loss_in_each_stage_and_writes_a_deterministic_student(tmp_path):
    result = run(tmp_path / "run", method="progressive", num_steps=2, ode_steps=8, max_train_steps=16, learning_rate=3e-4)
    curve, stages = losses(result, "progressive"), losses(result, "stage")
    assert stages == [0.0] * 8 + [1.0] * 8  # 8 -> 4 steps, then 4 -> 2
    for first in (0, 8):
        stage = curve[first: first + 8]
        assert sum(stage[-3:]) < sum(stage[:3]), curve
    loads_and_samples(result, "progressive", 2, gamma=0.0)


def test_progressive_resume_across_a_stage_boundary_is_exact(tmp_path, monkeypatch):
    """The stage teacher is the student as its stage left it; it is checkpointed, so a run stopped at the boundary
    and resumed trains the next stage on the same teacher as a run that never stopped."""
    options = dict(method="progressive", num_steps=1, ode_steps=4, max_train_steps=4, learning_rate=3e-4)
    run(tmp_path / "straight", **options)
    step = ProgressiveDistillation.train_step

    def stop_at_the_boundary(self, batch, rng):
        if self.update_index == 2:
            raise RuntimeError("stopped")
        return step(self, batch, rng)

    monkeypatch.setattr(ProgressiveDistillation, "train_step", stop_at_the_boundary)
    with pytest.raises(RuntimeError, match="stopped"):
        run(tmp_path / "split", **options)
    monkeypatch.setattr(ProgressiveDistillation, "train_step", step)
    run(tmp_path / "split", resume="latest", **options)
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------- Phased DMD
def test_subinterval_target_is_unbiased_for_the_clean_sample():
    """Data at an edge s (x_s = alpha_s x0 + sigma_s e'), noised on to t: the target x0* averages to x0 given x_t (here
    x0 is one point, so E[x0 | x_t] = x0 for every x_t: the mean is x0 and x0* does not move with x_t)."""
    from onestep_pipelines.training.methods.phased_dmd import subinterval_x0_target

    gen = torch.Generator().manual_seed(0)
    for (alpha_s, sigma_s), (alpha_t, sigma_t) in [((0.5, 0.5), (0.2, 0.8)), ((0.9, 0.44), (0.6, 0.8)), ((1.0, 0.0), (0.7, 0.3))]:
        x0 = 1.5
        x_s = alpha_s * x0 + sigma_s * torch.randn(400_000, generator=gen)
        a = alpha_t / alpha_s
        b = (sigma_t**2 - a**2 * sigma_s**2) ** 0.5
        x_t = a * x_s + b * torch.randn(400_000, generator=gen)
        target = subinterval_x0_target(x_s, x_t, a, b, alpha_s, sigma_s, sigma_t)
        assert abs(float(target.mean()) - x0) < 0.02
        assert abs(float(((target - target.mean()) * (x_t - x_t.mean())).mean())) < 0.01
    # s = 0 (the last phase): the target is the sample itself, DMD2's fake-score loss
    torch.testing.assert_close(subinterval_x0_target(x_s, x_t, 0.7, 0.3, 1.0, 0.0, 0.3), x_s)


def build(method_name, **options):
    """The method on the shipped digits teacher as the trainer builds it (one process, no placement), and a function
    giving the draws of an update."""
    import copy
    from types import SimpleNamespace

    from onestep_pipelines import schedulers
    from onestep_pipelines.training.draws import Draws
    from onestep_pipelines.training.methods import get_method
    from onestep_pipelines.training.methods.base import FiniteGuard
    from onestep_pipelines.training.teachers import load_teacher

    teacher = load_teacher("digits")
    cls = get_method(method_name)
    student = copy.deepcopy(teacher.model).requires_grad_(True)
    config = DistillConfig(method=method_name, batch_size=32, **options)
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, backward=lambda loss: loss.backward(), scaler=None)
    gamma = cls.sampler_gamma(config)
    scheduler = getattr(schedulers, cls.scheduler_class).from_config(teacher.pipeline.scheduler.config, timestep_preset=cls.timestep_preset,
                                                                     **({} if gamma is None else {"gamma": gamma}))
    method = cls(teacher, student, scheduler, config, accelerator=accelerator, guard=FiniteGuard("cpu"))
    method.place(student, torch.optim.AdamW(student.parameters(), lr=config.learning_rate, betas=cls.adam_betas))
    for name, opt in method.build_optimizers().items():
        setattr(method, name, opt)
    method.place(student, method.optimizer)
    return method, lambda update: Draws(0, update, 0, 32, "cpu")


def _phased(**options):
    return build("phased-dmd", **options)


@pytest.mark.slow  # (a training run: CI's second lane)
def test_phased_dmd_phases_end_at_the_student_times_and_each_fake_score_learns_its_phase():
    method, draws = _phased(num_steps=4, phases=2, fake_learning_rate=1e-3)
    with torch.no_grad():  # a student far from the teacher: its phase distributions are not the teacher's
        for p in method.student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    assert method.phases == 2 and len(method.trained_networks()) == 2 and len(method.checkpoint_optimizers()) == 2
    assert method.edge(0, 1, "cpu").tolist() == pytest.approx([0.5]) and method.edge(1, 1, "cpu").tolist() == [0.0]
    rng = draws(0)
    rng.host_integer = lambda low, high: 0  # phase 0 only: a fixed batch of noisy samples at its edge, sigma 0.5
    with torch.no_grad():
        x_s = method._generate(method.teacher.sample_conditions(rng), rng)
        conditions = method.teacher.sample_conditions(rng)
        x_t, t, noise = method._noised(x_s, rng)
        assert method.phase == 0 and (t > 0.5).all()

    def fixed_loss():
        with torch.no_grad():
            target, weight = method.fake_target(x_s, x_t, t, noise)
            return float((((method.fake_prediction(x_t, t, conditions) - target) * weight) ** 2).mean())

    before, untouched = fixed_loss(), [p.clone() for p in method.fake_1.parameters()]
    for update in range(1, 16):  # phase 0's fake score alone, on fresh phase-0 samples
        rng = draws(update)
        rng.host_integer = lambda low, high: 0
        method.update_index = update
        method._fake_update(method.teacher.sample_conditions(rng), {}, rng)
    method._use_phase(0)
    assert fixed_loss() < 0.9 * before
    assert all(torch.equal(a, b) for a, b in zip(untouched, method.fake_1.parameters()))


def test_phased_dmd_writes_a_deterministic_few_step_student_and_resumes_exactly(tmp_path):
    options = dict(method="phased-dmd", num_steps=2, max_train_steps=4, learning_rate=3e-5)
    result = run(tmp_path / "straight", **options)
    assert {"generator", "fake"} <= set(losses(result, "generator") and result["parts"][-1]["losses"][0])
    loads_and_samples(result, "phased-dmd", 2, gamma=0.0)
    run(tmp_path / "split", **{**options, "max_train_steps": 2})
    run(tmp_path / "split", resume="latest", **options)
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------------- TwinFlow
@pytest.mark.parametrize("source", ["data", pytest.param("teacher", marks=pytest.mark.slow)])
def test_twinflow_twin_learns_the_fake_flow_and_writes_an_any_step_student(tmp_path, source):
    """From data (no teacher in any loss) or from the teacher: the twin's flow matching on the network's own one-step
    samples and the rectification loss fall over a few updates; the student is a flow map sampled by deterministic jumps."""
    result = run(tmp_path / "run", method="twinflow", source=source, max_train_steps=16, learning_rate=2e-4)
    for name in ("adversarial", "rectify"):
        curve = losses(result, name)
        assert sum(curve[-4:]) < 0.9 * sum(curve[:4]), (name, curve)
    pipe = loads_and_samples(result, "twinflow", 1, gamma=0.0, scheduler=FlowMapScheduler)
    assert pipe.student.r_conditioning and pipe.student.recommended_steps == [1, 2, 4, 8]


def test_twinflow_twin_is_the_same_network_at_negative_time(monkeypatch):
    """The fake velocity is the student called at (-t, -t); the real one the student at (t, t) from data, the
    teacher's from the teacher."""
    from onestep_pipelines.training.methods.twinflow import TwinFlow

    calls = []
    method = TwinFlow.__new__(TwinFlow)
    method.student, method.config = "student", DistillConfig(method="twinflow", source="data")
    monkeypatch.setattr(TwinFlow, "u", lambda self, model, z, r, t, c: calls.append((model, r.tolist(), t.tolist())))
    monkeypatch.setattr(TwinFlow, "teacher_velocity", lambda self, z, t, c: calls.append(("teacher", t.tolist())))
    t = torch.tensor([0.25, 0.5])
    method.fake_velocity(None, t, {})
    method.real_velocity(None, t, {})
    method.config = DistillConfig(method="twinflow", source="teacher")
    method.real_velocity(None, t, {})
    assert calls == [("student", [-0.25, -0.5], [-0.25, -0.5]), ("student", [0.25, 0.5], [0.25, 0.5]), ("teacher", [0.25, 0.5])]


# -------------------------------------------------------------------------------------------------------------- TDD
def test_tdd_targets_are_the_times_of_its_schedules_below_the_teacher_step():
    from onestep_pipelines.training.methods.tdd import select_targets, target_set

    times = target_set(4)  # trailing schedules of 4 to 8 steps, and 0
    assert times[0] == 0 and 0.75 in times.tolist() and 0.875 in times.tolist() and 1.0 not in times.tolist() and len(times) == 22
    assert target_set(1).tolist() == [0.0, 0.5]
    t_prev = torch.tensor([0.7, 0.7, 0.12, 0.0, 0.5])
    s = select_targets(times, t_prev, torch.tensor([0.0, 0.999, 0.5, 0.5, 0.999]), torch.zeros(5))
    # below 0.7 the largest target is 2/3; the window reaches 0.26 below it: 3/7 ... 2/3 (0.4 is outside)
    assert s.tolist() == pytest.approx([3 / 7, 2 / 3, 0.0, 0.0, 0.5], abs=1e-6)
    jittered = select_targets(times, torch.full((1000,), 0.5), torch.full((1000,), 0.999), torch.rand(1000, generator=torch.Generator().manual_seed(0)))
    assert 0.35 < float(jittered.min()) and float(jittered.max()) <= 0.5  # s = (1 - 0.3 u) tau, tau = 0.5


def lowers_its_loss(method, draws, loss, updates=20, factor=0.85):
    """``loss(batch, rng)`` on a fixed batch and draws falls below ``factor`` of its start after ``updates`` updates."""
    from onestep_pipelines.training.data import make_data

    data = make_data(method.teacher, method.config, "cpu")
    fixed = data.batch(draws(10_000))
    with torch.no_grad():
        before = float(loss(fixed, draws(10_000)))
    for update in range(updates):
        method.step(data.batch(draws(update)), draws(update))
    with torch.no_grad():
        after = float(loss(fixed, draws(10_000)))
    assert after < factor * before, (before, after)


@pytest.mark.slow  # (a training run: CI's second lane)
def test_tdd_lowers_its_loss_and_trains_the_unconditional_map_too(monkeypatch):
    """A few updates lower the loss on a fixed batch; a fraction of the samples carries the null label (the digits
    teacher's class 10), so the student keeps an unconditional map for inference-time guidance."""
    method, draws = build("tdd", num_steps=4, learning_rate=3e-4, target_ema=0.0)
    labels = []
    monkeypatch.setattr(type(method.teacher), "predict", lambda self, model, x, t, c, guidance_scale=1.0, f=type(method.teacher).predict:
                        labels.append(c["class_labels"]) or f(self, model, x, t, c, guidance_scale))
    lowers_its_loss(method, draws, method.loss)
    null = float((torch.cat(labels) == method.teacher.model.config.num_classes).float().mean())
    assert 0.1 < null < 0.3  # --uncond-fraction 0.2


def test_tdd_students_take_classifier_free_guidance_at_inference(tmp_path):
    result = run(tmp_path / "run", method="tdd", num_steps=2, max_train_steps=2, student_guidance=1.5)
    pipe = loads_and_samples(result, "tdd", 2, gamma=0.2)
    assert pipe.student.guidance_scale == 1.5 and not pipe.student.guidance_baked
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    pipe(class_labels=[1, 2], num_inference_steps=2)
    assert calls == [4, 4]  # CFG by default (conditional and unconditional halves in one batch)
    calls.clear()
    pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.0)
    assert calls == [2, 2]


# --------------------------------------------------------------------------------------------------------- Hyper-SD
@pytest.mark.slow  # (a training run: CI's second lane)
def test_hyper_sd_halves_its_segments_stage_by_stage_with_the_dmd_term_in_the_last(tmp_path):
    result = run(tmp_path / "run", method="hyper-sd", num_steps=1, phases=4, ode_steps=16, max_train_steps=24, learning_rate=3e-4, dmd_weight=0.5)
    assert losses(result, "segments") == [4.0] * 8 + [2.0] * 8 + [1.0] * 8
    assert all("dmd" in entry for entry in result["parts"][-1]["losses"][16:])  # the score-distillation term: last stage only
    assert not any("dmd" in entry for entry in result["parts"][-1]["losses"][:16])
    loads_and_samples(result, "hyper-sd", 1, gamma=1.0)
    with pytest.raises(ValueError, match="Hyper-SD's first segment count"):
        DistillConfig(method="hyper-sd", num_steps=2, phases=6)
    with pytest.raises(ValueError, match="--dmd-weight applies to --method scm, hyper-sd, not consistency"):
        DistillConfig(method="consistency", dmd_weight=1.0)


def test_hyper_sd_few_step_student_jumps_between_its_segment_edges(tmp_path):
    result = run(tmp_path / "run", method="hyper-sd", num_steps=2, phases=4, ode_steps=8, max_train_steps=2)
    pipe = loads_and_samples(result, "hyper-sd", 2, gamma=0.0)
    assert pipe.student.timesteps == [1000.0, 500.0]
    DistillConfig(method="hyper-sd", num_steps=8, phases=8)  # 8-step students, as the published 8-step LoRAs
    with pytest.raises(ValueError, match="--num-steps must be 1 to 8 for --method hyper-sd, got 9"):
        DistillConfig(method="hyper-sd", num_steps=9)


@pytest.mark.slow  # (a training run: CI's second lane)
def test_hyper_sd_lowers_its_segment_consistency_loss():
    from onestep_pipelines.training.methods.consistency import phased_consistency_loss

    method, draws = build("hyper-sd", num_steps=1, phases=4, ode_steps=16, max_train_steps=100, learning_rate=1e-4, target_ema=0.0)
    assert method.segments == [4, 2, 1] and method.stage() == 0
    lowers_its_loss(method, draws, lambda batch, rng: phased_consistency_loss(method, batch["images"], batch["conditions"], rng, 4), updates=30)


# ------------------------------------------------------------------------------------- text-to-image teachers
@pytest.mark.parametrize("choice, recorded", [("v_prediction", "v_prediction"), ("teacher", "epsilon")])
def test_progressive_students_of_epsilon_teachers_sample_in_the_parameterisation_they_were_trained_in(stock_teachers, tmp_path, choice, recorded):
    """Salimans & Ho's v-prediction (``--student-prediction v_prediction``): the student of an epsilon SD teacher
    outputs v, its scheduler and LoRA metadata say so, and its 1-step sample is ``x0 = alpha z - sigma v`` of its own
    output; the default (``teacher``) keeps epsilon."""
    from diffusers import StableDiffusionPipeline

    from onestep_pipelines.students.lora import load_student_lora

    folders, data = stock_teachers
    result = distill(DistillConfig(teacher=folders["sd"], data=data, resolution=32, output_dir=str(tmp_path / "run"), method="progressive",
                                   num_steps=1, ode_steps=2, max_train_steps=2, batch_size=2, evaluate=False, preview_every=0, lora_rank=4,
                                   cpu_threads=1, student_prediction=choice))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.scheduler.config.prediction_type == recorded
    assert f"prediction {recorded}" in open(os.path.join(result["student_dir"], "README.md")).read()
    stock = StableDiffusionPipeline.from_pretrained(folders["sd"])  # the LoRA on the stock pipeline: its recorded scheduler
    assert load_student_lora(stock, result["lora_dir"]).scheduler_config["prediction_type"] == recorded
    assert stock.scheduler.config.prediction_type == recorded
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    emb = pipe.encode_prompt("a cat", "cpu", 1, False)[0]
    with torch.no_grad():
        sample = pipe(prompt_embeds=emb, guidance_scale=1.0, num_inference_steps=1, latents=z.clone(), output_type="latent").images
        t = pipe.scheduler.timesteps[0]
        out = pipe.unet(z, t, encoder_hidden_states=emb).sample
    alpha, sigma = pipe.scheduler.alphas_cumprod[int(t)].sqrt(), (1 - pipe.scheduler.alphas_cumprod[int(t)]).sqrt()
    if recorded == "v_prediction":
        x0, eps = alpha * z - sigma * out, sigma * z + alpha * out
    else:
        x0, eps = (z - sigma * out) / alpha, out
    final = pipe.scheduler.alphas_cumprod[0]  # the DDIM move ends at the first timestep (set_alpha_to_one False)
    torch.testing.assert_close(sample, final.sqrt() * x0 + (1 - final).sqrt() * eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, options", [
    ("sd", {"method": "progressive", "num_steps": 2, "ode_steps": 4}),  # VP: the grid reaches the clean end (timestep -1)
    ("sd", {"method": "tdd", "num_steps": 2, "uncond_fraction": 0.5, "student_guidance": 1.5}),
    pytest.param("sd", {"method": "hyper-sd", "num_steps": 2, "phases": 4, "ode_steps": 8}, marks=pytest.mark.slow),
    pytest.param("sd", {"method": "phased-dmd", "num_steps": 2, "prompts": True, "fake_lora_rank": 4}, marks=pytest.mark.slow),
    pytest.param("sd3", {"method": "twinflow", "num_steps": 1}, marks=pytest.mark.slow),
])
def test_the_new_methods_train_lora_students_of_tiny_text_to_image_teachers(stock_teachers, tmp_path, arch, options):
    folders, data = stock_teachers
    options = dict(options)
    source = {"prompts": os.path.join(data, "prompts.txt")} if options.pop("prompts", False) else {"data": data}
    result = distill(DistillConfig(teacher=folders[arch], resolution=32, output_dir=str(tmp_path / "run"), max_train_steps=3, batch_size=2,
                                   evaluate=False, preview_every=0, lora_rank=4, cpu_threads=1, **source, **options))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.student.method == options["method"] and pipe.student.architecture == arch
    images = pipe(prompt=["a cat", "a dog"], height=32, width=32, output_type="latent").images
    assert torch.isfinite(images).all()
    assert os.path.isfile(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
