"""The distillation trainer on a tiny random digits teacher: runs, resumes exactly, stops on NaN, refuses bad input."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from onestep_pipelines import DigitsPipeline, DigitsTransformer2DModel
from onestep_pipelines.schedulers import ConsistencyScheduler, FlowMapScheduler, TDMScheduler
from onestep_pipelines.training.cli import main
from onestep_pipelines.training.methods import TrainingDiverged
from onestep_pipelines.training.trainer import DistillConfig, distill


def tiny(tiny_teacher, out, **overrides):
    values = dict(teacher=tiny_teacher, output_dir=str(out), max_train_steps=3, batch_size=8, evaluate=False, checkpoint_every=2, preview_every=2,
                  cpu_threads=1)  # (a tiny model gains nothing from more; a fixed count skips auto's measuring)
    return DistillConfig(**{**values, **overrides})


def student_weights(out):
    return load_file(os.path.join(out, "student", "transformer", "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_steps": 2, "lora_rank": 4}, {"gan_weight": 0.1, "divergence": "js", "gradient_accumulation_steps": 2}, {"method": "consistency", "num_steps": 4},
     {"method": "consistency", "num_steps": 2, "phases": 2, "loss": "l2", "lora_rank": 2}, {"method": "tdm", "num_steps": 4}],
)
def test_methods_run_and_write_a_loadable_student(tiny_teacher, tmp_path, overrides):
    result = distill(tiny(tiny_teacher, tmp_path / "run", **overrides))
    assert result["steps"] == 3
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert isinstance(pipe, DigitsPipeline) and isinstance(pipe.scheduler, ConsistencyScheduler)
    method = overrides.get("method", "dmd2")
    assert pipe.student.method == method and pipe.student.num_inference_steps == overrides.get("num_steps", 1)
    if method == "tdm":  # deterministic moves between TDM's uniform boundaries
        assert isinstance(pipe.scheduler, TDMScheduler) and pipe.student.scheduler_class == "TDMScheduler"
    else:
        assert pipe.scheduler.config.gamma == (0.0 if overrides.get("phases", 0) > 1 else 1.0)
    images = pipe(class_labels=[3, 4], output_type="np").images
    assert images.shape == (2, 8, 8, 1) and (images >= 0).all()
    assert os.path.isfile(tmp_path / "run" / "previews" / "step-2.png")
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step-2", "step-3"]
    assert method in open(os.path.join(result["student_dir"], "README.md")).read()
    if overrides.get("lora_rank"):
        from onestep_pipelines import load_student_lora

        assert os.path.isfile(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
        base = DigitsPipeline.from_pretrained(tiny_teacher)
        load_student_lora(base, str(tmp_path / "run" / "lora"), fuse=True)
        merged = student_weights(tmp_path / "run")
        for name, value in base.transformer.state_dict().items():
            torch.testing.assert_close(value, merged[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("option", [{"sigmas": "1,0.3"}, {"timesteps": "1000,300"}])
def test_a_student_is_trained_and_sampled_at_its_own_times(tiny_teacher, tmp_path, option):
    """``--sigmas`` / ``--timesteps``: the roll-outs run at those times and the student's scheduler records them, so
    ``pipe(num_inference_steps=2)`` (and the default call) samples there; other step counts keep the preset."""
    result = distill(tiny(tiny_teacher, tmp_path / "run", num_steps=2, **option))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.scheduler.config.trained_times == pytest.approx([1.0, 0.3]) and pipe.student.timesteps == pytest.approx([1000.0, 300.0])
    seen = []
    pipe.set_progress_bar_config(disable=True)
    pipe(class_labels=[1], callback_on_step_end=lambda p, i, t, kw: seen.append(float(t)) or kw)
    assert seen == pytest.approx([1000.0, 300.0])
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == pytest.approx([1000.0, 750.0, 500.0, 250.0])


def test_vp_students_record_integer_timesteps_and_refuse_sigmas(stock_teachers, tmp_path):
    folders, data = stock_teachers
    common = dict(teacher=folders["sd"], prompts=os.path.join(data, "prompts.txt"), resolution=32, num_steps=2, max_train_steps=1, batch_size=2,
                  evaluate=False, preview_every=0, lora_rank=4, fake_lora_rank=4, cpu_threads=1)
    with pytest.raises(ValueError, match="--sigmas applies to flow teachers; this teacher is VP"):
        distill(DistillConfig(output_dir=str(tmp_path / "bad"), sigmas="1,0.5", **common))
    result = distill(DistillConfig(output_dir=str(tmp_path / "run"), timesteps="999,400", **common))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.scheduler.config.trained_times == [999, 400]
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == [999, 400]


@pytest.mark.parametrize("options", [{"method": "dmd2"}, {"method": "consistency"}, {"method": "sid", "sid_alpha": 1.0, "gan_weight": 1.0, "gan_max_time": 0.05}],
                         ids=["dmd2", "consistency", "sida"])
def test_resume_continues_exactly(tiny_teacher, tmp_path, options):
    distill(tiny(tiny_teacher, tmp_path / "straight", max_train_steps=4, **options))
    distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=2, **options))
    distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=4, resume="latest", **options))
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_learning_rate_schedule_resumes_exactly_and_a_resumed_run_takes_its_new_learning_rate(tiny_teacher, tmp_path, monkeypatch):
    """The schedule is a function of the update (warm-up, then cosine to 0 at --max-train-steps), so a resumed run
    continues it exactly; a run resumed with another --learning-rate uses it (the checkpoint's optimizer moments are
    restored, not its learning rate); --lr-scheduler piecewise_constant equals such a two-part run."""
    rates, fake_rates, step = [], [], torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        scheduled = "initial_lr" in self.param_groups[0]  # the student's optimizer (the fake score's has no schedule)
        (rates if scheduled else fake_rates).append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    schedule = dict(lr_scheduler="cosine", lr_warmup_steps=1, learning_rate=2e-4, max_train_steps=4)
    distill(tiny(tiny_teacher, tmp_path / "straight", **schedule))
    assert rates == pytest.approx([0.0, 2e-4, 2e-4 * (1 + math.cos(math.pi / 3)) / 2, 2e-4 * (1 + math.cos(math.pi * 2 / 3)) / 2])
    straight, rates[:] = list(rates), []
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "student")
    distill(tiny(tiny_teacher, tmp_path / "resumed", **schedule, resume=str(tmp_path / "resumed" / "checkpoints" / "step-2")))
    assert rates == straight[2:]
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rates[:] = []
    distill(tiny(tiny_teacher, tmp_path / "resumed", max_train_steps=5, learning_rate=3e-5, fake_learning_rate=7e-5, resume="latest"))
    assert rates == [3e-5] and fake_rates[-1] == 7e-5
    # a piecewise-constant schedule is the two-part run it stands for: 2 updates, then a resume at a quarter of the rate
    rates[:] = []
    distill(tiny(tiny_teacher, tmp_path / "piecewise", lr_scheduler="piecewise_constant", lr_step_rules="1:2,0.25", learning_rate=2e-4, max_train_steps=4))
    assert rates == pytest.approx([2e-4, 2e-4, 5e-5, 5e-5])
    distill(tiny(tiny_teacher, tmp_path / "parts", learning_rate=2e-4, max_train_steps=2))
    shutil.rmtree(tmp_path / "parts" / "student")
    distill(tiny(tiny_teacher, tmp_path / "parts", learning_rate=5e-5, max_train_steps=4, resume="latest"))
    a, b = student_weights(tmp_path / "piecewise"), student_weights(tmp_path / "parts")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_averages_with_its_own_ema_decay(tiny_teacher, tmp_path):
    """--ema-decay is not a resume-comparable option: the resumed part uses the new decay (the checkpoint gives the
    shadow weights and the update counter only)."""
    distill(tiny(tiny_teacher, tmp_path, max_train_steps=2, ema_decay=0.2))
    distill(tiny(tiny_teacher, tmp_path, max_train_steps=3, ema_decay=0.1, checkpoint_every=1, resume="latest"))
    ckpt = tmp_path / "checkpoints"
    before, after, student = (load_file(ckpt / f"step-{n}" / f"{part}.safetensors") for n, part in ((2, "ema"), (3, "ema"), (3, "student")))
    meta = json.loads((ckpt / "step-3" / "ema.json").read_text())
    assert meta["decay"] == 0.1 and meta["optimization_step"] == 3
    for name, shadow in after.items():  # decay min(0.1, (1 + 2) / (10 + 2)) = 0.1 at the third update
        torch.testing.assert_close(shadow, 0.1 * before[name] + 0.9 * student[name])


@pytest.mark.slow
def test_kill_9_then_resume_loses_no_completed_checkpoint(tiny_teacher, tmp_path):
    out = tmp_path / "killed"
    args = ["distill", "--teacher", tiny_teacher, "--output-dir", str(out), "--max-train-steps", "100000", "--batch-size", "8",
            "--checkpoint-every", "1", "--preview-every", "0", "--no-evaluate"]
    code = f"import sys; from onestep_pipelines.training.cli import main; sys.exit(main({args!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120

    def completed():
        folder = out / "checkpoints"
        names = os.listdir(folder) if folder.is_dir() else []
        return sorted(int(n.split("-")[1]) for n in names if n.startswith("step-"))

    while time.time() < deadline and (completed() or [0])[-1] < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = completed()
    assert done and 3 <= done[-1] < 100000
    assert main([*args[:5], "--max-train-steps", str(done[-1] + 2), *args[7:], "--resume", "latest"]) == 0
    distill(tiny(tiny_teacher, tmp_path / "straight", max_train_steps=done[-1] + 2, checkpoint_every=1, preview_every=0))
    a, b = student_weights(out), student_weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _poisoned_at(call):
    """AdamW.step that turns the weights to NaN at its ``call``-th call (1 fake + 1 generator step per update)."""
    original = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = original(self, *a, **k)
        step.calls += 1
        if step.calls == call:
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.fill_(float("nan"))
        return out

    step.calls = 0
    return step


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim.AdamW, "step", _poisoned_at(1))
    with pytest.raises(TrainingDiverged, match=r"update 1: the generator loss is not finite \(nan\).*Last good checkpoint: none"):
        distill(tiny(tiny_teacher, tmp_path / "early"))
    monkeypatch.setattr(torch.optim.AdamW, "step", _poisoned_at(5))  # the fake-score step of update 3
    with pytest.raises(TrainingDiverged, match=r"update 3: .* Last good checkpoint: .*step-2"):
        distill(tiny(tiny_teacher, tmp_path / "late"))
    monkeypatch.undo()
    state = load_file(str(tmp_path / "late" / "checkpoints" / "step-2" / "student.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())  # the kept checkpoint is a good one


def test_bad_input_gets_clear_errors(tiny_teacher, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    cases = [
        (["--method", "magic"], "argument --method: invalid choice: 'magic'"),
        (["--teacher", str(tmp_path)], "--teacher " + str(tmp_path) + " is not a diffusers pipeline"),
        (["--teacher", "no/such/teacher"], "nor a Hub id 'org/name'"),
        (["--teacher", "nobody/no-such-teacher"], "a text-to-image teacher needs --prompts FILE"),
        (["--teacher", "nobody/no-such-teacher", "--prompts", str(prompts)], "HF_HUB_OFFLINE is set and the Hub cache"),
        (["--lora-rank", "-1"], "--lora-rank must be 0 (train all weights) or positive, got -1"),
        (["--num-steps", "9"], "--num-steps must be 1 to 4 for --method dmd2, got 9"),
        (["--divergence", "js"], "set --gan-weight > 0"),
        (["--method", "consistency", "--phases", "3", "--ode-steps", "32"], "--ode-steps must be a multiple of --phases 3"),
        (["--method", "consistency", "--loss", "l1"], "argument --loss: invalid choice: 'l1'"),
        (["--num-steps", "two"], "argument --num-steps: invalid int value: 'two'"),
        (["--lsg-scale", "2"], "--lsg-scale applies to --method sid, not dmd2"),
        (["--method", "sid", "--lsg-scale", "0"], "--lsg-scale must be positive (1 = no guidance), got 0.0"),
        (["--method", "sid", "--sid-alpha", "-1"], "--sid-alpha must be 0 or positive, got -1.0"),
        (["--num-steps", "2", "--timesteps", "999"], "--timesteps '999': 1 value(s) for --num-steps 2; give one per student step"),
        (["--num-steps", "2", "--sigmas", "0.2,1"], "the times must be strictly decreasing"),
        (["--num-steps", "2", "--sigmas", "1.5,0.2"], "sigmas lie in (0, 1]"),
        (["--num-steps", "2", "--sigmas", "1,x"], "not a comma-separated list of numbers"),
        (["--num-steps", "2", "--sigmas", "1,0.2", "--timesteps", "999,200"], "pass --timesteps or --sigmas, not both"),
        (["--method", "consistency", "--timesteps", "999"], "--timesteps applies to --method dmd2, tdm, sid, scm, piflow, reward, phased-dmd, not consistency"),
        (["--method", "scm", "--sigmas", "1"], "sCM trains at every time"),
        (["--num-steps", "2", "--timesteps", "1200,200"], "a flow teacher's timesteps are sigma x 1000, at most 1000"),
    ]
    for flags, message in cases:
        try:
            code = main(["distill", "--output-dir", str(tmp_path / "bad"), "--teacher", tiny_teacher, *flags])
        except SystemExit as exit:  # argparse's own checks (types, choices)
            code = exit.code
        assert code == 2
        assert message in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["distill", "--output-dir", str(busy), "--teacher", tiny_teacher]) == 2
    assert "not empty" in capsys.readouterr().err
    distill(tiny(tiny_teacher, tmp_path / "done", max_train_steps=1))
    with pytest.raises(ValueError, match="holds another run"):
        distill(tiny(tiny_teacher, tmp_path / "done", max_train_steps=1))
    with pytest.raises(ValueError, match="started with other options"):
        distill(tiny(tiny_teacher, tmp_path / "done", max_train_steps=2, seed=1, resume="latest"))
    with pytest.raises(ValueError, match=r"global batch was 8 \(8 per process x 1 process\(es\)\); this one's is 4 .*pass --batch-size 8"):
        distill(tiny(tiny_teacher, tmp_path / "done", max_train_steps=2, batch_size=4, resume="latest"))
    state = tmp_path / "done" / "run.json"  # a run of an older revision, recording other methods' options with other defaults
    state.write_text(json.dumps(json.loads(state.read_text()) | {"student_prediction": "v_prediction", "policy_components": 4}))
    distill(tiny(tiny_teacher, tmp_path / "done", max_train_steps=2, resume="latest"))
    assert json.loads((tmp_path / "done" / "summary.json").read_text())["steps"] == 2


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    for name in DistillConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text


@pytest.mark.slow
def test_two_cpu_processes_end_with_identical_weights(tiny_teacher, tmp_path):
    out = tmp_path / "ddp"
    # accelerate 1.15's `launch --cpu` starts a single process; torchrun + ACCELERATE_USE_CPU gives MULTI_CPU (gloo)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "onestep_pipelines.training.cli", "distill",
        "--teacher", tiny_teacher, "--output-dir", str(out), "--max-train-steps", "3", "--batch-size", "4",
        "--checkpoint-every", "2", "--preview-every", "0", "--no-evaluate",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    first, second = summary["rank_checksums"]
    assert first == second  # gradients were averaged: both ranks hold the same student
    assert (out / "checkpoints" / "step-3").is_dir() and (out / "student" / "model_index.json").is_file()


@pytest.mark.parametrize("arch", ["sd", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize("method", ["dmd2", "consistency", "tdm"])
def test_methods_on_tiny_stock_teachers_write_loadable_students(stock_teachers, tmp_path, arch, method):
    folders, data = stock_teachers
    lora = (method == "dmd2") != (arch in ("sd", "sd3"))  # each method and each architecture: LoRA and full
    source = {"data": data} if method == "consistency" else {"prompts": os.path.join(data, "prompts.txt")}
    config = DistillConfig(
        method=method, teacher=folders[arch], output_dir=str(tmp_path / "run"), resolution=32, num_steps=2,
        max_train_steps=2, batch_size=2, evaluate=False, checkpoint_every=1, preview_every=2, lora_rank=4 if lora else 0, **source,
    )
    result = distill(config)
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.student.architecture == arch and pipe.student.method == method and pipe.student.num_inference_steps == 2
    expected_time = "flow" if arch in ("sd3", "flux") else "vp"
    assert pipe.scheduler.config.time_type == expected_time
    pipe.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": 16} if arch in ("sd3", "flux") else {}
    out = pipe(prompt="a cat", height=32, width=32, output_type="latent", **extra).images  # steps and guidance from the metadata
    assert torch.isfinite(out).all()
    assert os.path.isfile(tmp_path / "run" / "previews" / "step-2.png")
    if lora:
        assert os.path.isfile(tmp_path / "run" / "lora" / "student_comfyui.safetensors")


def test_text_to_image_teachers_need_prompts_or_images(stock_teachers, tmp_path):
    folders, data = stock_teachers
    base = dict(teacher=folders["sd"], resolution=32, max_train_steps=1, batch_size=2, evaluate=False)
    with pytest.raises(ValueError, match="needs --prompts"):
        distill(DistillConfig(output_dir=str(tmp_path / "a"), **base))
    with pytest.raises(ValueError, match="trains on images"):
        distill(DistillConfig(method="consistency", prompts=os.path.join(data, "prompts.txt"), output_dir=str(tmp_path / "b"), **base))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        distill(DistillConfig(prompts=str(tmp_path / "empty.txt"), output_dir=str(tmp_path / "c"), **base))
    (tmp_path / "noimages").mkdir()
    with pytest.raises(ValueError, match="no image with a caption"):
        distill(DistillConfig(method="consistency", data=str(tmp_path / "noimages"), output_dir=str(tmp_path / "d"), **base))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; a real run is one process, tests are many runs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_and_push_to_hub(tiny_teacher, tmp_path, hub, fresh_accelerate_state, monkeypatch):
    hub.add_token("hf_test")  # --push-to-hub asks the Hub who the token is before the run
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    result = distill(tiny(tiny_teacher, tmp_path / "bf16", max_train_steps=2, mixed_precision="bf16", push_to_hub="me/digits-student"))
    assert "model_index.json" in hub.repos["me/digits-student"] and "README.md" in hub.repos["me/digits-student"]
    assert hub.commits["me/digits-student"][-1] in result["hub_url"]
    pipe = DiffusionPipeline.from_pretrained("me/digits-student", cache_dir=tmp_path / "cache")
    assert torch.isfinite(pipe(class_labels=[1], output_type="pt").images).all()


@pytest.mark.parametrize("overrides", [
    {"method": "meanflow", "target": "split"},
    {"method": "meanflow", "target": "jvp", "num_steps": 2, "lora_rank": 2, "source": "data", "guidance_scale": 1.5},
    {"method": "flowmap"},
    {"method": "flowmap", "target": "jvp", "num_steps": 4, "lora_rank": 2, "guidance_scale": 1.5},
    {"method": "meanflow", "target": "shortcut", "source": "data"},
    {"method": "flowmap", "target": "shortcut", "num_steps": 2},
])
def test_flow_map_methods_write_r_conditioned_students(tiny_teacher, tmp_path, overrides):
    from onestep_pipelines.schedulers import FlowMapScheduler

    result = distill(tiny(tiny_teacher, tmp_path / "run", **overrides))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert isinstance(pipe.scheduler, FlowMapScheduler) and pipe.student.r_conditioning
    seen = []
    pipe.transformer.r_embed.register_forward_hook(lambda m, a, o: seen.append(a[0]))  # r reached the model
    assert torch.isfinite(pipe(class_labels=[2, 5], output_type="pt").images).all()
    assert len(seen) == overrides.get("num_steps", 1)


def test_meanflow_jvp_matches_finite_differences(tiny_teacher):
    from types import SimpleNamespace

    from onestep_pipelines.training.methods.meanflow import MeanFlow
    from onestep_pipelines.training.teachers import load_teacher

    torch.manual_seed(0)  # (float32 central differences: a fixed draw, not one that depends on the tests before)
    teacher = load_teacher(tiny_teacher)
    student = DigitsTransformer2DModel.from_config(teacher.model.config)
    for p in student.parameters():
        torch.nn.init.normal_(p, std=0.1)
    config = tiny(tiny_teacher, "unused", method="meanflow", target="jvp")
    method = MeanFlow(teacher, student, FlowMapScheduler(), config, accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    t, r = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.1, 0.5, 0.0])
    cond = {"class_labels": torch.tensor([1, 2, 3])}
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    h = 2e-5  # time enters as 1000 t: central differences in float32 need a small step
    for tangent in ((v, zero, one), (torch.zeros_like(z), one, zero)):  # MeanFlow's d/dt along the path; flowmap's d/dr
        u, du = method.jvp(student, (z, r, t), tangent, cond)
        ahead = method.u(student, *(p + h * d for p, d in zip((z, r, t), tangent)), cond)
        behind = method.u(student, *(p - h * d for p, d in zip((z, r, t), tangent)), cond)
        torch.testing.assert_close(u, method.u(student, z, r, t, cond))
        torch.testing.assert_close(du, (ahead - behind) / (2 * h), rtol=3e-2, atol=2e-2)  # float32 round-off / h
        assert du.abs().mean() > 1e-2  # a real derivative, not a vanishing one


def test_jvp_target_with_a_time_step_takes_the_time_derivative_by_central_difference(tiny_teacher):
    from types import SimpleNamespace

    from onestep_pipelines.training.methods.meanflow import MeanFlow
    from onestep_pipelines.training.teachers import load_teacher

    torch.manual_seed(0)
    teacher = load_teacher(tiny_teacher)
    student = DigitsTransformer2DModel.from_config(teacher.model.config)
    for p in student.parameters():
        torch.nn.init.normal_(p, std=0.1)
    config = tiny(tiny_teacher, "unused", method="meanflow", target="jvp", tangent_time_step=0.01)
    method = MeanFlow(teacher, student, FlowMapScheduler(), config, accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    z, x, e = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t, r = torch.tensor([0.9, 0.5, 0.995]), torch.tensor([0.1, 0.495, 0.0])
    cond = {"class_labels": torch.tensor([1, 2, 3])}
    pred, target = method.prediction_and_target(z, r, t, x, e, cond)
    with torch.no_grad():
        v = method.teacher_velocity(z, t, cond)
        _, du_z = method.jvp(student, (z, r, t), (v, torch.zeros_like(r), torch.zeros_like(t)), cond)
        hi, lo = torch.tensor([0.91, 0.51, 1.0]), torch.tensor([0.89, 0.495, 0.985])  # kept inside [r, 1]
        du_t = (method.u(student, z, r, hi, cond) - method.u(student, z, r, lo, cond)) / (hi - lo).view(-1, 1, 1, 1)
    torch.testing.assert_close(target, v - (t - r).view(-1, 1, 1, 1) * (du_z + du_t), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred, method.u(student, z, r, t, cond))


@pytest.mark.parametrize("target,jump_fraction", [("jvp", 0.0), ("euler", 0.0), ("euler", 0.5), ("shortcut", 0.0)])
def test_flowmap_target_is_fixed_by_the_exact_flow_map(target, jump_fraction):
    """For the linear ODE dz/dt = a z the exact flow map is X(z, t, r) = z exp(a (r - t)); a student equal to it
    must be its own target (Eulerian, exactly, with the JVP; Lagrangian, to O(1/ode_steps), with the Euler step)."""
    from types import SimpleNamespace

    from onestep_pipelines.training.methods.flowmap import FlowMap

    a = 0.8
    method = FlowMap.__new__(FlowMap)
    method.config, method.target = SimpleNamespace(ode_steps=64, source="teacher", guidance_scale=1.0, jump_fraction=jump_fraction, tangent_time_step=0.0), target
    method.student = method.target_net = None
    method.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    method.u = lambda model, z, r, t, cond: z * (1 - torch.exp(a * (r - t).view(-1, 1, 1, 1))) / (t - r).clamp_min(1e-12).view(-1, 1, 1, 1)
    method.teacher_velocity = lambda z, t, cond: a * z
    z = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t, r = torch.tensor([1.0, 0.9, 0.5, 0.3], dtype=torch.float64), torch.tensor([0.0, 0.4, 0.49, 0.3], dtype=torch.float64)
    pred, target_u = method.prediction_and_target(z, r, t, None, None, {})
    torch.testing.assert_close(target_u[:3], pred[:3], rtol=1e-8 if target in ("jvp", "shortcut") else 1e-2, atol=0)
    torch.testing.assert_close(target_u[3], a * z[3])  # r = t: the teacher's velocity
    method.teacher_velocity = lambda z, t, cond: -a * z  # the wrong ODE is not a fixed point (shortcut: self-consistency
    wrong = method.prediction_and_target(z, r, t, None, None, {})[1]  # for t > r; the teacher enters at r = t)
    assert not torch.allclose(wrong[3:] if target == "shortcut" else wrong[:2], pred[3:] if target == "shortcut" else pred[:2], rtol=1e-2)


@pytest.mark.parametrize("source", ["teacher", "data"])
def test_shortcut_finest_jump_is_two_euler_steps_of_the_velocity(source):
    """Shortcut models' finest level is flow matching: the smallest jump's target is two Euler half steps of the
    instantaneous velocity (the teacher's, or the EMA network's at r = t), not of the network's own half jumps."""
    from types import SimpleNamespace

    from onestep_pipelines.training.methods.meanflow import MeanFlow

    method = MeanFlow.__new__(MeanFlow)
    method.config, method.target = SimpleNamespace(ode_steps=32, source=source, guidance_scale=1.0), "shortcut"
    method.student, method.target_net = "student", "ema"  # (ode_steps 32: the smallest step is 1/32)
    velocity = lambda z, t: torch.sin(3 * z) + t.view(-1, 1, 1, 1)  # noqa: E731
    half = lambda z, r, t: 2 * z - r.view(-1, 1, 1, 1)  # noqa: E731  (any other average velocity)
    def u(model, z, r, t, cond):  # the EMA network at r = t is the flow-matching velocity
        equal = (r == t).view(-1, 1, 1, 1) & (model == "ema") & (source == "data")
        return torch.where(equal, velocity(z, t), half(z, r, t))

    method.u = u
    method.teacher_velocity = lambda z, t, cond: velocity(z, t)
    method._velocity = lambda z, t, x, e, cond: velocity(z, t)
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.5, 0.75, 1.0], dtype=torch.float64)
    r = t - torch.tensor([1 / 32, 1 / 16, 1 / 32], dtype=torch.float64)
    pred, target = method.prediction_and_target(z, r, t, None, None, {})
    for i in (0, 2):  # finest: z_s = z - h v(z, t), u_tgt = (v(z, t) + v(z_s, s)) / 2 with h = 1/64
        s = t[i : i + 1] - 1 / 64
        z_s = z[i : i + 1] - velocity(z[i : i + 1], t[i : i + 1]) / 64
        torch.testing.assert_close(target[i : i + 1], (velocity(z[i : i + 1], t[i : i + 1]) + velocity(z_s, s)) / 2)
    s, one = t[1:2] - 1 / 32, slice(1, 2)  # a coarser jump: the network's own two half jumps
    z_s = z[one] - half(z[one], s, t[one]) / 32
    torch.testing.assert_close(target[one], (half(z[one], s, t[one]) + half(z_s, r[one], s)) / 2)


