"""The embedded digits benchmark: two-time model, DigitsPipeline, FD-digits metric and harness."""

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from onestep_pipelines import ConsistencyScheduler, FlowMapScheduler, TDMScheduler
from onestep_pipelines.benchmark.digits import (
    PIXEL_COMPONENTS,
    DigitsMetric,
    frechet_distance,
    parse_class_labels,
    real_halves,
)
from onestep_pipelines.benchmark.evaluate import EVAL_SEED, load_digits_pipeline, load_digits_teacher, sample_digits, score_digits
from onestep_pipelines.models import DigitsTransformer2DModel
from onestep_pipelines.pipelines import DigitsPipeline


def tiny_model(seed=0, randomize=True):
    torch.manual_seed(seed)
    model = DigitsTransformer2DModel(patch_size=2, hidden_size=32, depth=1, num_heads=2).eval()
    if randomize:  # the zero-initialised output layers would make every comparison trivial
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.startswith("r_embed.mlp.2"):
                    p.normal_(0, 0.2)
    return model


def tiny_pipe(scheduler=None, seed=0):
    pipe = DigitsPipeline(tiny_model(seed), scheduler or FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------ model
def test_r_embedding_is_zero_initialised_and_exact():
    model = tiny_model()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([900.0, 500, 100, 20]), torch.tensor([0, 3, 7, 10])
    plain = model(x, t, y).sample
    with_r = model(x, t, y, r_timestep=torch.tensor([0.0, 250, 50, 0])).sample
    assert plain.abs().max() > 0.1  # a non-trivial model
    torch.testing.assert_close(with_r, plain, rtol=0, atol=0)
    with torch.no_grad():
        model.r_embed.mlp[2].weight.normal_(0, 0.2)
    assert not torch.allclose(model(x, t, y, r_timestep=torch.zeros(4)).sample, plain)


def test_fresh_model_r_layer_is_zero():
    model = DigitsTransformer2DModel()
    assert model.r_embed.mlp[2].weight.abs().sum() == 0 and model.r_embed.mlp[2].bias.abs().sum() == 0


def test_model_save_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = DigitsTransformer2DModel.from_pretrained(tmp_path).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([700.0, 300]), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(x, t, y, r_timestep=0.0).sample, model(x, t, y, r_timestep=0.0).sample)


def test_model_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(2, 1, 16, 16), 500.0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(2, 1, 8, 8), 500.0, torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="divisible"):
        DigitsTransformer2DModel(sample_size=8, patch_size=3)


