"""Reward post-training: the reward plug-in interface (shape / NaN checks, the digits reward classifier, a tiny random
CLIP score), the policy-gradient surrogate against the true gradient, and reward students through the trainer (from a
student folder, DMD-regularised or not, a non-differentiable plug-in, resume, bad inputs, a tiny SD student with the
CLIP reward)."""

import os
import sys
import textwrap

import pytest
import torch
from diffusers import DiffusionPipeline

from onestep_pipelines.benchmark.digits import CLASSIFIER_DIR, REWARD_CLASSIFIER_DIR, DigitsClassifier, DigitsRewardClassifier, real_halves
from onestep_pipelines.schedulers import ConsistencyScheduler
from onestep_pipelines.testing import tiny_clip_folder
from onestep_pipelines.training.config import DistillConfig
from onestep_pipelines.training.methods import TrainingDiverged
from onestep_pipelines.training.methods.reward import antithetic_gradient
from onestep_pipelines.training.rewards import ClipScore, DigitsClassReward, checked_scores, load_reward
from onestep_pipelines.training.trainer import distill

from test_training import student_weights, tiny


def test_reward_classifier_is_not_the_fd_classifier_and_scores_log_probabilities():
    reward = DigitsClassReward()
    assert isinstance(reward.model, DigitsRewardClassifier) and not isinstance(reward.model, DigitsClassifier)
    fd = DigitsClassifier.from_pretrained(CLASSIFIER_DIR)
    assert not set(fd.state_dict()) & set(reward.model.state_dict())  # other layers, other weights
    _, (images, labels) = real_halves()  # half B: digits the reward classifier never saw
    with torch.no_grad():
        scores = reward(images, {"class_labels": labels})
        logits = DigitsRewardClassifier.from_pretrained(REWARD_CLASSIFIER_DIR)(images)
    torch.testing.assert_close(scores, logits.log_softmax(1)[torch.arange(len(labels)), labels])
    assert float((logits.argmax(1) == labels).float().mean()) > 0.9 and bool((scores <= 0).all())
    x = images[:4].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward(x, {"class_labels": labels[:4]}).sum(), x)
    assert grad.abs().sum() > 0


def test_checked_scores_name_the_problem():
    images = torch.zeros(4, 1, 8, 8)
    assert checked_scores(torch.arange(4), images, "r").dtype == torch.float32
    with pytest.raises(ValueError, match=r"--reward r returned scores of shape \(4, 2\); it must return one score per image, shape \(4,\)"):
        checked_scores(torch.zeros(4, 2), images, "r")
    with pytest.raises(ValueError, match="--reward r returned list; it must return a tensor of 4 scores"):
        checked_scores([0.0] * 4, images, "r")


def test_antithetic_surrogate_estimates_the_reward_gradient():
    c = torch.randn(1, 1, 8, 8)
    reward = lambda y: -((y - c) ** 2).sum(dim=(1, 2, 3))  # noqa: E731
    x = torch.randn(1, 1, 8, 8)
    e = torch.randn(40_000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    draws = antithetic_gradient(reward, x.expand_as(e), e, 0.05)
    error = draws.mean(0, keepdim=True) - (-2 * (x - c))  # E[(-2 (x - c) . e) e] = -2 (x - c): unbiased
    standard_error = draws.std(0, keepdim=True) / len(e) ** 0.5
    assert bool((error.abs() < 5 * standard_error).all())
    assert float(standard_error.max()) < 0.2  # and the check is not vacuous


def test_tiny_clip_score_is_differentiable(tmp_path):
    reward = load_reward(f"clip:{tiny_clip_folder(str(tmp_path / 'clip'))}")
    assert isinstance(reward, ClipScore)
    images = torch.rand(2, 3, 16, 16, requires_grad=True) * 2 - 1
    scores = reward(images, {"prompts": ["a cat", "a dog"]})
    assert scores.shape == (2,) and bool((scores.abs() <= 100).all())
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="the CLIP reward needs prompts"):
        reward(images, {"class_labels": torch.zeros(2, dtype=torch.long)})


