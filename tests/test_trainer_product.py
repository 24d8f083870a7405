"""The trainer as a user meets it: a plain install runs the main job, bad options are refused before anything heavy
loads, nothing printed is noise, checkpoints hold no pickle, summaries and model cards tell the truth, and the config
file, validation reports and the evaluate command work."""

import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from onestep_pipelines.training.cli import main
from onestep_pipelines.training.config import DistillConfig, applies, read_config_file
from onestep_pipelines.training.methods import METHODS
from onestep_pipelines.training.trainer import distill

from test_training import tiny

BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # not installed\n"


def run_python(code: str, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # what a user sees: transformers' default verbosity
    env.pop("DIFFUSERS_VERBOSITY", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def test_digits_ship_with_the_package_and_equal_scikit_learns():
    from onestep_pipelines.benchmark.digits import load_digits_images

    images, labels = load_digits_images()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,) and images.min() == -1 and images.max() == 1
    sklearn = pytest.importorskip("sklearn.datasets")
    data = sklearn.load_digits()
    np.testing.assert_array_equal(images.squeeze(1).numpy(), data.images.astype(np.float32) / 8 - 1)
    np.testing.assert_array_equal(labels.numpy(), data.target)


def test_main_job_runs_without_the_optional_packages_and_prints_no_noise(tiny_teacher, tmp_path):
    """A plain install has no scikit-learn, matplotlib, tensorboard or torchvision: the job runs, scores and prints
    no warning about any of them."""
    out = tmp_path / "run"
    code = BLOCK.format(names=["sklearn", "matplotlib", "tensorboard", "tensorboardX", "torchvision"]) + (
        "from onestep_pipelines.training.cli import main\n"
        f"code = main(['distill', '--teacher', {tiny_teacher!r}, '--output-dir', {str(out)!r}, '--max-train-steps', '2', '--batch-size', '8'])\n"
        "assert 'sklearn' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "sys.exit(code)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FD-digits" in result.stdout and "student (dmd2)" in result.stdout
    printed = result.stdout + result.stderr
    for noise in ("torchvision", "Warning", "warning", "deprecated"):
        assert noise not in printed, printed[-3000:]


def test_text_to_image_teacher_prints_no_torchvision_notice(tmp_path):
    """transformers' 'requires torchvision' notice (diffusers' SD pipelines import image processors for the safety
    checker) is noise to a trainer user; the CLI drops that one message."""
    from onestep_pipelines.testing import tiny_pipeline

    teacher, prompts = tmp_path / "sd", tmp_path / "prompts.txt"
    tiny_pipeline("sd").save_pretrained(teacher)
    prompts.write_text("a cat\n")
    code = BLOCK.format(names=["torchvision"]) + (
        "from onestep_pipelines.training.cli import main\n"
        f"sys.exit(main(['distill', '--teacher', {str(teacher)!r}, '--prompts', {str(prompts)!r}, '--resolution', '32',"
        f" '--output-dir', {str(tmp_path / 'run')!r}, '--max-train-steps', '1', '--batch-size', '1', '--preview-every', '0']))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torchvision" not in result.stdout + result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("argv, message", [
    (["--help"], None),
    (["distill", "--help"], None),
    (["distill", "--output-dir", "{file}"], "--output-dir {file} is a file"),
    (["distill", "--num-steps", "9"], "--num-steps must be 1 to 4 for --method dmd2, got 9"),
    (["distill", "--method", "magic"], "invalid choice: 'magic'"),
    (["distill", "--lr-scheduler", "exponential"], "invalid choice: 'exponential'"),
    (["distill", "--lr-warmup-steps", "10"], "--lr-warmup-steps needs an --lr-scheduler with a warm-up (constant has none: use constant_with_warmup), got 10"),
    (["distill", "--lr-scheduler", "cosine", "--lr-warmup-steps", "9", "--max-train-steps", "9"], "--lr-warmup-steps must lie in [0, --max-train-steps = 9), got 9"),
    (["distill", "--lr-scheduler", "piecewise_constant"], "--lr-scheduler needs --lr-step-rules (e.g. 1:3000,0.2), got 'piecewise_constant'"),
    (["distill", "--lr-scheduler", "piecewise_constant", "--lr-step-rules", "1:x,0.2"], "--lr-step-rules '1:x,0.2': write multiplier:update pairs"),
    (["distill", "--lr-step-rules", "1:3000,0.2"], "--lr-step-rules applies to --lr-scheduler piecewise_constant, not constant"),
    (["distill", "--config", "{missing}"], "--config {missing}: no such file"),
    (["distill", "--prompts", "{missing}"], "--prompts {missing}: no such file"),
    (["distill", "--teacher", "{file}"], "--teacher {file} is not a diffusers pipeline folder"),
    (["distill", "--resume", "latest", "--output-dir", "{empty}"], "holds no run to continue"),
    (["evaluate", "{missing}"], "no such folder"),
    (["distill", "--device", "cpu", "--mixed-precision", "fp16"], "--mixed-precision fp16 needs a GPU, and --device cpu runs on the CPU"),
    (["distill", "--push-to-hub", "me/x/y"], "--push-to-hub 'me/x/y' is not a Hub repo id"),
    (["distill", "--learning_rate", "1e-3"], "unrecognized argument --learning_rate; did you mean --learning-rate?"),
    (["distill", "--config", "{bad_yaml}"], "line 2, column 7: not valid YAML"),
])
def test_help_and_bad_options_answer_before_torch_loads(tmp_path, argv, message):
    paths = {"file": str(tmp_path / "afile"), "missing": str(tmp_path / "missing.yaml"), "empty": str(tmp_path / "empty"), "bad_yaml": str(tmp_path / "bad.yaml")}
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.yaml").write_text("method: dmd2\n  seed: 1\n")
    argv = [a.format(**paths) for a in argv]
    code = (
        "import sys\nfrom onestep_pipelines.training.cli import main\n"
        f"try:\n    code = main({argv!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\nsys.exit(code)\n"
    )
    result = run_python(code, cwd=str(tmp_path))
    assert "HEAVY []" in result.stderr, result.stderr[-2000:]
    if message is None:
        assert result.returncode == 0 and "usage: onestep-train" in result.stdout
    else:
        assert result.returncode == 2 and message.format(**paths) in result.stderr


def test_help_lists_every_registered_method(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, spec in METHODS.items():
        assert f"{name}: {' '.join(spec.summary.split())}" in text


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


@pytest.mark.parametrize("overrides", [{"gan_weight": 0.1}, {"method": "consistency", "num_steps": 2, "lora_rank": 2}])
def test_checkpoints_hold_no_pickle_and_resume_without_unpickling(tiny_teacher, tmp_path, monkeypatch, overrides):
    distill(tiny(tiny_teacher, tmp_path / "straight", max_train_steps=4, **overrides))
    distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=2, **overrides))
    files = _files(tmp_path / "split" / "checkpoints")
    assert files and all(f.endswith((".safetensors", ".json")) for f in files), files
    (tmp_path / "split" / "checkpoints" / "step-2" / "evil.pkl").write_bytes(pickle.dumps({"x": 1}))  # never read

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    result = distill(tiny(tiny_teacher, tmp_path / "split", max_train_steps=4, resume="latest", **overrides))
    monkeypatch.undo()
    from test_training import student_weights

    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the summary reports the whole run and, separately, the resumed part
    assert result["steps"] == 4 and result["this_part"] == {"steps": 2, "seconds": result["parts"][1]["seconds"], "resumed_from": 2}
    assert [(p["from"], p["to"]) for p in result["parts"]] == [(0, 2), (2, 4)]
    assert result["seconds"] == pytest.approx(sum(p["seconds"] for p in result["parts"]))
    saved = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert saved["steps"] == 4 and saved["this_part"]["steps"] == 2


def test_resume_refuses_a_checkpoint_of_another_run(tiny_teacher, tmp_path):
    distill(tiny(tiny_teacher, tmp_path / "dmd2", max_train_steps=2))
    distill(tiny(tiny_teacher, tmp_path / "other", max_train_steps=2, method="consistency"))
    with pytest.raises(ValueError, match="made with other options"):
        distill(tiny(tiny_teacher, tmp_path / "dmd2", max_train_steps=3, resume=str(tmp_path / "other" / "checkpoints" / "step-2")))


def test_a_run_older_than_an_option_resumes_with_its_default(tiny_teacher, tmp_path):
    """run.json and a checkpoint written before --gan-weight existed: the option counts as its default (0) in both
    checks, which still compare every other option."""
    out = tmp_path / "run"
    distill(tiny(tiny_teacher, out, max_train_steps=2))
    for path in (out / "run.json", out / "checkpoints" / "step-2" / "trainer_state.json"):
        state = json.loads(path.read_text())
        (state.get("options") or state).pop("gan_weight")
        path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="--seed 0 -> 1"):
        tiny(tiny_teacher, out, max_train_steps=3, seed=1, resume="latest").check_paths(teacher=False)
    assert distill(tiny(tiny_teacher, out, max_train_steps=3, resume="latest"))["this_part"]["resumed_from"] == 2


def test_config_file_with_flags_on_top(tiny_teacher, tmp_path):
    (tmp_path / "run.yaml").write_text(f"teacher: {tiny_teacher}\nmethod: consistency\nnum-steps: 2\nbatch_size: 8\nlearning_rate: 1e-3\n"
                                       "max_train_steps: 2\nevaluate: false\npreview_every: 0\n")
    out = tmp_path / "out"
    assert main(["distill", "--config", str(tmp_path / "run.yaml"), "--num-steps", "4", "--output-dir", str(out)]) == 0
    saved = read_config_file(str(out / "config.yaml"))
    assert saved["method"] == "consistency" and saved["num_steps"] == 4 and saved["learning_rate"] == 1e-3  # the flag won
    full = DistillConfig(**saved).to_dict()  # a valid config: every option of the run, no option of another method
    assert {k: full[k] for k in saved} == saved and set(full) - set(saved) == {k for k in full if not applies(k, "consistency")}
    assert "phases" in saved and "sid_alpha" not in saved and "# options of --method consistency" in (out / "config.yaml").read_text()
    (tmp_path / "run.json").write_text(json.dumps({"teacher": tiny_teacher, "max_train_steps": 1}))
    assert read_config_file(str(tmp_path / "run.json")) == {"teacher": tiny_teacher, "max_train_steps": 1}
    bad = str(tmp_path / "bad.yaml")
    for text, message in (("numsteps: 2\n", "unknown option 'numsteps' (did you mean num_steps?)"), ("num_steps: two\n", "num_steps must be an integer, got 'two'"),
                          ("num_steps: 2.5\n", "must be an integer"), ("- a\n- b\n", "must hold a mapping"),
                          ("method: dmd2\nnum_steps: [\n", f"--config {bad}, line 3, column 1: not valid YAML (expected the node content, but found '<stream end>')."),
                          ("method: dmd2\n  seed: 1\n", f"--config {bad}, line 2, column 7: not valid YAML (mapping values are not allowed here).")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_config_file(bad)
    (tmp_path / "bad.json").write_text('{"seed": 1,\n "method": }')
    with pytest.raises(ValueError, match=re.escape(f"--config {tmp_path / 'bad.json'}, line 2, column 12: not valid JSON (Expecting value).")):
        read_config_file(str(tmp_path / "bad.json"))


def test_validation_reports_estimate_and_evaluate_command(tiny_teacher, tmp_path, capsys):
    result = distill(tiny(tiny_teacher, tmp_path / "run", max_train_steps=6, validation_every=3, log_every=2, method="meanflow"))
    printed = capsys.readouterr().out
    assert "estimate:" in printed and "for the remaining 1 updates" in printed and "peak memory" in printed
    assert "validation at update 3: FD-digits" in printed
    for update in (3, 6):
        report = json.loads((tmp_path / "run" / "validation" / f"step-{update}.json").read_text())
        assert report["update"] == update and [r["NFE"] for r in report["rows"]] == [1, 2, 4, 8]
        assert all(np.isfinite(r["FD-digits"]) and 0 <= r["accuracy"] <= 1 for r in report["rows"])
        assert (tmp_path / "run" / "validation" / f"step-{update}.png").is_file()
    assert main(["evaluate", result["student_dir"], "--steps", "1,2", "--json", str(tmp_path / "scores.json")]) == 0
    table = capsys.readouterr().out
    assert "FD-digits" in table and len(json.loads((tmp_path / "scores.json").read_text())["rows"]) == 2
    assert main(["evaluate", result["student_dir"]]) == 0  # the student's recommended steps: 1, 2, 4, 8
    assert len(capsys.readouterr().out.strip().splitlines()) == 5
    assert main(["evaluate", str(tmp_path), "--steps", "1"]) == 2
    assert "neither a pipeline folder" in capsys.readouterr().err
    assert main(["evaluate", result["student_dir"], "--steps", "0"]) == 2
    capsys.readouterr()
    assert main(["evaluate", result["student_dir"], "--steps", "1", "--draws", "2"]) == 0  # mean ± sd of 2 noise draws
    table = capsys.readouterr().out.splitlines()
    assert " ± " in table[1] and table[-1] == "(each cell: the mean of 2 noise draws)"
    assert main(["evaluate", result["student_dir"], "--draws", "0"]) == 2
    assert "--draws 0: the number of noise draws is a positive integer" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "run"), "--steps", "1"]) == 0  # the run folder, as README says: its student/
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["run", "1"]
    import shutil

    shutil.rmtree(tmp_path / "run" / "student")  # a run that has not ended yet
    assert main(["evaluate", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'run'} is a run folder without a student yet" in capsys.readouterr().err


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def links(card: str) -> list[str]:
    return re.findall(r"\]\(([^)]*)\)", card)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_model_cards_link_what_exists_and_their_snippets_run(tiny_teacher, tmp_path, lora_rank):
    result = distill(tiny(tiny_teacher, tmp_path / "run", max_train_steps=1, lora_rank=lora_rank))
    folder = result.get("lora_dir") or result["student_dir"]
    card = open(os.path.join(folder, "README.md")).read()
    teacher_name = os.path.basename(tiny_teacher)  # a local teacher: named by its folder, never by this machine's path
    assert f"a local teacher, `{teacher_name}`" in card and tiny_teacher not in card
    os.symlink(tiny_teacher, tmp_path / "run" / teacher_name)  # a user who has that teacher folder next to the student
    for target in links(card):
        assert target.startswith("https://") or os.path.isfile(os.path.join(folder, target)), target
    blocks = python_blocks(card)
    assert blocks
    for block in blocks:
        if "import torch" in block:
            assert re.search(r"\btorch\.", block.replace("import torch", "")), "imports torch without using it"
        # the card's repo id is the folder's name: run the snippet next to the folder, as a user who downloaded it
        result = run_python(block, cwd=os.path.dirname(folder))
        assert result.returncode == 0, f"{block}\n{result.stderr[-3000:]}"


def test_an_optimizer_checkpoint_with_other_parameter_groups_is_refused():
    from onestep_pipelines.training import checkpoint

    model = torch.nn.Linear(2, 2)
    tensors, meta = checkpoint.optimizer_files(torch.optim.AdamW(model.parameters()), {"m": model})
    two_groups = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}])
    with pytest.raises(ValueError, match="the checkpoint's optimizer has 1 parameter groups and this run's 2"):
        checkpoint.load_optimizer_files(two_groups, {"m": model}, tensors, meta, "optimizer")