def test_shortcut_pairs_are_dyadic_steps_on_their_grid(tiny_teacher):
    from onestep_pipelines.training.draws import Draws
    from onestep_pipelines.training.methods.meanflow import MeanFlow

    method = MeanFlow.__new__(MeanFlow)
    method.target = "shortcut"
    method.config = tiny(tiny_teacher, "unused", method="meanflow", target="shortcut", ode_steps=48, equal_fraction=0.25, endpoint_fraction=0.4)
    t, r = method.sample_pairs(Draws(0, 0, 0, 4096, "cpu"))
    d = t - r
    equal = d == 0
    assert abs(float(equal.float().mean()) - 0.25) < 0.03  # flow matching
    steps = d[~equal]
    k = -torch.log2(steps)
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-5)  # d = 2^-k
    assert set(k.round().int().tolist()) == {0, 1, 2, 3, 4, 5}  # down to 1/32 <= 1/48 rounded to a power of 2
    assert abs(float((k.round() == 0).float().mean()) - (0.4 + 0.6 / 6)) < 0.03  # the whole interval, and k = 0 of 6 levels
    cells = t[~equal] / steps
    torch.testing.assert_close(cells, cells.round(), rtol=0, atol=1e-4)  # t on the grid of multiples of d
    assert float(r[~equal].min()) >= 0 and float(t.max()) <= 1


