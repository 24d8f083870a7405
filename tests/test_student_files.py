"""LoRA student files (diffusers + ComfyUI), model cards and Hub upload, on tiny random models."""

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard
from peft import LoraConfig
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from test_students import ARCHS, GUIDANCE_ARG, few_step_pipe, latents, randomize

from onestep_pipelines import (
    DigitsPipeline,
    DigitsTransformer2DModel,
    FlowMapScheduler,
    StudentMetadata,
    TDMScheduler,
    load_student_lora,
    push_student,
    save_student_lora,
    write_model_card,
)
from onestep_pipelines.pipelines.loading import INSTALL_COMMAND, REPOSITORY_URL
from onestep_pipelines.students.lora import comfyui_unmapped_keys
from onestep_pipelines.testing import tiny_pipeline

TARGETS = {
    "sd": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in", "ff.net.0.proj", "time_emb_proj"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0", "linear_1"],
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_out", "norm1.linear"],
    "flux": ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "norm1.linear", "norm.linear"],
}
TOKEN = "hf_secret_token_123"
SAMPLE = dict(drop=("num_inference_steps", "guidance_scale"))  # steps and guidance from the student's metadata


def plain(arch):
    """Sampling arguments equal to the students' metadata (2 steps, no CFG) for a pipeline without metadata."""
    return dict(drop=("guidance_scale",), **{GUIDANCE_ARG[arch]: 1.0})


def comfyui_accepted_names(arch, config):
    """The LoRA base names ComfyUI's loader maps for a stock model of this config (comfy/lora.py,
    model_lora_keys_unet): kohya ``lora_unet_<key, . -> _>`` for every UNet weight (unet_to_diffusers covers all of
    them) and ``transformer.<key>`` for every weight of SD3 / Flux (mmdit_to_diffusers / flux_to_diffusers)."""
    from diffusers.models import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls = {"sd": UNet2DConditionModel, "sdxl": UNet2DConditionModel, "sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[arch]
    with torch.device("meta"):
        keys = [k[: -len(".weight")] for k in cls.from_config(config).state_dict() if k.endswith(".weight")]
    return {f"lora_unet_{k.replace('.', '_')}" for k in keys} if arch in ("sd", "sdxl") else {f"transformer.{k}" for k in keys}


def lora_student(arch):
    """A pipeline with a random (non-zero) LoRA whose ranks and alphas differ per module, and its metadata."""
    pipe = few_step_pipe(arch)
    config = LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS[arch], init_lora_weights=False, rank_pattern={"to_q": 2}, alpha_pattern={"to_k": 7})
    torch.manual_seed(0)
    pipe.denoiser.add_adapter(config)
    metadata = StudentMetadata.from_scheduler(
        pipe.scheduler, method="dmd2", architecture=arch, num_inference_steps=2, recommended_steps=[1, 2], guidance_baked=True, guidance_scale=4.5, base_model=f"org/{arch}-teacher"
    )
    return pipe, metadata


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_round_trip_through_both_files_is_exact(arch, tmp_path):
    pipe, metadata = lora_student(arch)
    expected = latents(pipe, arch, **plain(arch))
    paths = save_student_lora(tmp_path, pipe, metadata)
    assert set(paths) == {"diffusers", "comfyui", "config"}

    with safe_open(paths["diffusers"], "pt") as f:
        header = f.metadata()
        assert StudentMetadata.from_json(header["onestep_student"]) == metadata
        assert json.loads(header["lora_adapter_metadata"])[f"{pipe._denoiser}.lora_alpha"] == 2
    with safe_open(paths["comfyui"], "pt") as f:
        comfy = {k: f.get_tensor(k) for k in f.keys()}
        assert StudentMetadata.from_json(f.metadata()["onestep_student"]) == metadata
    assert json.loads(open(paths["config"]).read())["onestep_student"] == metadata.to_dict()
    # ComfyUI: every key maps under its rules, every module has its real alpha (7 for to_k, rank 2 for to_q)
    assert comfyui_unmapped_keys(comfy, pipe.denoiser) == []
    accepted = comfyui_accepted_names(arch, pipe.denoiser.config)
    suffixes = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha")
    assert all(k.endswith(suffixes) and k.rsplit(".", 2 if not k.endswith(".alpha") else 1)[0] in accepted for k in comfy)
    alphas = {k[: -len(".alpha")]: float(v) for k, v in comfy.items() if k.endswith(".alpha")}
    downs = [k for k in comfy if k.endswith((".lora_down.weight", ".lora_A.weight"))]
    assert len(alphas) == len(downs) > 0
    assert {round(a, 4) for k, a in alphas.items() if k.endswith("to_k")} == {7.0}
    assert {round(a, 4) for k, a in alphas.items() if k.endswith(("to_v", "proj_out"))} == {2.0}
    assert all(comfy[k].shape[0] == 2 for k in downs if "to_q." in k or "to_q.lora" in k)
    if arch in ("sd", "sdxl"):
        assert all(k.startswith("lora_unet_") for k in comfy)
    else:
        assert all(k.startswith("transformer.") for k in comfy)

    for which in ("diffusers", "comfyui"):
        fresh = few_step_pipe(arch)
        loaded = load_student_lora(fresh, Path(paths[which]))
        assert loaded == metadata and fresh.student == metadata
        assert torch.equal(latents(fresh, arch, **SAMPLE), expected)  # metadata: 2 steps, no CFG (baked)
    # diffusers' own loader reads our diffusers file, lora_alpha included
    stock = few_step_pipe(arch)
    stock.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(latents(stock, arch, **plain(arch)), expected, rtol=1e-5, atol=1e-5)


