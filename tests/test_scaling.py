"""Scaling out: DDP and FSDP2 runs on two CPU processes (gloo) under the shipped accelerate configs end with the
student of one process with the same global batch, checkpoints resume on another number of processes, and what
the trainer cannot run is refused before anything loads."""

import json
import os
import shutil
import types

import pytest
import torch
import yaml
from safetensors.torch import load_file

from onestep_pipelines.testing.launch import accelerate_env, run_cpu_workers
from onestep_pipelines.training import sharding
from onestep_pipelines.training.cli import main
from onestep_pipelines.training.trainer import _resume_point, distill

from test_training import tiny

pytestmark = pytest.mark.slow  # every test here starts several processes

CONFIGS = os.path.dirname(sharding.FSDP_CONFIG)
FSDP = sharding.FSDP_CONFIG
TOLERANCE = 1e-5  # gradients averaged over processes differ from one process's mean only in float rounding


def argv(teacher, out, batch, steps=4, *extra):
    return ["distill", "--teacher", teacher, "--output-dir", str(out), "--max-train-steps", str(steps), "--batch-size", str(batch),
            "--checkpoint-every", "2", "--preview-every", "2", "--no-evaluate", *extra]


def workers(n, arguments, config=None) -> dict:
    """Run ``onestep-train`` on ``n`` CPU processes; the run's summary."""
    result = run_cpu_workers(n, arguments, config)
    assert result.returncode == 0, result.stderr[-3000:]
    out = arguments[arguments.index("--output-dir") + 1]
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "student", "transformer", "diffusion_pytorch_model.safetensors"))


