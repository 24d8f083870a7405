"""The seed families added in issue 33 (progressive distillation, ...): each method's math against a hand-computed
case, a few updates on the shipped digits teacher lower its loss and write a student that loads and samples with the
scheduler it was trained for, and resuming continues exactly."""

import os

import pytest
import torch
from diffusers import DiffusionPipeline

from onestep_pipelines import DigitsPipeline
from onestep_pipelines.schedulers import ConsistencyScheduler
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


def loads_and_samples(result, method, steps, gamma):
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert isinstance(pipe, DigitsPipeline) and isinstance(pipe.scheduler, ConsistencyScheduler)
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
    with pytest.raises(ValueError, match="--phases applies to --method consistency, not progressive"):
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