def test_lora_fuse_and_scale(tmp_path):
    pipe, metadata = lora_student("sd")
    expected = latents(pipe, "sd", **plain("sd"))
    save_student_lora(tmp_path, pipe, metadata)
    fused = few_step_pipe("sd")
    load_student_lora(fused, str(tmp_path), fuse=True)
    assert not getattr(fused.unet, "peft_config", None)  # no adapter left, the weights carry it
    torch.testing.assert_close(latents(fused, "sd", **SAMPLE), expected, rtol=0, atol=1e-4)
    half = few_step_pipe("sd")
    load_student_lora(half, str(tmp_path), lora_scale=0.5)
    assert not torch.allclose(latents(half, "sd", **SAMPLE), expected)


def test_r_conditioned_digits_lora_student_round_trips(tmp_path):
    torch.manual_seed(0)
    model = DigitsTransformer2DModel(hidden_size=32, depth=1, num_heads=2)
    randomize(model)
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "proj"], init_lora_weights=False))
    pipe = DigitsPipeline(model, FlowMapScheduler())
    metadata = StudentMetadata.from_scheduler(pipe.scheduler, method="meanflow", architecture="digits", num_inference_steps=2, r_conditioning=True)
    pipe.set_student(metadata)
    expected = pipe(class_labels=[1, 7], generator=torch.Generator().manual_seed(0), output_type="latent").images
    paths = save_student_lora(tmp_path, pipe, metadata)
    assert set(paths) == {"diffusers", "r_embedder", "config"}  # no ComfyUI file: ComfyUI cannot run this model
    base = DigitsTransformer2DModel(hidden_size=32, depth=1, num_heads=2)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k and not k.startswith("r_embed")}, strict=False)
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".base_layer" in k}, strict=False)
    fresh = DigitsPipeline(base, FlowMapScheduler(gamma=0.5))
    load_student_lora(fresh, str(tmp_path))
    assert fresh.scheduler.config.gamma == 0.0 and fresh.student == metadata
    torch.testing.assert_close(fresh(class_labels=[1, 7], generator=torch.Generator().manual_seed(0), output_type="latent").images, expected, rtol=0, atol=1e-6)


