"""Published few-step LoRAs of Qwen-Image, FLUX.2 and Z-Image: their key layouts (built on the tiny configs, random
weights) load completely through our loader, with the schedule their recipes need, and a contradicting scheduler warns.

The layouts, as published (sources in ``onestep_pipelines/students/published.py`` and the issue 30 note):
lightx2v's Qwen-Image-Lightning: bare diffusers module names, ``lora_down`` / ``lora_up`` and a scalar ``.alpha``, the 12
linear layers of every block; fal's FLUX.2-dev-Turbo: diffusers ``transformer.*`` ``lora_A`` / ``lora_B`` keys (its ComfyUI
copy mixes in ``diffusion_model.guidance_in``), and the BFL layout (``double_blocks.N.img_attn.qkv``) that other FLUX.2
LoRAs use; alibaba-pai's Z-Image-Fun-Lora-Distill (VideoX-Fun's trainer): bare peft ``lora_A`` / ``lora_B`` without alpha,
and its kohya copy ``lora_unet__layers_0_attention_to_q.lora_down.weight``.
"""

import logging

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

from onestep_pipelines import load_student_lora
from onestep_pipelines.pipelines import student_pipeline
from onestep_pipelines.students.published import FLUX2_TURBO_SIGMAS, published_lora
from onestep_pipelines.testing import tiny_pipeline