# ------------------------------------------------------------------------------ the Hub: asked before anything loads
@pytest.fixture
def must_not_train(monkeypatch):
    """The command must answer before the trainer (torch, diffusers, the teacher) loads."""
    import onestep_pipelines.training.trainer as trainer

    monkeypatch.setattr(trainer, "distill", lambda *a, **k: pytest.fail("the trainer started"))


def closed_endpoint() -> str:
    """The URL of a local port nothing listens on (a Hub that cannot be reached: connection refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def logged_in(hub, monkeypatch, tmp_path, token="hf_test", known=True, **user):
    """huggingface_hub sees ``token`` (none when None) and no token file; the fake Hub knows it as ``user`` when
    ``known``."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        return
    monkeypatch.setenv("HF_TOKEN", token)
    if known:
        hub.add_token(token, **user)


@pytest.mark.parametrize("repo_id, login, message", [
    ("me/x/y", {}, "--push-to-hub 'me/x/y' is not a Hub repo id: use 'name' or 'user/name'"),
    ("me/x", {"token": None}, "--push-to-hub me/x needs a Hub token with write access: set HF_TOKEN or run `hf auth login`"),
    ("me/x", {"known": False}, "--push-to-hub me/x: the Hub (http://127.0.0.1:"),
    ("me/x", {"role": "read"}, "--push-to-hub me/x: the Hub token is a read token"),
    ("other/x", {"orgs": ("lab",)}, "--push-to-hub other/x: the Hub token is me's, which may write to me, lab, not other"),
])
def test_push_to_hub_that_cannot_upload_is_refused_before_anything_loads(tiny_teacher, tmp_path, hub, monkeypatch, capsys, must_not_train,
                                                                           repo_id, login, message):
    logged_in(hub, monkeypatch, tmp_path, **login)
    assert main(["distill", "--teacher", tiny_teacher, "--output-dir", str(tmp_path / "run"), "--push-to-hub", repo_id]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if login.get("known") is False:
        assert "refuses the token" in err
    assert not (tmp_path / "run").exists() and not hub.repos


def test_push_to_hub_without_network_or_offline_is_refused_in_seconds(tiny_teacher, tmp_path, hub, monkeypatch, capsys, must_not_train):
    import time

    from huggingface_hub import constants

    logged_in(hub, monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "ENDPOINT", closed_endpoint())
    started = time.time()
    assert main(["distill", "--teacher", tiny_teacher, "--output-dir", str(tmp_path / "run"), "--push-to-hub", "me/x"]) == 2
    assert time.time() - started < 5
    err = capsys.readouterr().err
    assert "--push-to-hub me/x: cannot reach the Hub (http://127.0.0.1:" in err and "onestep-train push RUN_DIR --repo-id me/x" in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["distill", "--teacher", tiny_teacher, "--output-dir", str(tmp_path / "run"), "--push-to-hub", "me/x"]) == 2
    assert "--push-to-hub me/x uploads to the Hub, and HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_mixed_precision_fp16_on_the_cpu_is_refused_before_the_teacher_loads(tiny_teacher, tmp_path, monkeypatch):
    import onestep_pipelines.training.trainer as trainer

    monkeypatch.setattr(trainer, "load_teacher", lambda *a, **k: pytest.fail("the teacher loaded"))
    with pytest.raises(ValueError, match=re.escape("--mixed-precision fp16 needs a GPU, and this run is on the CPU: use --mixed-precision bf16 or no.")):
        distill(tiny(tiny_teacher, tmp_path / "auto", mixed_precision="fp16"))  # --device auto on a machine without a GPU
    with pytest.raises(ValueError, match="--mixed-precision fp16 needs a GPU, and --device cpu runs on the CPU"):
        tiny(tiny_teacher, tmp_path / "cpu", mixed_precision="fp16", device="cpu")  # (the CLI answers this before torch loads)


