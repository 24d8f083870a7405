"""What a student's user meets besides its samples: the pipelines' real call signatures, the teacher's settings kept
(no safety-checker warning on every load), no torchvision notice when an SD pipeline loads, a base model that means
something off the training machine, and install instructions that work while the package is not on PyPI."""

import inspect
import json
import logging
import os
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onestep_pipelines import ConsistencyScheduler, DigitsPipeline, DigitsTransformer2DModel
from onestep_pipelines.pipelines import student_pipeline
from onestep_pipelines.pipelines.loading import INSTALL_COMMAND, REPOSITORY_URL, shim_source
from onestep_pipelines.students import base_model_name
from onestep_pipelines.testing import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
STOCK_ARCHS = ("sd", "sdxl", "sd3", "flux")


# ------------------------------------------------------------------------------------------ call signatures
@pytest.mark.parametrize("arch", [*STOCK_ARCHS, "digits"])
def test_pipelines_show_the_wrapped_calls_real_signature_and_docstring(arch):
    from onestep_pipelines import pipelines
    from onestep_pipelines.pipelines.pipeline_digits import _DigitsGeneration

    cls = getattr(pipelines, pipelines.PIPELINE_NAMES[arch])
    stock = _DigitsGeneration if arch == "digits" else type(tiny_pipeline(arch))
    signature = inspect.signature(cls.__call__)
    assert signature == inspect.signature(stock.__call__)
    names = list(signature.parameters)
    assert names[1] == ("class_labels" if arch == "digits" else "prompt") and "num_inference_steps" in names
    assert not [p for p in signature.parameters.values() if p.kind is p.VAR_POSITIONAL]  # not the mixin's (*args, **kwargs)
    text = pydoc.render_doc(cls.__call__, renderer=pydoc.plaintext)
    assert "num_inference_steps" in text and "default to the values the student records" in text
    assert cls.__call__.__qualname__ == f"{cls.__name__}.__call__"


def test_a_bound_student_call_shows_the_signature_and_still_applies_the_students_defaults():
    from onestep_pipelines import StudentMetadata

    teacher = tiny_pipeline("sd")
    pipe = student_pipeline(teacher, teacher.unet, ConsistencyScheduler.from_config(teacher.scheduler.config))
    assert list(inspect.signature(pipe.__call__).parameters)[:2] == ["prompt", "height"]
    pipe.set_student(StudentMetadata.from_scheduler(pipe.scheduler, method="dmd2", architecture="sd", num_inference_steps=2))
    steps = []
    pipe(prompt="a cat", height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0),
         callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert steps == [0, 1]  # the student's 2 steps, not the stock default of 50


# ------------------------------------------------------------------------------------------ teacher settings
class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_log():
    handler = _Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def _stock_teacher(arch, **options):
    pipe = tiny_pipeline(arch)
    return type(pipe)(**pipe.components, **options)


def test_a_student_keeps_the_teachers_requires_safety_checker_and_loads_without_the_warning(tmp_path, diffusers_log):
    from diffusers import DiffusionPipeline

    from onestep_pipelines import FewStepStableDiffusionPipeline

    teacher = tiny_pipeline("sd")  # no safety checker, requires_safety_checker=False
    assert teacher.config.requires_safety_checker is False and teacher.safety_checker is None
    diffusers_log.clear()
    student = student_pipeline(teacher, teacher.unet, ConsistencyScheduler.from_config(teacher.scheduler.config))
    assert type(student) is FewStepStableDiffusionPipeline and student.config.requires_safety_checker is False
    student.save_pretrained(tmp_path / "student")
    assert json.loads((tmp_path / "student" / "model_index.json").read_text())["requires_safety_checker"] is False
    FewStepStableDiffusionPipeline.from_pretrained(tmp_path / "student")
    DiffusionPipeline.from_pretrained(tmp_path / "student")
    assert not [m for m in diffusers_log if "safety checker" in m], diffusers_log

    strict = _stock_teacher("sd", requires_safety_checker=True)  # the teacher's own value, whatever it is
    student = student_pipeline(strict, strict.unet, ConsistencyScheduler.from_config(strict.scheduler.config))
    assert student.config.requires_safety_checker is True


def test_a_student_keeps_sdxl_settings_but_not_the_digits_guidance():
    teacher = _stock_teacher("sdxl", force_zeros_for_empty_prompt=False)
    student = student_pipeline(teacher, teacher.unet, ConsistencyScheduler.from_config(teacher.scheduler.config))
    assert student.config.force_zeros_for_empty_prompt is False  # the class default is True
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = DigitsTransformer2DModel(patch_size=2, hidden_size=32, depth=1, num_heads=2)
    digits = DigitsPipeline(model, FlowMatchEulerDiscreteScheduler(), default_guidance_scale=3.0)
    student = student_pipeline(digits, model, ConsistencyScheduler.from_config(digits.scheduler.config))
    assert type(student) is DigitsPipeline and student.transformer is model
    assert student.config.default_guidance_scale == 1.0  # guidance is the student's (its metadata), not the teacher's


