"""Qwen-Image, FLUX.2 ([dev], [klein]) and Z-Image through the trainer: ``onestep-train distill --teacher <folder>`` on tiny
random teachers of each family writes loadable LoRA students (family target modules, ComfyUI-ready file, a card that
names the family), the trainer's call of each transformer equals its pipeline's, and r-conditioned methods run where the
family's time allows (Z-Image's transformer takes ``1 - sigma``: refused by name)."""

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open

from onestep_pipelines import ConsistencyScheduler
from onestep_pipelines.testing import tiny_pipeline
from onestep_pipelines.training.teachers import load_teacher
from onestep_pipelines.training.trainer import DistillConfig, distill

FAMILIES = ("qwen_image", "flux2", "flux2_klein", "z_image")
UNGUIDED = {"flux2_klein": {"guidance_scale": 1.0}, "z_image": {"guidance_scale": 0.0}}  # (Qwen-Image: no negative prompt, no CFG)
PIPELINES = {"qwen_image": "FewStepQwenImagePipeline", "flux2": "FewStepFlux2Pipeline", "flux2_klein": "FewStepFlux2KleinPipeline",
             "z_image": "FewStepZImagePipeline"}


@pytest.fixture(scope="module")
def family_teachers(teacher_folders, captioned_data):
    return teacher_folders(FAMILIES), captioned_data


def _run(folders, data, tmp_path, family, method, **overrides):
    source = {"data": data} if method in ("consistency", "flowmap", "meanflow") else {"prompts": os.path.join(data, "prompts.txt")}
    config = DistillConfig(method=method, teacher=folders[family], output_dir=str(tmp_path / "run"), resolution=32, num_steps=2, max_train_steps=2,
                           batch_size=2, evaluate=False, checkpoint_every=1, **{"lora_rank": 4, "preview_every": 2, **source, **overrides})
    return distill(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trainers_call_of_each_family_is_its_pipelines(family_teachers, family):
    """One teacher step in the trainer's conventions equals one step of the family's own pipeline from the same
    latents: packing, model time (Z-Image: 1 - sigma), output sign, prompt embeddings."""
    folders, _ = family_teachers
    teacher = load_teacher(folders[family], resolution=32)
    teacher.set_prompts(["a cat"])
    pipe = teacher.pipeline
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = ConsistencyScheduler.from_config(pipe.scheduler.config, gamma=0.0)  # Euler, with a 1-step schedule Qwen-Image's has not
    shape = teacher.sample_shape
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    captured = {}

    def last_latents(pipeline, i, t, tensors):
        captured["latents"] = tensors["latents"]
        return {}

    packed = pipe(prompt="a cat", height=32, width=32, num_inference_steps=1, output_type="latent", callback_on_step_end=last_latents,
                  latents=noise if family.startswith("flux2") else _as_pipeline_latents(pipe, family, noise), **UNGUIDED.get(family, {}))
    del packed
    t = torch.tensor([1.0])
    x0, _ = teacher.predict(teacher.model, noise, t, {"prompt_index": torch.tensor([0])})
    expected = _as_pipeline_latents(pipe, family, x0)  # one Euler step from sigma 1 to 0 lands on x0
    torch.testing.assert_close(captured["latents"].float(), expected.float(), rtol=1e-4, atol=1e-5)


def _as_pipeline_latents(pipe, family, x):
    """The trainer's ``x`` as the family's pipeline holds latents during its loop (FLUX.2 takes them unpacked)."""
    if family == "qwen_image":
        b, c, h, w = x.shape
        return pipe._pack_latents(x, b, c, h, w)
    if family in ("flux2", "flux2_klein"):
        return pipe._pack_latents(x)
    return x


@pytest.mark.parametrize("family", FAMILIES)
def test_distil_a_lora_student_of_each_family(family_teachers, tmp_path, family):
    folders, data = family_teachers
    result = _run(folders, data, tmp_path, family, "dmd2")
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    architecture = "flux2" if family.startswith("flux2") else family
    assert type(pipe).__name__ == PIPELINES[family] and pipe.student.architecture == architecture and pipe.student.num_inference_steps == 2
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(pipe(prompt="a cat", height=32, width=32, output_type="latent", max_sequence_length=16).images).all()
    lora = tmp_path / "run" / "lora"
    with safe_open(str(lora / "student_comfyui.safetensors"), "pt") as f:
        modules = {k.rsplit(".", 2)[0] for k in f.keys() if k.endswith("lora_A.weight")}
    blocks = {"qwen_image": ("img_mlp.net.2", "txt_mlp.net.0.proj", "attn.add_q_proj"), "flux2": ("ff.linear_in", "attn.to_qkv_mlp_proj"),
              "flux2_klein": ("ff_context.linear_out", "single_transformer_blocks.0.attn.to_out"), "z_image": ("feed_forward.w2", "noise_refiner.0")}
    assert all(any(part in m for m in modules) for part in blocks[family]), sorted(modules)[:6]  # the family's block layers, not only attention
    card = (lora / "README.md").read_text()
    assert {"qwen_image": "Qwen-Image", "flux2": "FLUX.2", "flux2_klein": "FLUX.2", "z_image": "Z-Image"}[family] in card.splitlines()[0] + card
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["onestep_student"]["architecture"] == architecture
    if family == "flux2":  # FLUX.2 [dev]'s guidance embedding: the value the teacher got in training, recorded for sampling
        assert pipe.student.guidance_embedding == 4.0


@pytest.mark.parametrize("family", ["qwen_image", "flux2_klein"])
def test_flow_map_students_of_qwen_image_and_flux2_take_r(family_teachers, tmp_path, family):
    folders, data = family_teachers
    result = _run(folders, data, tmp_path, family, "flowmap", lora_rank=0, preview_every=0)
    pipe = DiffusionPipeline.from_pretrained(result["student_dir"])
    assert type(pipe.transformer).__name__.startswith("TwoTime") and pipe.student.r_conditioning
    seen = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, k, out: seen.append(float(k["r_timestep"].flatten()[0])), with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt="a cat", height=32, width=32, output_type="latent", max_sequence_length=16)
    handle.remove()
    assert seen[-1] == 0.0 and 0.0 < seen[0] < 1.0  # r in sigma units (the model's timestep units), the last step to 0


def test_z_image_refuses_flow_map_methods_by_name(family_teachers, tmp_path):
    folders, data = family_teachers
    with pytest.raises(TypeError, match="not ZImageTransformer2DModel"):
        _run(folders, data, tmp_path, "z_image", "flowmap", lora_rank=0)


@pytest.mark.parametrize("family,blocks", [("qwen_image", ["QwenImageTransformerBlock"]), ("flux2", ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"]),
                                           ("z_image", ["ZImageTransformerBlock"])])
def test_fsdp_wraps_each_familys_blocks(family, blocks):
    """FSDP2 units are the transformer's own blocks (its ``_no_split_modules``), present in the model."""
    from types import SimpleNamespace

    from onestep_pipelines.training.sharding import wrap_class_names

    model = tiny_pipeline(family).transformer
    assert wrap_class_names(model, SimpleNamespace(transformer_cls_names_to_wrap=None)) == blocks
    assert {type(m).__name__ for m in model.modules()} >= set(blocks)