def test_flow_map_methods_refuse_vp_teachers_and_bad_options(stock_teachers, tmp_path, tiny_teacher):
    folders, data = stock_teachers
    for method in ("meanflow", "flowmap"):
        with pytest.raises(ValueError, match=f"--method {method} needs a flow teacher.*is a VP"):
            distill(DistillConfig(method=method, teacher=folders["sd"], data=data, resolution=32, output_dir=str(tmp_path / method),
                                  max_train_steps=1, batch_size=2, evaluate=False))
    bad = (
        ({"method": "meanflow", "target": "newton"}, "--target 'newton' does not apply to --method meanflow; choose one of split, jvp"),
        ({"method": "meanflow", "source": "dream"}, "--source 'dream' does not apply to --method meanflow"),
        ({"method": "flowmap", "target": "split"}, "--target 'split' does not apply to --method flowmap; choose one of euler, jvp"),
        ({"method": "flowmap", "source": "data"}, "--source 'data' does not apply to --method flowmap"),
        ({"method": "dmd2", "target": "jvp"}, "--target 'jvp' does not apply to --method dmd2; it takes no --target"),
    )
    for i, (option, message) in enumerate(bad):
        with pytest.raises(ValueError, match=message):
            distill(tiny(tiny_teacher, tmp_path / f"bad-{i}", **option))