def assert_same_student(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= TOLERANCE


def until_update_2(src, dst):
    """A copy of a finished run folder as it was after its checkpoint at update 2 (a stopped run)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step-4")
    shutil.rmtree(dst / "student")
    os.remove(dst / "summary.json")


@pytest.fixture(scope="module")
def one_process(tiny_teacher, tmp_path_factory):
    """The reference: one process, batch 8, 4 updates (DMD2, the default method)."""
    out = tmp_path_factory.mktemp("one") / "run"
    distill(tiny(tiny_teacher, out, max_train_steps=4, batch_size=8, checkpoint_every=2, preview_every=2))
    return out


@pytest.mark.parametrize("config", ["ddp", "fsdp"])
def test_two_processes_end_with_the_one_process_student(tiny_teacher, one_process, tmp_path, config):
    summary = workers(2, argv(tiny_teacher, tmp_path / config, 4), FSDP if config == "fsdp" else None)
    assert summary["engine"] == config and summary["processes"] == 2 and summary["global_batch_size"] == 8
    first, second = summary["rank_checksums"]
    assert first == second
    assert_same_student(one_process, tmp_path / config)
    assert (tmp_path / config / "previews" / "step-4.png").is_file()  # sampled by both processes, written by one


def test_fsdp_checkpoints_resume_on_another_number_of_processes(tiny_teacher, one_process, tmp_path):
    """2 -> 1 and 1 -> 2 processes: the resumed runs end where the uninterrupted one does."""
    workers(2, argv(tiny_teacher, tmp_path / "two", 4), FSDP)
    until_update_2(tmp_path / "two", tmp_path / "two_then_one")
    resumed = distill(tiny(tiny_teacher, tmp_path / "two_then_one", max_train_steps=4, batch_size=8, checkpoint_every=2,
                           preview_every=2, resume="latest"))
    assert resumed["this_part"]["resumed_from"] == 2 and [p["processes"] for p in resumed["parts"]] == [2, 1]
    assert_same_student(one_process, tmp_path / "two_then_one")

    until_update_2(one_process, tmp_path / "one_then_two")
    summary = workers(2, argv(tiny_teacher, tmp_path / "one_then_two", 4, 4, "--resume", "latest"), FSDP)
    assert [p["processes"] for p in summary["parts"]] == [1, 2]
    assert_same_student(one_process, tmp_path / "one_then_two")


def test_fsdp_lora_student_with_a_target_network(tiny_teacher, tmp_path):
    """Consistency distillation of a LoRA student (frozen base sharded, adapters trained, EMA target sharded like the
    student): the same student as one process, exported as a normal LoRA folder."""
    extra = ("--method", "consistency", "--lora-rank", "4")
    distill(tiny(tiny_teacher, tmp_path / "one", max_train_steps=4, batch_size=8, checkpoint_every=2, preview_every=2,
                 method="consistency", lora_rank=4))
    summary = workers(2, argv(tiny_teacher, tmp_path / "fsdp", 4, 4, *extra), FSDP)
    assert summary["engine"] == "fsdp"
    assert_same_student(tmp_path / "one", tmp_path / "fsdp")
    assert (tmp_path / "fsdp" / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("extra", [("--method", "phased-dmd", "--num-steps", "2"), ("--method", "progressive", "--num-steps", "1", "--ode-steps", "4")])
def test_fsdp_runs_the_methods_with_several_fake_scores_or_a_stage_teacher(tiny_teacher, tmp_path, extra):
    """Phased DMD's fake score per phase (sharded on the student's blocks) and progressive distillation's stage teacher
    (a target network, copied from the student at the stage boundary, update 2 of 4): the one-process student."""
    options = dict(zip([f[2:].replace("-", "_") for f in extra[::2]], extra[1::2]))
    options = {k: (v if k == "method" else int(v)) for k, v in options.items()}
    distill(tiny(tiny_teacher, tmp_path / "one", max_train_steps=4, batch_size=8, checkpoint_every=2, preview_every=2, **options))
    summary = workers(2, argv(tiny_teacher, tmp_path / "fsdp", 4, 4, *extra), FSDP)
    assert summary["engine"] == "fsdp"
    assert_same_student(tmp_path / "one", tmp_path / "fsdp")


def test_fsdp_in_bf16_with_gan_head_validation_and_evaluation(tiny_teacher, tmp_path):
    """bf16 autocast over float32 shards (times stay float32), the GAN head sharded with the fake score, a validation
    report sampled by both processes, and the final FD table."""
    out = tmp_path / "bf16"
    result = run_cpu_workers(2, argv(tiny_teacher, out, 4, 4, "--mixed-precision", "bf16", "--gan-weight", "0.1",
                                     "--validation-every", "4", "--evaluate"), FSDP, ACCELERATE_MIXED_PRECISION="bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision: bf16" in result.stdout and "student (dmd2)" in result.stdout
    assert (out / "validation" / "step-4.json").is_file() and (out / "student" / "model_index.json").is_file()


def test_shipped_configs_give_the_launch_environment_they_say():
    for name in ("ddp.yaml", "fsdp.yaml", "fsdp_lora.yaml"):
        path = os.path.join(CONFIGS, name)
        text = open(path).read()
        assert "accelerate launch --config_file" in text  # each config says how to run it
        env = accelerate_env(path, 2)
        config = yaml.safe_load(text)
        assert env["ACCELERATE_MIXED_PRECISION"] == config["mixed_precision"]
        if config["distributed_type"] == "FSDP":
            assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        else:
            assert "ACCELERATE_USE_FSDP" not in env


@pytest.mark.parametrize("variables, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported by onestep-train"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1 is not supported"),
])
def test_engines_the_trainer_does_not_run_are_refused_before_loading(tiny_teacher, tmp_path, monkeypatch, capsys, variables, message):
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    assert main(argv(tiny_teacher, tmp_path / "run", 8)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was written


def test_wrap_policy_naming_a_block_the_model_lacks(tiny_teacher, tmp_path):
    from onestep_pipelines import DigitsTransformer2DModel

    result = run_cpu_workers(2, argv(tiny_teacher, tmp_path / "run", 4), FSDP, FSDP_TRANSFORMER_CLS_TO_WRAP="JointTransformerBlock")
    assert result.returncode != 0
    assert "onestep-train: error: fsdp_transformer_layer_cls_to_wrap names ['JointTransformerBlock']" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training

    model = DigitsTransformer2DModel(patch_size=2, hidden_size=32, depth=1, num_heads=2)
    plugin = types.SimpleNamespace(transformer_cls_names_to_wrap=None)
    assert sharding.wrap_class_names(model, plugin) == ["DigitsTransformerBlock"]
    plugin.transformer_cls_names_to_wrap = ["JointTransformerBlock"]
    with pytest.raises(ValueError, match=r"names \['JointTransformerBlock'\], which DigitsTransformer2DModel does not have; its blocks are \['DigitsTransformerBlock'\]"):
        sharding.wrap_class_names(model, plugin)


def test_resume_with_a_global_batch_the_processes_cannot_share(tiny_teacher, one_process):
    config = tiny(tiny_teacher, one_process, max_train_steps=4, batch_size=8, resume="latest")
    path, saved = _resume_point(tiny(tiny_teacher, one_process, batch_size=4, resume="latest"), 2)  # 4 x 2 = 8: fine
    assert saved["update"] == 4 and path.endswith("step-4")
    with pytest.raises(ValueError, match="8 samples do not split evenly over 3 processes"):
        _resume_point(config, 3)
    with pytest.raises(ValueError, match="pass --batch-size 2"):
        _resume_point(config, 4)