# --------------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize(
    "scheduler",
    [FlowMatchEulerDiscreteScheduler(), ConsistencyScheduler(time_type="flow", gamma=1.0), TDMScheduler(time_type="flow"), FlowMapScheduler()],
    ids=["flowmatch-euler", "consistency", "tdm", "flowmap"],
)
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_pipeline_with_each_scheduler(scheduler, steps):
    pipe = tiny_pipe(scheduler)
    seen = []
    original = pipe.transformer.forward

    def spy(sample, timestep, class_labels, r_timestep=None, return_dict=True):
        seen.append((float(timestep), None if r_timestep is None else float(r_timestep), len(sample)))
        return original(sample, timestep, class_labels, r_timestep=r_timestep, return_dict=return_dict)

    pipe.transformer.forward = spy
    out = pipe(class_labels=[0, "seven", "3"], num_inference_steps=steps, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert len(seen) == steps and all(n == 6 for *_, n in seen)  # one batched CFG forward per step
    if isinstance(scheduler, FlowMapScheduler):
        assert [r for _, r, _ in seen] == pytest.approx(scheduler.r_timesteps.tolist())
    else:
        assert all(r is None for _, r, _ in seen)


def test_pipeline_outputs_and_callback():
    pipe = tiny_pipe(ConsistencyScheduler(time_type="flow"))
    kwargs = dict(class_labels=[1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pil = pipe(**kwargs).images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "L"
    kwargs["generator"] = torch.Generator().manual_seed(0)
    arr = pipe(**kwargs, output_type="np").images
    assert arr.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(np.asarray(pil[0], dtype=np.float32)[..., None] / 255, arr[0], atol=1 / 255 + 1e-6)
    calls = []

    def callback(p, i, t, tensors):
        calls.append(i)
        return {"latents": tensors["latents"] * 0}

    out = pipe(class_labels=[1], num_inference_steps=3, guidance_scale=1.0, output_type="latent", callback_on_step_end=callback).images
    assert calls == [0, 1, 2] and torch.count_nonzero(out) == 0


def test_pipeline_guidance_one_is_a_single_forward():
    pipe = tiny_pipe()
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    pipe(class_labels=[4, 5], num_inference_steps=3, guidance_scale=1.0, output_type="latent")
    handle.remove()
    assert calls == [2, 2, 2]


def test_pipeline_is_reproducible_and_round_trips(tmp_path):
    pipe = tiny_pipe(ConsistencyScheduler(time_type="flow", gamma=0.5))
    pipe.save_pretrained(tmp_path)
    loaded = load_digits_pipeline(str(tmp_path))
    assert type(loaded.scheduler) is ConsistencyScheduler
    a = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="latent").images
    b = loaded(num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="latent").images
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"class_labels": ["eleven"]}, "unknown digit name"),
        ({"class_labels": [10]}, "not a class"),
        ({"class_labels": [-1]}, "not a class"),
        ({"class_labels": []}, "empty"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": -3}, "num_inference_steps"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"num_images_per_label": 0}, "num_images_per_label"),
        ({"latents": torch.randn(1, 1, 4, 4), "class_labels": [1]}, "latents must have shape"),
    ],
)
def test_pipeline_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipe()(**kwargs)


def test_parse_class_labels():
    assert parse_class_labels(["zero", "Nine", "4", 2]).tolist() == [0, 9, 4, 2]
    assert parse_class_labels(7).tolist() == [7]


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(ValueError, match="not a pipeline folder"):
        load_digits_pipeline(str(tmp_path))
    with pytest.raises(ValueError, match="not a pipeline folder"):
        load_digits_pipeline(str(tmp_path / "missing"))


def test_weights_of_the_wrong_shape_are_refused(tmp_path):
    tiny_pipe().save_pretrained(tmp_path)
    config_path = tmp_path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_size"] = 48
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match"):
        load_digits_pipeline(str(tmp_path))


# ----------------------------------------------------------------------------------------- metric
@pytest.fixture(scope="module")
def metric():
    return DigitsMetric()


def test_frechet_distance_closed_form():
    mu, cov = np.zeros(1), np.eye(1)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-12)
    assert frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0)  # 1 + 1 + 4 - 2*2