def test_a_failed_upload_keeps_every_output_and_prints_the_command_that_retries_it(tiny_teacher, tmp_path, hub, monkeypatch, capsys):
    """The run ends (student, model card, summary.json, FD table); the upload fails; the printed command uploads it."""
    import shlex

    from onestep_pipelines.testing.fake_hub import HubError

    logged_in(hub, monkeypatch, tmp_path)
    commit = hub._commit
    monkeypatch.setattr(hub, "_commit", lambda *a, **k: (_ for _ in ()).throw(HubError(403, "this token cannot write to me/digits")))
    out = tmp_path / "run"
    argv = ["distill", "--teacher", tiny_teacher, "--output-dir", str(out), "--max-train-steps", "2", "--batch-size", "8", "--push-to-hub", "me/digits"]
    assert main(argv) == 4
    printed = capsys.readouterr()
    assert "FD-digits" in printed.out and "student (dmd2)" in printed.out and "Traceback" not in printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"] and "403" in summary["hub_error"] and (out / "student" / "model_index.json").is_file()
    assert "the upload to me/digits failed" in printed.err and f"every output is kept in {out}" in printed.err
    command = printed.err.strip().splitlines()[-1].strip()
    assert command == summary["push_command"] == f"onestep-train push {shlex.quote(str(out))} --repo-id me/digits"
    monkeypatch.setattr(hub, "_commit", commit)  # the Hub takes it now
    assert main(shlex.split(command)[1:]) == 0
    assert f"uploaded {out / 'student'} to " in capsys.readouterr().out
    assert hub.repos["me/digits"]["model_index.json"] == (out / "student" / "model_index.json").read_bytes()