@pytest.mark.parametrize("method", ["meanflow", "flowmap"])
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_flow_map_methods_on_tiny_flow_teachers_write_two_time_students(stock_teachers, tmp_path, arch, method):
    folders, data = stock_teachers
    config = DistillConfig(
        method=method, teacher=folders[arch], data=data, resolution=32, output_dir=str(tmp_path / "run"), max_train_steps=2,
        batch_size=2, evaluate=False, preview_every=0, lora_rank=4 if arch == "sd3" else 0,
    )
    result = distill(config)
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert type(pipe.transformer).__name__.startswith("TwoTime") and pipe.student.r_conditioning
    out = pipe(prompt="a cat", height=32, width=32, output_type="latent", max_sequence_length=16).images
    assert torch.isfinite(out).all()
    if arch == "sd3":
        assert os.path.isfile(tmp_path / "run" / "lora" / "r_embedder.safetensors")


def test_flow_map_methods_refuse_students_without_r_and_models_without_forward_ad(tiny_teacher, stock_teachers, without_forward_ad):
    from types import SimpleNamespace

    from onestep_pipelines.training.methods.flowmap import FlowMap
    from onestep_pipelines.training.teachers import load_teacher

    folders, _ = stock_teachers
    teacher = load_teacher(folders["sd3"], resolution=32)
    config = DistillConfig(method="flowmap", teacher=folders["sd3"], target="jvp")
    with pytest.raises(ValueError, match="flowmap trains a flow map.*SD3Transformer2DModel does not"):
        FlowMap(teacher, teacher.model, FlowMapScheduler(), config)

    digits = load_teacher(tiny_teacher)
    student = DigitsTransformer2DModel.from_config(digits.model.config)
    method = FlowMap(digits, student, FlowMapScheduler(), tiny(tiny_teacher, "unused", method="flowmap", target="jvp"), accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    without_forward_ad(student.out)
    z, t, r = torch.randn(2, 1, 8, 8), torch.tensor([0.9, 0.5]), torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="--target jvp: DigitsTransformer2DModel cannot do forward-mode AD here.*use --target euler"):
        method.jvp(student, (z, r, t), (torch.zeros_like(z), torch.ones_like(r), torch.zeros_like(t)), {"class_labels": torch.tensor([1, 2])})