# ------------------------------------------------------------------------------------------ torchvision notice
def _python(code: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # what a user sees: the libraries' default verbosity
    env.pop("DIFFUSERS_VERBOSITY", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


NO_TORCHVISION = "import sys\nsys.modules['torchvision'] = None  # not installed\n"


@pytest.mark.slow  # fresh interpreters
def test_loading_sd_pipelines_prints_no_torchvision_notice(tmp_path):
    """transformers 5 without torchvision says "`CLIPImageProcessor` requires torchvision (not installed); falling
    back ..." (and the same for Siglip) when diffusers' SD modules import those names; the package binds the PIL
    classes first, so loading a student, a stock SD folder or a tiny SD pipeline prints neither line (nothing is
    filtered: the names are the classes transformers would fall back to)."""
    teacher = tiny_pipeline("sd")
    teacher.save_pretrained(tmp_path / "teacher")
    student_pipeline(teacher, teacher.unet, ConsistencyScheduler.from_config(teacher.scheduler.config)).save_pretrained(tmp_path / "student")
    checks = "import transformers\nassert transformers.CLIPImageProcessor is transformers.CLIPImageProcessorPil\nprint('OK')\n"
    codes = {
        "student": f"import onestep_pipelines\nfrom diffusers import DiffusionPipeline\nDiffusionPipeline.from_pretrained({str(tmp_path / 'student')!r})\n",
        "stock folder": f"import onestep_pipelines\nfrom diffusers import DiffusionPipeline\nDiffusionPipeline.from_pretrained({str(tmp_path / 'teacher')!r})\n",
        "student class": f"from onestep_pipelines import FewStepStableDiffusionPipeline as P\nP.from_pretrained({str(tmp_path / 'student')!r})\n",
        "tiny": "from onestep_pipelines.testing import tiny_pipeline\nfor arch in ('sd', 'sdxl', 'sd3', 'flux'):\n    tiny_pipeline(arch)\n",
    }
    for what, code in codes.items():
        result = _python(NO_TORCHVISION + code + checks)
        assert result.returncode == 0 and "OK" in result.stdout, f"{what}: {result.stderr[-3000:]}"
        printed = result.stdout + result.stderr
        assert "torchvision" not in printed and "safety checker" not in printed, f"{what}: {printed[-3000:]}"


# ------------------------------------------------------------------------------------------ base model
def test_base_model_is_a_hub_id_or_a_folder_name_never_a_local_path(tmp_path):
    assert base_model_name("org/teacher") == "org/teacher" and base_model_name("digits") == "digits" and base_model_name(None) is None
    plain = tmp_path / "xyz" / "teacher"
    plain.mkdir(parents=True)
    (plain / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert base_model_name(str(plain)) == "teacher" and base_model_name(str(plain) + "/") == "teacher"
    (plain / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "_name_or_path": "org/sd-base"}))
    assert base_model_name(str(plain)) == "org/sd-base"  # the Hub id recorded in the teacher's config
    (plain / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "_name_or_path": str(tmp_path / "other")}))
    assert base_model_name(str(plain)) == "teacher"  # a recorded local path means nothing elsewhere either
    snapshot = tmp_path / "hub" / "models--stabilityai--sd-turbo" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert base_model_name(str(snapshot)) == "stabilityai/sd-turbo"  # huggingface_hub's cache: the repo it holds


@pytest.mark.slow  # a training run
def test_a_trained_students_metadata_and_card_name_a_local_teacher_by_its_folder(tmp_path):
    """The trainer on a local SD teacher folder: the student records the folder's name (not its path) and the teacher's
    requires_safety_checker, and its card says the teacher is local."""
    from onestep_pipelines.training.config import DistillConfig
    from onestep_pipelines.training.trainer import distill

    folder = tmp_path / "tmpabc" / "my-sd-teacher"
    tiny_pipeline("sd").save_pretrained(folder)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    config = DistillConfig(teacher=str(folder), prompts=str(tmp_path / "prompts.txt"), resolution=32, output_dir=str(tmp_path / "run"),
                           max_train_steps=1, batch_size=1, preview_every=0, checkpoint_every=1000)
    result = distill(config)
    index = json.loads(Path(result["student_dir"], "model_index.json").read_text())
    assert index["requires_safety_checker"] is False and index["student"]["base_model"] == "my-sd-teacher"
    card = Path(result["student_dir"], "README.md").read_text()
    assert "a local teacher, `my-sd-teacher`" in card and str(tmp_path) not in card and "tmpabc" not in card
    assert "\nbase_model:" not in card.split("---")[1]  # no Hub link to a repository that does not exist


# ------------------------------------------------------------------------------------------ install instructions
def test_the_repository_url_is_pyprojects_and_no_file_says_pip_install_onestep_pipelines():
    pyproject = (REPO / "pyproject.toml").read_text()
    urls = re.search(r"^\[project\.urls\]\n(.*?)(?:\n\[|\Z)", pyproject, flags=re.S | re.M).group(1)
    assert f'Repository = "{REPOSITORY_URL}"' in urls
    assert INSTALL_COMMAND == f'pip install "git+{REPOSITORY_URL}"'
    assert INSTALL_COMMAND in shim_source("FewStepStableDiffusionPipeline")
    shipped = REPO / "onestep_pipelines" / "assets" / "digits" / "teacher" / "pipeline.py"
    assert shipped.read_text() == shim_source("DigitsPipeline")  # what DigitsPipeline.save_pretrained writes
    files = [shipped, REPO / "comfy_nodes" / "README.md", REPO / "training" / "README.md", *sorted((REPO / "model_cards").glob("*.md")),
             REPO / "onestep_pipelines" / "pipelines" / "loading.py"]
    for path in files:
        assert not re.search(r"pip install onestep-pipelines\b", path.read_text()), path
    assert REPOSITORY_URL in (REPO / "comfy_nodes" / "README.md").read_text()