def test_push_command_uploads_a_run_folder_or_a_student_folder_and_names_what_is_wrong(tiny_teacher, tmp_path, hub, monkeypatch, capsys):
    logged_in(hub, monkeypatch, tmp_path)
    distill(tiny(tiny_teacher, tmp_path / "run", max_train_steps=1, lora_rank=2))
    assert main(["push", str(tmp_path / "run"), "--repo-id", "me/lora"]) == 0  # a LoRA run: its lora/ folder, as --push-to-hub
    assert "pytorch_lora_weights.safetensors" in hub.repos["me/lora"] and "model_index.json" not in hub.repos["me/lora"]
    assert main(["push", str(tmp_path / "run" / "student"), "--repo-id", "me/full"]) == 0
    assert "model_index.json" in hub.repos["me/full"]
    capsys.readouterr()
    assert main(["push", str(tmp_path / "run" / "checkpoints"), "--repo-id", "me/x"]) == 2
    assert "holds neither a saved pipeline" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "run"), "--repo-id", "other/x"]) == 2
    assert "--repo-id other/x: the Hub token is me's, which may write to me, not other" in capsys.readouterr().err


def test_a_hub_teacher_that_cannot_be_had_is_refused_in_seconds(tmp_path, hub, monkeypatch, capsys, must_not_train):
    import time

    from huggingface_hub import constants

    (tmp_path / "prompts.txt").write_text("a cat\n")
    argv = ["distill", "--teacher", "nobody/no-such-teacher", "--prompts", str(tmp_path / "prompts.txt"), "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert f"--teacher nobody/no-such-teacher: no such model on the Hub ({hub.endpoint}); if it is private, log in first" in capsys.readouterr().err
    monkeypatch.setattr(constants, "ENDPOINT", closed_endpoint())
    started = time.time()
    assert main(argv) == 2
    assert time.time() - started < 5
    err = capsys.readouterr().err
    assert "--teacher nobody/no-such-teacher: cannot reach the Hub (http://127.0.0.1:" in err and "the local cache holds no copy" in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(argv) == 2
    assert "--teacher nobody/no-such-teacher: HF_HUB_OFFLINE is set and the Hub cache" in capsys.readouterr().err


def test_a_cached_hub_teacher_loads_from_the_cache_when_the_hub_cannot_be_reached(tiny_teacher, tmp_path, hub, monkeypatch, capsys):
    import time

    from huggingface_hub import HfApi, constants, snapshot_download

    from onestep_pipelines.training import hub_checks, load_teacher

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    HfApi().create_repo("me/teacher")
    HfApi().upload_folder(folder_path=tiny_teacher, repo_id="me/teacher")
    snapshot_download("me/teacher")  # the user's earlier download
    config = DistillConfig(teacher="me/teacher", output_dir=str(tmp_path / "run"))
    assert hub_checks.check_run(config) is False  # the Hub answers: diffusers checks for updates as usual
    monkeypatch.setattr(constants, "ENDPOINT", closed_endpoint())
    started = time.time()
    assert hub_checks.check_run(config) is True
    teacher = load_teacher("me/teacher", local_files_only=True)
    assert time.time() - started < 5 and teacher.architecture == "digits"
    printed = capsys.readouterr().out
    assert "cannot be reached" in printed and "--teacher me/teacher loads from the local cache" in printed


# ------------------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes_exactly(tiny_teacher, tmp_path):
    import shlex
    import signal

    from test_training import student_weights

    out = tmp_path / "run"
    argv = ["distill", "--teacher", tiny_teacher, "--output-dir", str(out), "--max-train-steps", "100000", "--batch-size", "8",
            "--checkpoint-every", "100000", "--preview-every", "0", "--no-evaluate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # (a job started in the background by a non-interactive shell, as CI may be, inherits SIGINT ignored: a terminal's
    # Ctrl-C reaches a trainer started from a terminal, so the child gets the default disposition back)
    proc = subprocess.Popen([sys.executable, "-m", "onestep_pipelines.training.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # training is under way once the estimate (after 5 updates) is out
        if line.startswith("estimate:"):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert "Ctrl-C: stopping after this update and saving a checkpoint" in stdout
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0] >= 5  # (--checkpoint-every 100000: the checkpoint Ctrl-C saved)
    update = saved[0]
    assert f"onestep-train: stopped after update {update} of 100000 (Ctrl-C); saved: {out / 'checkpoints' / f'step-{update}'}" in stderr
    command = shlex.split(stderr.strip().splitlines()[-1])
    assert command[0] == "onestep-train" and command[-2:] == ["--resume", "latest"]
    command[command.index("--max-train-steps") + 1] = str(update + 2)  # the printed command, two updates further
    assert main(command[1:]) == 0
    distill(tiny(tiny_teacher, tmp_path / "straight", max_train_steps=update + 2, checkpoint_every=100000, preview_every=0))
    a, b = student_weights(out), student_weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the stop fell between two updates: the resumed run is exact


@pytest.fixture
def terminal_sigint():
    """SIGINT raising KeyboardInterrupt, as in a terminal (a job a non-interactive shell starts in the background, as
    CI may be, inherits SIGINT ignored, and the trainer leaves an ignored SIGINT alone)."""
    import signal

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, outer)


def test_a_second_ctrl_c_stops_at_once_and_a_launchers_echo_does_not(terminal_sigint):
    import signal
    import time

    from onestep_pipelines.training.stopping import StopRequest, resume_command

    said = []
    with StopRequest(said.append, grace=0.2) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun forwards the terminal's Ctrl-C: the same request
        time.sleep(0.05)
        assert stop.requested and len(said) == 1
        time.sleep(0.2)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert resume_command(["distill", "--config", "a b.yaml", "--output-dir=old", "--resume", "step-3", "--seed", "1"], "new") == \
        "onestep-train distill --config 'a b.yaml' --seed 1 --output-dir new --resume latest"


# ---------------------------------------------------------------------------------- flags and config files
@pytest.mark.parametrize("argv, message", [
    (["distill", "--learning_rate", "1e-3"], "onestep-train distill: error: unrecognized argument --learning_rate; did you mean --learning-rate?"),
    (["distill", "--max-train", "5"], "onestep-train distill: error: unrecognized argument --max-train; did you mean --max-train-steps?"),
    (["distill", "--lr", "1e-3"], "onestep-train distill: error: unrecognized argument --lr; did you mean --lr-scheduler, --lr-warmup-steps or --lr-step-rules?"),
    (["distill", "--seed=1", "--numsteps=2"], "onestep-train distill: error: unrecognized argument --numsteps; did you mean --num-steps?"),
    (["evaluate", "x", "--step", "1"], "onestep-train evaluate: error: unrecognized argument --step; did you mean --steps?"),
])
def test_misspelled_and_abbreviated_flags_get_the_commands_usage_and_a_suggestion(capsys, argv, message):
    """No abbreviations (``--max-train`` is not ``--max-train-steps``): an unknown flag gets its command's usage (one line)
    and the closest flags."""
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"usage: onestep-train {argv[0]} ") and err[1] == message


@pytest.mark.parametrize("argv, lines", [
    (["distill", "--method", "dmd"], ["onestep-train distill: error: argument --method: invalid choice: 'dmd' (choose from " + ", ".join(METHODS) + "); did you mean dmd2?"]),
    (["distill", "--lr-scheduler", "exponential"], ["onestep-train distill: error: argument --lr-scheduler: invalid choice: 'exponential' (choose from "
                                                    "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, piecewise_constant)"]),
    (["distill", "--num-steps", "two"], ["onestep-train distill: error: argument --num-steps: invalid int value: 'two'"]),
    (["distil"], ["usage: onestep-train [-h] {distill,evaluate,cache,push} ...",
                  "onestep-train: error: argument command: invalid choice: 'distil' (choose from 'distill', 'evaluate', 'cache', 'push'); did you mean distill?"]),
])
def test_an_invalid_value_is_answered_on_one_line(capsys, argv, lines):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and capsys.readouterr().err.splitlines() == lines


def test_config_file_rule_a_folder_that_holds_a_run_sends_the_run_to_the_next_free_name(tmp_path, monkeypatch, capsys):
    """--config FILE whose output_dir holds a run (a run's own config.yaml): NAME-2, NAME-3, ... (missing or empty), said
    on the first line; a flag --output-dir or --resume keeps the folder (and its checks)."""
    from onestep_pipelines.training.cli import _config
    from onestep_pipelines.training.config import config_yaml

    monkeypatch.chdir(tmp_path)
    os.makedirs("run")
    (tmp_path / "run" / "run.json").write_text("{}")
    (tmp_path / "run" / "config.yaml").write_text(config_yaml(DistillConfig(output_dir="run", resume="latest", seed=3)))
    os.makedirs("run-2")
    (tmp_path / "run-2" / "notes.txt").write_text("taken")
    os.makedirs("run-3")  # empty: free
    config = _config({"config": "run/config.yaml"})
    assert (config.output_dir, config.seed, config.resume) == ("run-3", 3, "")  # (config.yaml never resumes: the run is repeated)
    assert capsys.readouterr().out.splitlines() == [
        "run folder: run-3 (new: run, the --output-dir of run/config.yaml, holds a run already; --output-dir chooses another)"]
    assert _config({"config": "run/config.yaml", "output_dir": "run"}).output_dir == "run"
    assert _config({"config": "run/config.yaml", "resume": "latest"}).output_dir == "run"
    assert _config({"output_dir": "run"}).output_dir == "run" and not capsys.readouterr().out


@pytest.mark.slow
def test_a_runs_config_yaml_repeats_it_in_a_new_folder_named_on_the_first_line(tiny_teacher, tmp_path, monkeypatch, capsys):
    from test_training import student_weights

    monkeypatch.chdir(tmp_path)
    assert main(["distill", "--output-dir", "run", "--teacher", tiny_teacher, "--max-train-steps", "2", "--batch-size", "8", "--no-evaluate"]) == 0
    capsys.readouterr()
    assert main(["distill", "--config", "run/config.yaml"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "run folder: run-2 (new: run, the --output-dir of run/config.yaml, holds a run already; --output-dir chooses another)"
    a, b = student_weights("run"), student_weights("run-2")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run
    assert main(["distill", "--config", "run/config.yaml", "--output-dir", "run"]) == 2  # a folder named by a flag is never replaced
    assert "--output-dir run holds another run; pass --resume latest" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- CPU threads
def scripted_load(monkeypatch, cores, others):
    """CpuThreads on ``cores`` cores where other processes use ``others[i]`` cores' worth of CPU in the i-th interval
    between measurements (this process using 1 core throughout, which must not count)."""
    from onestep_pipelines.training import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    marks = [(0.0, 0.0, 0.0)]
    for i, used in enumerate(others):
        busy, own, wall = marks[-1]
        marks.append((busy + used + 1.0, own + 1.0, wall + 1.0))
    monkeypatch.setattr(threads.CpuThreads, "_measure", lambda self: marks.pop(0))


def test_auto_cpu_threads_leave_the_cores_other_work_holds_and_follow_the_load(monkeypatch):
    from onestep_pipelines.training.threads import CpuThreads

    scripted_load(monkeypatch, cores=2, others=[0.1, 1.0, 0.25, 0.0, 2.0])
    threads = CpuThreads()
    assert threads.start() == (2, "auto: 2 core(s), 0 busy with other work; follows the load")  # idle at the start
    assert threads.follow(10) == 1  # another process took a core
    assert threads.follow(20) == 2  # it left (a quarter of a core is not busy)
    assert threads.follow(30) is None  # still idle: no change
    assert threads.follow(40) == 1  # two cores of other work: one thread, never none
    assert threads.history == [[0, 2], [10, 1], [20, 2], [40, 1]]
    scripted_load(monkeypatch, cores=4, others=[1.5])
    assert CpuThreads().start() == (2, "auto: 4 core(s), 2 busy with other work; follows the load")


def test_cpu_threads_as_asked_or_as_a_launcher_says_are_fixed(monkeypatch):
    from onestep_pipelines.training.threads import CpuThreads

    scripted_load(monkeypatch, cores=8, others=[])  # (no measurement is taken: _measure would fail)
    fixed = CpuThreads(requested=3)
    assert fixed.start() == (3, "as asked") and fixed.follow(10) is None
    assert CpuThreads(processes=2).start() == (4, "auto: 4 core(s) per process")  # several processes share the cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun sets it per process
    launched = CpuThreads()
    assert launched.start() == (1, "auto: OMP_NUM_THREADS") and launched.follow(10) is None


@pytest.mark.skipif(not os.path.isfile("/proc/stat"), reason="Linux /proc/stat")
def test_cpu_use_is_read_in_seconds_of_this_machines_cores():
    """A 0.3 s busy loop in this process shows in /proc/stat's sum as 0.3 s (units: seconds, our cores summed); the
    other processes' use is what is left, in cores (0 to the number of cores)."""
    import time

    from onestep_pipelines.training.threads import CpuThreads

    threads = CpuThreads()
    threads._mark = start = threads._measure()
    while time.monotonic() < start[2] + 0.3:
        pass
    end = threads._measure()
    threads._mark = start
    own, busy = end[1] - start[1], end[0] - start[0]
    assert own > 0.2 and busy >= own - 0.05  # (clock ticks of 10 ms)
    assert 0 <= threads._others() <= threads.cores + 0.1


def test_the_first_line_says_the_cpu_thread_count_and_the_callers_count_comes_back(tiny_teacher, tmp_path, capsys):
    before = torch.get_num_threads()
    result = distill(tiny(tiny_teacher, tmp_path / "run", max_train_steps=1, cpu_threads=3))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("device: cpu x 1 process(es), 3 CPU thread(s) (as asked); precision: no"), first
    assert result["cpu_threads"] == {"why": "as asked", "changes": [[0, 3]]} and torch.get_num_threads() == before
    with pytest.raises(ValueError, match=re.escape("--cpu-threads must be 0 (auto) or positive, got -1.")):
        tiny(tiny_teacher, tmp_path / "bad", cpu_threads=-1)


def test_help_lists_each_methods_options_apart(capsys):
    """``--help`` groups the method-specific options by the methods they apply to; ``--method M --help`` shows M's."""
    from onestep_pipelines.training.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    full = capsys.readouterr().out
    assert "options of --method sid:\n  --sid-alpha" in full and "options of --method piflow:" in full
    with pytest.raises(SystemExit):
        main(["distill", "--method", "sid", "--help"])
    sid = capsys.readouterr().out
    assert "--sid-alpha" in sid and "--fake-updates" in sid and "--learning-rate" in sid
    assert "--policy-substeps" not in sid and "--coupling-count" not in sid and "options of --method piflow" not in sid
    assert main(["distill", "--method", "dmd2", "--policy-substeps", "4"]) == 2  # still parsed, then refused by name
    assert "--policy-substeps applies to --method piflow, not dmd2" in capsys.readouterr().err