@pytest.mark.parametrize("method,fake", [("dmd2", 4), ("consistency", 0)])
def test_lora_networks_share_one_frozen_base_and_train_exactly_as_copies_did(stock_teachers, tmp_path, monkeypatch, method, fake):
    """A LoRA student, a LoRA fake score (DMD2) and a target network (consistency) hold the teacher's frozen base weights
    themselves, not copies: the weights of all the networks are one base plus adapters, and the run's weights after 3
    updates equal those of a run with a copy per network (the same checksum)."""
    import functools
    import importlib

    import onestep_pipelines.training.methods.base as base
    from onestep_pipelines.testing import tiny_pipeline

    folders, data = stock_teachers
    source = {"data": data} if method == "consistency" else {"prompts": os.path.join(data, "prompts.txt")}

    def run(name):
        return distill(DistillConfig(method=method, teacher=folders["sd"], output_dir=str(tmp_path / name), resolution=32, num_steps=2,
                                     max_train_steps=3, batch_size=2, evaluate=False, preview_every=0, lora_rank=4, fake_lora_rank=fake,
                                     cpu_threads=1, **source))  # (one thread: the two runs are compared bit for bit)

    tied = run("tied")
    unet_mb = sum(p.numel() * 4 for p in tiny_pipeline("sd").unet.parameters()) / 2**20
    assert unet_mb < tied["weights_mb"] < 1.5 * unet_mb  # one float32 base (the CPU run's precision) plus the adapters
    copies_only = functools.partial(base.tied_copy, tie=False)
    for module in ("trainer", "methods.dmd2", "methods.consistency"):  # (imported before base changes: they bind the name)
        monkeypatch.setattr(importlib.import_module(f"onestep_pipelines.training.{module}"), "tied_copy", lambda module, tie=True: copies_only(module))
    copies = run("copies")
    assert copies["weights_mb"] > (3 if fake else 2.9) * unet_mb
    assert copies["rank_checksums"] == tied["rank_checksums"]


