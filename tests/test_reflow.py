"""Reflow: couplings equal the teacher pipeline's own Euler samples, the coupling cache (resume, refusal of couplings
made otherwise, a broken chunk), the loss against its formula, the U-shaped times, trajectory straightness against a
hand computation, and reflow students through the trainer (load, distil stage, resume, bad inputs, a flow SD3
teacher)."""

import math
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from onestep_pipelines.benchmark.evaluate import euler_sigmas, load_digits_pipeline, trajectory_straightness
from onestep_pipelines.schedulers import ConsistencyScheduler
from onestep_pipelines.training import couplings
from onestep_pipelines.training.config import DistillConfig
from onestep_pipelines.training.draws import Draws
from onestep_pipelines.training.methods.base import FiniteGuard, distance
from onestep_pipelines.training.methods.reflow import U_SHAPE, Reflow, u_shaped_times
from onestep_pipelines.training.trainer import distill

from test_training import student_weights, tiny


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(couplings, "CHUNK", 16)


def test_u_shaped_times_invert_their_distribution():
    a = U_SHAPE
    t = torch.linspace(0, 1, 11)
    cdf = (torch.sinh(a * (t - 0.5)) + math.sinh(a / 2)) / (2 * math.sinh(a / 2))
    torch.testing.assert_close(u_shaped_times(cdf), t, atol=1e-6, rtol=0)
    draws = u_shaped_times(torch.rand(200_000, generator=torch.Generator().manual_seed(0)))
    ends, middle = ((draws < 0.1) | (draws > 0.9)).float().mean(), ((draws > 0.45) & (draws < 0.55)).float().mean()
    assert 0.0 <= float(draws.min()) and float(draws.max()) <= 1.0
    assert float(ends) > 3 * float(middle)  # density cosh(2) / cosh(0) = 3.8 times higher at the ends


def _method(tiny_teacher, tmp_path, **overrides):
    from onestep_pipelines.training.teachers import load_teacher

    teacher = load_teacher(tiny_teacher)
    config = tiny(tiny_teacher, tmp_path / "run", **{"method": "reflow", "coupling_count": 40, "ode_steps": 4, **overrides})
    student = teacher.model.__class__.from_config(teacher.model.config)
    student.load_state_dict(teacher.model.state_dict())
    student.requires_grad_(True)
    scheduler = ConsistencyScheduler.from_config(teacher.convention.config, gamma=0.0)
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, backward=lambda loss: loss.backward(), scaler=None, device=torch.device("cpu"),
                                  process_index=0, num_processes=1, print=lambda *a: None, wait_for_everyone=lambda: None,
                                  autocast=lambda: torch.autocast("cpu", enabled=False))
    method = Reflow(teacher, student, scheduler, config, accelerator=accelerator, guard=FiniteGuard("cpu"))
    method.place(student, torch.optim.AdamW(student.parameters(), lr=1e-3))
    return method


def test_couplings_are_the_teacher_pipelines_euler_samples(tiny_teacher, tmp_path, small_chunks):
    method = _method(tiny_teacher, tmp_path, guidance_scale=2.0)
    data = method.prepare(None)
    assert len(data) == 40 and sorted(os.listdir(tmp_path / "run" / "couplings")) == [couplings.chunk_name(k) for k in range(3)]
    pipe = load_digits_pipeline(tiny_teacher)
    labels = data.conditions["class_labels"][:20]
    images = pipe(class_labels=labels.tolist(), latents=data.noise[:20], sigmas=euler_sigmas(4), guidance_scale=2.0, output_type="latent").images
    torch.testing.assert_close(images, data.samples[:20], atol=1e-5, rtol=1e-5)  # across the first chunk's edge (16)
    batch = data.batch(Draws(0, 0, 0, 8, "cpu"))
    assert batch["images"].shape == batch["noise"].shape == (8, 1, 8, 8) and batch["conditions"]["class_labels"].shape == (8,)


def test_coupling_cache_is_reused_and_refused_when_made_otherwise(tiny_teacher, tmp_path, small_chunks):
    method = _method(tiny_teacher, tmp_path)
    folder = tmp_path / "run" / "couplings"
    first = method.prepare(None)
    os.remove(folder / couplings.chunk_name(1))  # a run stopped before chunk 1 was written
    kept = os.stat(folder / couplings.chunk_name(0)).st_mtime_ns
    second = method.prepare(None)
    assert os.stat(folder / couplings.chunk_name(0)).st_mtime_ns == kept  # reused, not regenerated
    assert torch.equal(first.samples, second.samples) and torch.equal(first.noise, second.noise)  # chunk 1 regenerated exactly
    other = _method(tiny_teacher, tmp_path, ode_steps=8)
    with pytest.raises(ValueError, match="--ode-steps '4', not '8'"):
        other.prepare(None)
    (folder / couplings.chunk_name(2)).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="chunk-00002.safetensors is not a readable safetensors file"):
        method.prepare(None)