def test_lora_for_another_architecture_or_partial_is_refused(tmp_path):
    pipe, metadata = lora_student("sd")
    paths = save_student_lora(tmp_path, pipe, metadata)
    other = few_step_pipe("sdxl")
    with pytest.raises(ValueError, match="LoRA for 'sd' models"):
        load_student_lora(other, paths["diffusers"])
    # without metadata the keys themselves are checked: every unmatched key is reported, nothing is loaded
    with safe_open(paths["comfyui"], "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="do not map onto this sdxl unet"):
        load_student_lora(other, str(tmp_path / "bare.safetensors"))
    assert not getattr(other.unet, "peft_config", None)
    tensors["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    same = few_step_pipe("sd")
    with pytest.raises(ValueError, match="1 of .* LoRA keys do not map.*lora_unet_not_a_module"):
        load_student_lora(same, str(tmp_path / "partial.safetensors"))
    assert not getattr(same.unet, "peft_config", None)
    del tensors["lora_unet_not_a_module.lora_down.weight"]
    del tensors[next(k for k in tensors if k.endswith(".lora_up.weight"))]
    save_file(tensors, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match=r"no lora_B weight"):
        load_student_lora(same, str(tmp_path / "half.safetensors"))
    torch.save(tensors, tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_student_lora(same, str(tmp_path / "weights.bin"))
    (tmp_path / "two").mkdir()
    for name in ("bare", "partial", "half"):
        os.replace(tmp_path / f"{name}.safetensors", tmp_path / "two" / f"{name}.safetensors")
    with pytest.raises(ValueError, match="pass weight_name"):
        load_student_lora(same, str(tmp_path / "two"))  # several candidate files
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        save_student_lora(tmp_path / "x", few_step_pipe("sd"), metadata)
    with pytest.raises(ValueError, match="architecture"):
        save_student_lora(tmp_path / "x", pipe, StudentMetadata.from_dict({**metadata.to_dict(), "architecture": "sdxl"}))


def test_lora_on_modules_comfyui_does_not_know_is_refused_for_the_comfyui_file(tmp_path):
    from onestep_pipelines import add_r_conditioning

    pipe = few_step_pipe("sd3")
    pipe.transformer = add_r_conditioning(pipe.transformer)
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "linear_1"]))
    metadata = StudentMetadata.from_scheduler(FlowMapScheduler(), method="flowmap", architecture="sd3", r_conditioning=True)
    pipe.set_student(metadata)
    randomize(pipe.transformer.r_embedder)
    expected = latents(pipe, "sd3", **SAMPLE)
    with pytest.raises(ValueError, match="would not load in ComfyUI"):
        save_student_lora(tmp_path, pipe, metadata)
    assert os.listdir(tmp_path) == []  # nothing half-written
    assert set(save_student_lora(tmp_path, pipe, metadata, comfyui=False)) == {"diffusers", "r_embedder", "config"}
    fresh = few_step_pipe("sd3")
    load_student_lora(fresh, tmp_path)  # adds r-conditioning, loads r_embedder, then the LoRA (r_embedder's too)
    torch.testing.assert_close(latents(fresh, "sd3", **SAMPLE), expected, rtol=0, atol=1e-5)
    stock = tiny_pipeline("sd3")
    with pytest.raises(ValueError, match="few-step pipeline that passes r"):
        load_student_lora(stock, tmp_path, set_scheduler=False)