PLUGINS = '''
import numpy as np
import torch

def darkness(images, conditions):  # not differentiable: numpy
    return torch.from_numpy(-np.asarray(images.detach().cpu().numpy()).mean(axis=(1, 2, 3)))

def wrong_shape(images, conditions):
    return images.mean(dim=(2, 3))[:, :1].expand(-1, 2)

def not_finite(images, conditions):
    return images.mean(dim=(1, 2, 3)) * float("nan")
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(PLUGINS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


@pytest.fixture(scope="module")
def dmd2_student(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("dmd2")
    return distill(tiny(tiny_teacher, out / "run", num_steps=2))["student_dir"]


def test_reward_students_from_a_student_folder(tiny_teacher, dmd2_student, tmp_path, plugins):
    common = dict(method="reward", student=dmd2_student, num_steps=2)
    result = distill(tiny(tiny_teacher, tmp_path / "dmd", **common))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.student.method == "reward" and pipe.student.num_inference_steps == 2
    assert isinstance(pipe.scheduler, ConsistencyScheduler) and pipe.scheduler.config.gamma == 1.0  # the student's own sampler
    assert "Diff-Instruct*" in open(os.path.join(result["student_dir"], "README.md")).read()
    assert os.path.isfile(os.path.join(tmp_path / "dmd", "checkpoints", "step-2", "fake.safetensors"))
    # no regulariser (no fake score), and a non-differentiable plug-in through the surrogate
    hacked = distill(tiny(tiny_teacher, tmp_path / "none", regularizer="none", reward=f"{plugins}:darkness", **common))
    assert not os.path.isfile(os.path.join(tmp_path / "none", "checkpoints", "step-2", "fake.safetensors"))
    before, after = student_weights(os.path.dirname(dmd2_student)), student_weights(tmp_path / "none")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert hacked["steps"] == 3
    # exact resume
    distill(tiny(tiny_teacher, tmp_path / "straight", max_train_steps=4, **common))
    distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=2, **common))
    distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=4, resume="latest", **common))
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_reward_plugins_and_options(tiny_teacher, dmd2_student, tmp_path, plugins):
    common = dict(method="reward", student=dmd2_student, num_steps=2)
    with pytest.raises(ValueError, match=r"returned scores of shape \(8, 2\); it must return one score per image, shape \(8,\)"):
        distill(tiny(tiny_teacher, tmp_path / "shape", reward=f"{plugins}:wrong_shape", **common))
    with pytest.raises(TrainingDiverged, match=f"the reward of --reward {plugins}:not_finite is not finite; the update was not applied"):
        distill(tiny(tiny_teacher, tmp_path / "nan", reward=f"{plugins}:not_finite", **common))
    with pytest.raises(ValueError, match="cannot import nothing_here from my_rewards"):
        distill(tiny(tiny_teacher, tmp_path / "import", reward=f"{plugins}:nothing_here", **common))
    with pytest.raises(ValueError, match="pass --num-steps 2"):
        distill(tiny(tiny_teacher, tmp_path / "steps", method="reward", student=dmd2_student))
    with pytest.raises(ValueError, match="--method reward post-trains a student: pass --student FOLDER"):
        DistillConfig(method="reward")
    with pytest.raises(ValueError, match="--reward-weight applies to --method reward, not dmd2"):
        DistillConfig(reward_weight=2.0)
    with pytest.raises(ValueError, match="--reward 'aesthetic' is not one of: digits, clip:FOLDER, MODULE:NAME"):
        DistillConfig(method="reward", student=dmd2_student, reward="aesthetic")
    with pytest.raises(ValueError, match="is not a pipeline folder"):
        tiny(tiny_teacher, tmp_path / "x", method="reward", student=str(tmp_path)).check_paths()
    flowmap = distill(tiny(tiny_teacher, tmp_path / "flowmap", method="flowmap", max_train_steps=1))["student_dir"]
    with pytest.raises(ValueError, match="samples with FlowMapScheduler"):
        distill(tiny(tiny_teacher, tmp_path / "fm", method="reward", student=flowmap))


def test_clip_reward_on_a_tiny_sd_student(stock_teachers, tmp_path):
    folders, data = stock_teachers
    prompts = os.path.join(data, "prompts.txt")
    common = dict(teacher=folders["sd"], prompts=prompts, resolution=32, max_train_steps=2, batch_size=2, evaluate=False, preview_every=0)
    student = distill(DistillConfig(output_dir=str(tmp_path / "dmd2"), lora_rank=4, **common))["student_dir"]
    clip = tiny_clip_folder(str(tmp_path / "clip"))
    result = distill(DistillConfig(method="reward", student=student, reward=f"clip:{clip}", output_dir=str(tmp_path / "reward"), lora_rank=4,
                                   fake_lora_rank=4, **common))
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert pipe.student.method == "reward" and pipe.student.architecture == "sd"
    assert torch.isfinite(pipe(prompt="a cat", height=32, width=32, num_inference_steps=1, output_type="latent").images).all()