RANK = 4
QWEN_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
Z_IMAGE_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _pairs(model, modules, seed=0):
    """``{module: (down, up)}`` random LoRA halves that fit ``model``'s linear layers."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in modules:
        layer = model.get_submodule(name)
        out[name] = (torch.randn(RANK, layer.in_features, generator=generator), torch.randn(layer.out_features, RANK, generator=generator))
    return out


def _block_modules(model, blocks: str, targets) -> list[str]:
    return [f"{blocks}.{i}.{t}" for i in range(len(model.get_submodule(blocks))) for t in targets]


def _deltas(model, before: dict) -> dict:
    return {name: p.detach() - before[name] for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])}


def _load(pipe, tmp_path, name, tensors, **kwargs):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    model = pipe.transformer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metadata = load_student_lora(pipe, str(path), fuse=True, **kwargs)
    return metadata, _deltas(pipe.transformer, before)


@pytest.fixture
def family_pipes():
    """Fresh tiny few-step pipelines (each test loads LoRAs into its own weights)."""

    class Pipes(dict):
        def __missing__(self, name):
            self[name] = student_pipeline(tiny_pipeline(name))
            return self[name]

    return Pipes()


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_qwen_image_lightning_layout_loads_every_module_with_its_alpha_and_shift_3(family_pipes, tmp_path, prefix):
    pipe = (family_pipes["qwen_image"])
    modules = _block_modules(pipe.transformer, "transformer_blocks", QWEN_TARGETS)
    pairs = _pairs(pipe.transformer, modules)
    tensors = {}
    for module, (down, up) in pairs.items():
        tensors |= {f"{prefix}{module}.lora_down.weight": down, f"{prefix}{module}.lora_up.weight": up, f"{prefix}{module}.alpha": torch.tensor(8.0)}
    metadata, deltas = _load(pipe, tmp_path, "Qwen-Image-Lightning-4steps-V1.0-bf16.safetensors", tensors)
    assert len(deltas) == len(modules) == 24  # 100 %: every module patched, nothing else
    for module, (down, up) in pairs.items():
        torch.testing.assert_close(deltas[f"{module}.weight"], 8.0 / RANK * up @ down, rtol=1e-4, atol=1e-4)
    assert metadata.method == "qwen-image-lightning" and pipe.student.num_inference_steps == 4 and metadata.guidance_scale == 1.0
    config = pipe.scheduler.config  # Lightning's recipe: static shift 3, no shift_terminal (the Hub scheduler has both wrong for it)
    assert (config.shift, config.use_dynamic_shifting, config.shift_terminal) == (3.0, False, None)
    pipe.scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.3)
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))  # = ModelTC's ln 3 constant mu
    image = pipe(prompt="a cat", height=32, width=32, max_sequence_length=16, output_type="pt").images
    assert image.isfinite().all()


def test_a_scheduler_that_contradicts_the_lora_warns_once(family_pipes, tmp_path, caplog):
    pipe = (family_pipes["qwen_image"])
    module = "transformer_blocks.0.attn.to_q"
    down, up = _pairs(pipe.transformer, [module])[module]
    path = tmp_path / "Qwen-Image-Lightning-8steps-V1.1.safetensors"
    save_file({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up, f"{module}.alpha": torch.tensor(4.0)}, str(path))
    hub_scheduler = pipe.scheduler  # Qwen/Qwen-Image's: dynamic shift, shift_terminal 0.02
    load_student_lora(pipe, str(path))
    assert pipe.student.num_inference_steps == 8
    pipe.scheduler = hub_scheduler  # a user who puts the stock scheduler back
    call = dict(prompt="a cat", height=32, width=32, max_sequence_length=16, output_type="latent")
    with caplog.at_level(logging.WARNING):
        pipe(**call)
        pipe(**call)
    warnings = [r.getMessage() for r in caplog.records if "samples on the schedule it records" in r.getMessage()]
    assert len(warnings) == 1 and "use_dynamic_shifting=True (the student's: False)" in warnings[0] and "shift_terminal=0.02" in warnings[0]
    caplog.clear()
    pipe.set_student(pipe.student)  # as the warning says
    with caplog.at_level(logging.WARNING):
        pipe(**call)
    assert not [r for r in caplog.records if "samples on the schedule" in r.getMessage()]


def test_flux2_turbo_layouts_load_completely_and_sample_on_fals_sigmas(family_pipes, tmp_path):
    pipe = (family_pipes["flux2"])
    model = pipe.transformer
    double = _block_modules(model, "transformer_blocks", ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_in"))
    single = _block_modules(model, "single_transformer_blocks", ("attn.to_qkv_mlp_proj", "attn.to_out"))
    pairs = _pairs(model, double + single)
    diffusers_layout = {f"transformer.{m}.lora_{h}.weight": w for m, (a, b) in pairs.items() for h, w in (("A", a), ("B", b))}
    metadata, deltas = _load(pipe, tmp_path, "flux.2-turbo-lora.safetensors", diffusers_layout)
    assert len(deltas) == len(pairs)
    assert metadata.method == "flux2-dev-turbo" and metadata.guidance_embedding == 2.5 and metadata.sigmas == list(FLUX2_TURBO_SIGMAS)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["guidance"][0].item()), with_kwargs=True)
    pipe(prompt="a cat", height=32, width=32, max_sequence_length=16, output_type="latent")
    handle.remove()
    assert seen == [2.5] * 8 and pipe.scheduler.num_inference_steps == 8
    stock = FlowMatchEulerDiscreteScheduler.from_config(tiny_pipeline("flux2").scheduler.config)  # fal's README call, as diffusers runs it
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    stock.set_timesteps(sigmas=list(FLUX2_TURBO_SIGMAS), mu=compute_empirical_mu(64, 8))
    torch.testing.assert_close(pipe.scheduler.sigmas, stock.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_flux2_bfl_layout_is_converted_by_diffusers_with_its_qkv_split(family_pipes, tmp_path):
    pipe = (family_pipes["flux2"])
    model = pipe.transformer
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    generator = torch.Generator().manual_seed(1)
    down, up = torch.randn(RANK, hidden, generator=generator), torch.randn(3 * hidden, RANK, generator=generator)
    tensors = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": down, "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": up,
               "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(2.0)}
    metadata, deltas = _load(pipe, tmp_path, "my_flux2_style.safetensors", tensors)
    assert metadata is None  # not a published few-step LoRA: no recipe applied
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        expected = 2.0 / RANK * up[i * hidden:(i + 1) * hidden] @ down
        torch.testing.assert_close(deltas[f"transformer_blocks.0.attn.{name}.weight"], expected, rtol=1e-4, atol=1e-4)
    assert len(deltas) == 3


def test_the_comfyui_copy_of_flux2_turbo_with_its_mixed_prefixes_loads_completely(family_pipes, tmp_path):
    """fal's ComfyUI copy mixes ``transformer.transformer_blocks.*`` keys with BFL ``diffusion_model.guidance_in.*`` ones
    (diffusers issue 13484): diffusers' converter takes the whole file, and every module lands."""
    pipe = family_pipes["flux2"]
    model = pipe.transformer
    pairs = _pairs(model, ["transformer_blocks.0.attn.to_q", "time_guidance_embed.guidance_embedder.linear_1"])
    (down, up), (g_down, g_up) = pairs.values()
    tensors = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down, "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up,
               "diffusion_model.guidance_in.in_layer.lora_A.weight": g_down, "diffusion_model.guidance_in.in_layer.lora_B.weight": g_up}
    metadata, deltas = _load(pipe, tmp_path, "Flux_2-Turbo-LoRA_comfyui.safetensors", tensors)
    assert metadata.method == "flux2-dev-turbo" and len(deltas) == 2
    torch.testing.assert_close(deltas["transformer_blocks.0.attn.to_q.weight"], up @ down, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(deltas["time_guidance_embed.guidance_embedder.linear_1.weight"], g_up @ g_down, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["peft-bare", "kohya-videox"])
def test_z_image_fun_distill_layouts_load_at_strength_0_8_without_cfg(family_pipes, tmp_path, layout):
    """diffusers' own loader loads nothing from the bare layout (no alpha: its converter does not trigger, a warning only)
    and fails on the kohya copy (``transformer..layers``); ours maps both completely."""
    pipe = (family_pipes["z_image"])
    modules = _block_modules(pipe.transformer, "layers", Z_IMAGE_TARGETS) + _block_modules(pipe.transformer, "noise_refiner", Z_IMAGE_TARGETS)
    pairs = _pairs(pipe.transformer, modules)
    if layout == "peft-bare":
        tensors = {f"{m}.lora_{h}.weight": w for m, (a, b) in pairs.items() for h, w in (("A", a), ("B", b))}
    else:
        tensors = {f"lora_unet__{m.replace('.', '_')}.lora_{h}.weight": w for m, (a, b) in pairs.items() for h, w in (("down", a), ("up", b))}
    metadata, deltas = _load(pipe, tmp_path, "Z-Image-Fun-Lora-Distill-4-Steps-2603.safetensors", tensors)
    assert len(deltas) == len(modules)
    for module, (down, up) in pairs.items():  # no alpha: scale 1, times the recommended strength 0.8
        torch.testing.assert_close(deltas[f"{module}.weight"], 0.8 * up @ down, rtol=1e-4, atol=1e-4)
    assert metadata.num_inference_steps == 4 and pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(len(a[1][0])))
    pipe(prompt="a cat", height=32, width=32, max_sequence_length=16, output_type="latent")
    handle.remove()
    assert calls == [1] * 4  # guidance_scale 0.0: no CFG batch, one forward per step