def test_an_int8_base_under_lora_adapters_trains_in_less_memory_and_exports_a_full_precision_student(stock_teachers, tmp_path):
    """--quantize-base int8: the linear layers of the shared frozen base in int8 (torchao, weight-only); the adapters train;
    the exported student is the base reloaded at full precision with the LoRA fused, and equals what diffusers gives
    with the LoRA file on the teacher."""
    from onestep_pipelines.students import load_student_lora

    folders, data = stock_teachers
    base = dict(teacher=folders["sd"], prompts=os.path.join(data, "prompts.txt"), resolution=32, num_steps=1, max_train_steps=3, batch_size=2,
                evaluate=False, preview_every=3, lora_rank=4, fake_lora_rank=4)
    full = distill(DistillConfig(output_dir=str(tmp_path / "full"), **base))
    int8 = distill(DistillConfig(output_dir=str(tmp_path / "int8"), quantize_base="int8", **base))
    assert int8["weights_mb"] < 0.85 * full["weights_mb"]  # (the tiny UNet's convolutions stay as they are)
    student = DiffusionPipeline.from_pretrained(int8["student_dir"])
    assert all(type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in student.unet.parameters())
    teacher = DiffusionPipeline.from_pretrained(folders["sd"])
    from onestep_pipelines.pipelines import student_pipeline

    merged = student_pipeline(teacher)
    load_student_lora(merged, int8["lora_dir"], fuse=True)
    for (name, a), b in zip(student.unet.state_dict().items(), merged.unet.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert os.path.isfile(tmp_path / "int8" / "previews" / "step-3.png")


@pytest.mark.parametrize("options,message", [
    ({"quantize_base": "int8"}, "quantizes the frozen base under a LoRA student: pass --lora-rank"),
    ({"quantize_base": "int8", "lora_rank": 4}, "the fake score of --method dmd2 would be a trained full copy"),
    ({"quantize_base": "float8", "lora_rank": 4, "fake_lora_rank": 4, "device": "cpu"}, "float8 needs a GPU with float8 arithmetic"),
])
def test_bad_quantized_base_options_are_refused_by_name(stock_teachers, tmp_path, options, message):
    folders, data = stock_teachers
    with pytest.raises(ValueError, match=message):
        distill(DistillConfig(teacher=folders["sd"], prompts=os.path.join(data, "prompts.txt"), resolution=32, max_train_steps=1, batch_size=2,
                              evaluate=False, output_dir=str(tmp_path / "run"), **options))