@pytest.mark.parametrize("target", ["flow", "distill"])
def test_loss_is_the_velocity_distance_to_the_straight_path(tiny_teacher, tmp_path, target):
    method = _method(tiny_teacher, tmp_path, target=target, loss="l2")
    x, e = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)
    batch = {"images": x, "noise": e, "conditions": {"class_labels": torch.arange(8)}}
    rng = Draws(0, 3, 0, 8, "cpu")
    t = torch.ones(8) if target == "distill" else u_shaped_times(Draws(0, 3, 0, 8, "cpu").uniform())
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    with torch.no_grad():
        v = method.student(z, t * 1000, batch["conditions"]["class_labels"]).sample
    expected = ((v - (e - x)) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(method.train_step(batch, rng)["reflow"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(distance(v, e - x, "l2").mean(), expected)


def test_straightness_of_two_euler_steps_by_hand(tiny_teacher):
    pipe = load_digits_pipeline(tiny_teacher)
    noise = torch.randn((10, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    labels = torch.arange(10)
    model = pipe.transformer
    with torch.no_grad():
        v0 = model(noise, torch.full((10,), 1000.0), labels).sample
        v1 = model(noise - 0.5 * v0, torch.full((10,), 500.0), labels).sample
    # S = sum_i dt |v_i - (v0 + v1) / 2|^2 = |v0 - v1|^2 / 4 per pixel
    expected = float(((v0 - v1) ** 2 / 4).mean())
    torch.testing.assert_close(trajectory_straightness(pipe, num_steps=2, num_samples=10, seed=5), expected, rtol=1e-4, atol=1e-7)
    assert trajectory_straightness(pipe, num_steps=1, num_samples=10) == pytest.approx(0.0, abs=1e-9)  # one step is straight


def test_reflow_students_load_distil_and_resume(tiny_teacher, tmp_path, small_chunks):
    result = distill(tiny(tiny_teacher, tmp_path / "reflow", method="reflow", coupling_count=32, ode_steps=4, evaluate=True, max_train_steps=2))
    assert set(result["straightness"]) == {"teacher", "student"} and all(v >= 0 for v in result["straightness"].values())
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.student.method == "reflow" and pipe.student.recommended_steps == [1, 2, 4, 8]
    assert isinstance(pipe.scheduler, ConsistencyScheduler) and pipe.scheduler.config.gamma == 0.0
    card = open(os.path.join(result["student_dir"], "README.md")).read()
    assert "Flow Straight and Fast" in card and "2209.03003" in card
    # InstaFlow's second stage: the reflowed student is the teacher whose ODE makes new couplings
    distilled = distill(tiny(str(result["student_dir"]), tmp_path / "distil", method="reflow", target="distill", coupling_count=16, ode_steps=2))
    assert DiffusionPipeline.from_pretrained(distilled["student_dir"]).student.method == "reflow"
    assert load_file(str(tmp_path / "distil" / "couplings" / couplings.chunk_name(0)))["sample"].shape == (16, 1, 8, 8)
    # exact resume, the couplings read back
    common = dict(method="reflow", coupling_count=32, ode_steps=4, coupling_dir=str(tmp_path / "shared"))
    distill(tiny(tiny_teacher, tmp_path / "straight", max_train_steps=4, **common))
    distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=2, **common))
    distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=4, resume="latest", **common))
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_reflow_inputs(tiny_teacher, tmp_path, stock_teachers):
    with pytest.raises(ValueError, match="--coupling-count and --coupling-dir apply to --method reflow, not dmd2"):
        DistillConfig(coupling_count=100, coupling_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--coupling-count must be at least 1"):
        DistillConfig(method="reflow", coupling_count=0)
    with pytest.raises(ValueError, match="--target 'jvp' does not apply to --method reflow; choose one of flow, distill"):
        DistillConfig(method="reflow", target="jvp")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--coupling-dir .* is a file"):
        tiny(tiny_teacher, tmp_path / "run", method="reflow", coupling_dir=str(tmp_path / "file")).check_paths()
    folders, data = stock_teachers
    with pytest.raises(ValueError, match="needs a flow teacher"):
        DistillConfig(method="reflow", teacher=folders["sd"], prompts=os.path.join(data, "prompts.txt"), output_dir=str(tmp_path / "sd")).check_paths()


def test_reflow_of_a_tiny_sd3_teacher(stock_teachers, tmp_path, small_chunks):
    folders, data = stock_teachers
    result = distill(DistillConfig(method="reflow", teacher=folders["sd3"], prompts=os.path.join(data, "prompts.txt"), resolution=32, ode_steps=2,
                                   coupling_count=16, output_dir=str(tmp_path / "run"), max_train_steps=2, batch_size=4, evaluate=False,
                                   preview_every=0, lora_rank=4))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.student.method == "reflow" and pipe.student.architecture == "sd3"
    chunk = load_file(str(tmp_path / "run" / "couplings" / couplings.chunk_name(0)))
    assert set(chunk) == {"noise", "sample", "condition.prompt_index"} and int(chunk["condition.prompt_index"].max()) < 2
    assert torch.isfinite(pipe(prompt="a cat", height=32, width=32, num_inference_steps=2, output_type="latent").images).all()