def test_model_cards_render_with_snippets_numbers_and_grid(tmp_path):
    pipe, metadata = lora_student("sdxl")
    save_student_lora(tmp_path / "lora", pipe, metadata)
    numbers = [{"model": "teacher", "NFE": 32, "FD": 3.1412}, {"model": "student", "NFE": 1, "FD": 4.2}]
    grid = Image.new("RGB", (16, 16), "white")
    write_model_card(tmp_path / "lora", metadata, "lora", repo_id="me/sdxl-dmd2", numbers=numbers, grid=grid)
    card = ModelCard.load(tmp_path / "lora" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert data["base_model"] == "org/sdxl-teacher" and data["base_model_relation"] == "adapter"
    assert {"few-step", "dmd2", "lora"} <= set(data["tags"])
    text = card.text
    assert 'load_student_lora(pipe, "me/sdxl-dmd2")' in text and "FewStepStableDiffusionXLPipeline" in text
    assert "student_comfyui.safetensors" in text and "LoraLoaderModelOnly" in text
    assert "| student | 1 | 4.2 |" in text and "![samples](samples.png)" in text
    assert (tmp_path / "lora" / "samples.png").is_file() and "rank 4, alpha 2" in text

    full = few_step_pipe("sd")
    full_meta = StudentMetadata.from_scheduler(full.scheduler, method="consistency", architecture="sd", num_inference_steps=4, recommended_steps=[2, 4], guidance_scale=3.0)
    full.set_student(full_meta, set_scheduler=False)
    full.save_pretrained(tmp_path / "full")
    write_model_card(tmp_path / "full", full_meta, "full", repo_id="me/sd-lcm")
    card = ModelCard.load(tmp_path / "full" / "README.md")
    assert card.data.to_dict().get("base_model") is None and "lora" not in card.data.to_dict()["tags"]
    assert 'DiffusionPipeline.from_pretrained("me/sd-lcm"' in card.text and "trust_remote_code=True" in card.text
    assert "classifier-free guidance 3" in card.text
    with pytest.raises(ValueError, match="kind"):
        write_model_card(tmp_path / "full", full_meta, "checkpoint")
    for scheduler, arch, extra in [(TDMScheduler(), "sd", {}), (FlowMapScheduler(use_dynamic_shifting=True), "flux", {"r_conditioning": True}), (FlowMapScheduler(), "digits", {})]:
        m = StudentMetadata.from_scheduler(scheduler, method="tdm", architecture=arch, **extra)
        text = write_model_card(tmp_path / "full", m, "full").text
        assert f"`{type(scheduler).__name__}`" in text and ("second time r | yes" in text) == bool(extra)
    for card in (ModelCard.load(tmp_path / "lora" / "README.md"), ModelCard.load(tmp_path / "full" / "README.md")):  # not on PyPI
        assert INSTALL_COMMAND in card.text and "pip install onestep-pipelines" not in card.text and f"]({REPOSITORY_URL})" in card.text
    with pytest.raises(FileNotFoundError, match="save_student_lora"):
        write_model_card(tmp_path / "full", full_meta, "lora")


def test_digits_cards_are_class_conditional_and_local_teachers_are_named_not_linked(tmp_path):
    """The Hub has no class-conditional task: class-conditional ImageNet models (DiT / SiT / MAR) are filed under
    unconditional-image-generation with a class-conditional tag, and so are digits students. A teacher folder that is
    not on the Hub is named by its folder (also for an old student that recorded a path), never linked."""
    (tmp_path / "full").mkdir()
    for base_model in ("teacher0", "/tmp/xyz/teacher0"):
        m = StudentMetadata.from_scheduler(FlowMapScheduler(), method="dmd2", architecture="digits", base_model=base_model)
        card = write_model_card(tmp_path / "full", m, "full")
        data = card.data.to_dict()
        assert data["pipeline_tag"] == "unconditional-image-generation" and "class-conditional" in data["tags"]
        assert data.get("base_model") is None and "a local teacher, `teacher0`" in card.text and "/tmp/xyz" not in card.text
    shipped = write_model_card(tmp_path / "full", StudentMetadata.from_scheduler(FlowMapScheduler(), method="dmd2", architecture="digits", base_model="digits"), "full")
    assert "load_digits_teacher()" in shipped.text and shipped.data.to_dict().get("base_model") is None
    on_hub = write_model_card(tmp_path / "full", StudentMetadata.from_scheduler(FlowMapScheduler(), method="dmd2", architecture="digits", base_model="me/digits-teacher"), "full")
    assert on_hub.data.to_dict()["base_model"] == "me/digits-teacher" and "](https://huggingface.co/me/digits-teacher)" in on_hub.text
    sd = write_model_card(tmp_path / "full", StudentMetadata.from_scheduler(TDMScheduler(), method="tdm", architecture="sd", base_model="my-sd"), "full")
    assert sd.data.to_dict()["pipeline_tag"] == "text-to-image" and "class-conditional" not in sd.data.to_dict()["tags"]
    assert sd.data.to_dict().get("base_model") is None and "a local teacher, `my-sd`" in sd.text
    text = write_model_card(tmp_path / "full", StudentMetadata.from_scheduler(TDMScheduler(), method="tdm", architecture="sd", base_model="text-digits-sd"), "full")
    assert text.data.to_dict().get("base_model") is None and "shipped with onestep-pipelines" in text.text and "local teacher" not in text.text
    assert '"a handwritten digit seven"' in text.text


def test_push_student_then_load_from_the_hub(hub, tmp_path, caplog):
    caplog.set_level("DEBUG")
    pipe = few_step_pipe("sd3")
    metadata = StudentMetadata.from_scheduler(pipe.scheduler, method="dmd2", architecture="sd3", num_inference_steps=2)
    pipe.set_student(metadata, set_scheduler=False)
    pipe.save_pretrained(tmp_path / "full")
    write_model_card(tmp_path / "full", metadata, "full", repo_id="me/sd3-student")
    extra = ["single_file.safetensors", "transformer/diffusion_pytorch_model.fp16.safetensors", "vae/model.onnx", "vae/weights.bin"]
    for name in extra:  # files a student repo may also hold; loading must not fetch them
        (tmp_path / "full" / name).write_bytes(b"\0" * 64)
    url = push_student(str(tmp_path / "full"), "me/sd3-student", token=TOKEN)
    assert hub.commits["me/sd3-student"][-1] in url
    for name in extra:
        os.remove(tmp_path / "full" / name)
    loaded = DiffusionPipeline.from_pretrained("me/sd3-student", cache_dir=tmp_path / "cache")
    fetched = {os.path.relpath(os.path.join(root, n), loaded.name_or_path) for root, _, files in os.walk(loaded.name_or_path) for n in files}
    assert fetched and not fetched & set(extra) and "model_index.json" in fetched
    assert type(loaded) is type(pipe) and loaded.student == metadata
    torch.testing.assert_close(latents(loaded, "sd3", **SAMPLE), latents(pipe, "sd3", **SAMPLE), rtol=0, atol=1e-5)

    lora_pipe, lora_meta = lora_student("sd3")
    save_student_lora(tmp_path / "lora", lora_pipe, lora_meta)
    write_model_card(tmp_path / "lora", lora_meta, "lora", repo_id="me/sd3-lora")
    push_student(str(tmp_path / "lora"), "me/sd3-lora", token=TOKEN, private=True)
    fresh = few_step_pipe("sd3")
    load_student_lora(fresh, "me/sd3-lora", cache_dir=tmp_path / "cache")
    assert torch.equal(latents(fresh, "sd3", **SAMPLE), latents(lora_pipe, "sd3", **plain("sd3")))

    posts = [r for r in hub.requests if r.method == "POST"]
    assert posts and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in posts)
    for folder in ("full", "lora"):
        for root, _, files in os.walk(tmp_path / folder):
            for name in files:
                assert TOKEN.encode() not in open(os.path.join(root, name), "rb").read()
    assert TOKEN not in caplog.text
    with pytest.raises(ValueError, match="neither a saved pipeline"):
        push_student(str(tmp_path), "me/empty", token=TOKEN)
    with pytest.raises(ValueError, match="repo_id"):
        push_student(str(tmp_path / "full"), "a/b/c", token=TOKEN)
