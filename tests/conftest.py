import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # benchmark modules double as test oracles
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def hub(monkeypatch):
    """An in-process fake Hugging Face Hub that huggingface_hub and diffusers talk to for this test."""
    from onestep_pipelines.testing.fake_hub import fake_hub

    with fake_hub() as hub:
        hub.patch_env(monkeypatch)
        yield hub


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A tiny random digits teacher folder (a DigitsPipeline with a 1-block DiT), for trainer tests."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from onestep_pipelines import DigitsPipeline, DigitsTransformer2DModel

    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    model = DigitsTransformer2DModel(patch_size=2, hidden_size=32, depth=1, num_heads=2)
    for p in model.parameters():  # a random but not degenerate velocity field
        torch.nn.init.normal_(p, std=0.05)
    DigitsPipeline(model, FlowMatchEulerDiscreteScheduler()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def captioned_data(tmp_path_factory) -> str:
    """A folder of two captioned images and a prompt list (``prompts.txt``, with blank lines)."""
    from PIL import Image

    data = tmp_path_factory.mktemp("images")
    for i, caption in enumerate(["a red square", "a blue circle"]):
        Image.new("RGB", (40, 40), ("red", "blue")[i]).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    (data / "prompts.txt").write_text("a cat\na dog\n\n")
    return str(data)


@pytest.fixture(scope="module")
def teacher_folders(tmp_path_factory):
    """``teacher_folders(architectures)``: saved tiny random pipelines, ``{architecture: folder}``."""
    from onestep_pipelines.testing import tiny_pipeline

    def save(architectures) -> dict:
        folders = {}
        for arch in architectures:
            folders[arch] = str(tmp_path_factory.mktemp(arch))
            tiny_pipeline(arch).save_pretrained(folders[arch])
        return folders

    return save


@pytest.fixture(scope="module")
def stock_teachers(teacher_folders, captioned_data):
    """Tiny random SD / SDXL / SD3 / Flux pipeline folders and a folder of captioned images with a prompt list."""
    return teacher_folders(("sd", "sdxl", "sd3", "flux")), captioned_data


@pytest.fixture
def without_forward_ad():
    """``without_forward_ad(module)``: the module's output goes through an op with a backward but no forward-mode rule,
    so ``torch.func.jvp`` cannot pass it (a model without forward-mode AD)."""

    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    return lambda module: module.register_forward_hook(lambda m, args, out: NoForwardAD.apply(out))