def test_unknown_layouts_are_refused_whole_and_names_are_matched_by_family():
    assert published_lora("Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors").metadata(
        "Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors").num_inference_steps == 8
    assert published_lora("Flux_2-Turbo-LoRA_comfyui.safetensors").name == "flux2-dev-turbo"
    assert published_lora("Z-Image-Fun-Lora-Distill-8-Steps.safetensors", "z_image").metadata().num_inference_steps == 8
    assert published_lora("Qwen-Image-Lightning-4steps-V1.0.safetensors", "sdxl") is None  # another family's pipeline: no recipe
    assert published_lora("my_style.safetensors") is None


def test_a_partial_published_layout_loads_nothing(family_pipes, tmp_path):
    pipe = (family_pipes["qwen_image"])
    down, up = torch.randn(RANK, 16), torch.randn(48, RANK)
    tensors = {"transformer_blocks.0.attn.to_q.lora_down.weight": torch.randn(RANK, 48), "transformer_blocks.0.attn.to_q.lora_up.weight": torch.randn(48, RANK),
               "transformer_blocks.0.attn.to_q.alpha": torch.tensor(4.0), "transformer_blocks.7.attn.to_q.lora_down.weight": down,
               "transformer_blocks.7.attn.to_q.lora_up.weight": up}
    path = tmp_path / "Qwen-Image-Lightning-4steps-V1.0.safetensors"
    save_file(tensors, str(path))
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    with pytest.raises(ValueError, match=r"2 of 5 LoRA keys do not map .*transformer_blocks\.7\.attn\.to_q"):
        load_student_lora(pipe, str(path))
    assert not _deltas(pipe.transformer, before) and not getattr(pipe.transformer, "peft_config", None)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.student is None  # nor its recipe