def test_fd_of_a_set_with_itself_is_zero_and_rises_with_noise(metric):
    images = metric.images_b
    assert metric.fd(images) == pytest.approx(0.0, abs=1e-4)  # float64 rounding of traces of size ~1e2
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    fds = [metric.fd((images + s * noise).clamp(-1, 1)) for s in (0.1, 0.3, 0.6, 1.0)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    assert fds[0] > 0


def test_real_vs_real_floor_and_accuracy(metric):
    floor = metric.real_vs_real()
    assert 0 < floor.fd < 5 and floor.acc > 0.95
    assert metric.score(torch.rand(100, 1, 8, 8) * 2 - 1, torch.arange(100) % 10).acc < 0.5


def test_second_metric_fd_pixels_and_precision_recall(metric):
    """FD-pixels (a fixed PCA of half A's pixels, no classifier) is zero for half B against itself and rises with
    noise; precision / recall tell a narrow generator (one digit per class, repeated) from a noisy one."""
    (a, ya), (b, yb) = real_halves()
    assert metric.fd_pixels(b) == pytest.approx(0.0, abs=1e-9) and metric.pixel_basis.shape == (64, PIXEL_COMPONENTS)
    floor = metric.real_vs_real()
    assert 0 < floor.fd_pixels < 0.5 and 0.8 < floor.precision <= 1 and 0.8 < floor.recall <= 1
    g = torch.Generator().manual_seed(0)
    noisy = [(b + s * torch.randn(b.shape, generator=g)).clamp(-1, 1) for s in (0.2, 0.5)]
    assert 0.01 < metric.fd_pixels(noisy[0]) < metric.fd_pixels(noisy[1])  # (half B itself: 0)
    narrow = torch.cat([b[yb == k][:1].expand(90, -1, -1, -1) for k in range(10)])  # ten real digits, each 90 times
    precision, recall = metric.precision_recall(narrow)
    assert precision == 1.0 and recall < 0.1  # every sample is real, but it covers nothing else
    score = metric.score(noisy[1], yb)
    assert score.precision < floor.precision and score.fd_pixels == pytest.approx(metric.fd_pixels(noisy[1]))
    row = metric.row(score)
    assert list(row) == ["FD-digits", "FD-pixels", "precision", "recall", "accuracy"]


def test_copy_fraction_flags_training_digits_not_new_ones(metric):
    (a, _), (b, _) = real_halves()
    assert metric.copy_fraction(a[:200]) == 1.0  # the training digits themselves
    assert abs(metric.copy_fraction(b) - 0.01) < 0.005  # unseen real digits: the quantile, by construction
    near = (a[:200] + 0.01 * torch.randn(200, 1, 8, 8)).clamp(-1, 1)  # copies with a little noise
    assert metric.copy_fraction(near) > 0.9
    assert metric.copy_fraction(torch.rand(100, 1, 8, 8) * 2 - 1) == 0.0


def test_nearer_training_fraction_tells_training_digits_from_unseen_ones(metric):
    """``nearer-A``: digits of half A with some noise are nearer half A than half B, digits of half B nearer half B,
    and a sample of both in equal parts scores about one half (as a model that generalises would)."""
    (a, _), (b, _) = real_halves()
    g = torch.Generator().manual_seed(0)
    noisy = lambda x: (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)  # noqa: E731 (well past the copies radius)
    near_a, near_b = noisy(a[:300]), noisy(b[:300])
    assert metric.copy_fraction(near_a) < 0.2 and metric.nearer_training_fraction(near_a) > 0.9
    assert metric.nearer_training_fraction(near_b) < 0.1
    assert metric.nearer_training_fraction(torch.cat([near_a, near_b])) == pytest.approx(0.5, abs=0.06)
    assert metric.memorisation(near_a) == {"copies": metric.copy_fraction(near_a), "nearer-A": metric.nearer_training_fraction(near_a)}


def test_metric_bad_input(metric):
    with pytest.raises(ValueError, match="shape"):
        metric.fd(torch.zeros(10, 1, 16, 16))
    with pytest.raises(ValueError, match="at least 2"):
        metric.fd(torch.zeros(1, 1, 8, 8))


def test_scores_over_several_noise_draws_are_their_mean_and_spread(metric):
    """``draws=3``: each column is the mean of the three draws' scores (seeds EVAL_SEED, +1, +2), the FDs come with
    their sd over the draws; one draw gives the plain row."""
    pipe = tiny_pipe(FlowMapScheduler())
    (one,), grid = score_digits(pipe, [1], metric)
    (three,), grid3 = score_digits(pipe, [1], metric, draws=3)
    per_draw = []
    for k in range(3):
        images, labels = sample_digits(pipe, 1, seed=EVAL_SEED + k)
        per_draw.append(metric.score(images, labels))
    assert set(one) == {"model", "NFE", "FD-digits", "FD-pixels", "precision", "recall", "accuracy", "copies", "nearer-A"}
    assert one["FD-digits"] == pytest.approx(per_draw[0].fd) and torch.equal(grid, grid3)  # draw 0 is the single draw
    assert three["draws"] == 3 and three["FD-digits"] == pytest.approx(np.mean([s.fd for s in per_draw]))
    assert three["FD-pixels sd"] == pytest.approx(np.std([s.fd_pixels for s in per_draw], ddof=1))
    assert three["FD-digits sd"] > 0 and three["accuracy"] == pytest.approx(np.mean([s.acc for s in per_draw]))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="draws must be a positive integer"):
            score_digits(pipe, [1], metric, draws=bad)


def test_real_halves_are_fixed_and_disjoint():
    (a, _), (b, _) = real_halves()
    (a2, _), _ = real_halves()
    assert len(a) + len(b) == 1797 and torch.equal(a, a2)


# ------------------------------------------------------------------------------------- the teacher
def test_shipped_teacher_loads_offline_and_samples():
    pipe = load_digits_teacher()
    assert isinstance(pipe.transformer, DigitsTransformer2DModel)
    images, labels = sample_digits(pipe, 2, num_samples=20)
    assert images.shape == (20, 1, 8, 8) and torch.isfinite(images).all()
    again, _ = sample_digits(pipe, 2, num_samples=20)
    torch.testing.assert_close(images, again)  # fixed seeds: numbers repeat


def test_the_teacher_trains_on_half_a_only(tmp_path, monkeypatch):
    """The teacher's recipe reads half A (the reference half B stays unseen); the shipped teacher was made by it."""
    from onestep_pipelines.benchmark import train_digits

    seen = []
    halves = train_digits.real_halves

    def spy():
        (a, ya), (b, yb) = halves()
        seen.append(len(a))
        return (a, ya), (b + float("nan"), yb)  # a teacher that read half B would learn NaN

    monkeypatch.setattr(train_digits, "real_halves", spy)
    monkeypatch.setattr(train_digits, "load_digits_images", lambda: pytest.fail("the teacher read all the digits"))
    train_digits.train_teacher(str(tmp_path / "teacher"), steps=2, batch_size=4, lr=1e-4, seed=0, guidance_scale=1.0)
    pipe = load_digits_pipeline(str(tmp_path / "teacher"))
    assert seen == [899] and all(torch.isfinite(p).all() for p in pipe.transformer.parameters())


@pytest.mark.slow
def test_quality_harness_writes_table_json_and_pngs(tmp_path, capsys):
    import quality

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    tiny_pipe().save_pretrained(teacher_dir)
    tiny_pipe(FlowMapScheduler(), seed=1).save_pretrained(student_dir)
    out = tmp_path / "results"
    results = quality.run([f"mf={student_dir}"], quick=True, out_dir=str(out), teacher_dir=str(teacher_dir), draws=2)
    saved = json.loads((out / "quality.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved["teacher"]) == {"1", "2", "4", "8", "16", "64"}
    assert set(saved["students"]["mf"]) == {"1", "2", "4"}
    assert set(saved["teacher"]["1"]) == {"fd", "acc", "fd_pixels", "precision", "recall", "copies", "nearer_a", "fd_sd", "fd_pixels_sd"}
    assert saved["real_vs_real_fd"] > 0 and saved["draws"] == 2
    assert (out / "quality_fd_vs_nfe.png").exists() and (out / "grid_mf_nfe1.png").exists()
    printed = capsys.readouterr().out
    assert "real-vs-real floor" in printed and "mf" in printed and "mean of 2 noise draws" in printed and " ± " in printed
    assert quality.main(["--student", str(tmp_path / "nothing"), "--teacher", str(teacher_dir), "--out", str(out)]) == 2


def test_frechet_distance_matches_a_general_matrix_square_root():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b, mu = rng.normal(size=(12, 12)), rng.normal(size=(12, 12)), rng.normal(size=12)
    c1, c2 = a @ a.T, b @ b.T
    reference = (mu**2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(mu, c1, np.zeros(12), c2) == pytest.approx(reference, rel=1e-9)
