"""The node pack inside a real ComfyUI server (skipped unless COMFYUI_DIR points at a ComfyUI checkout; the server
runs with COMFYUI_PYTHON, default this interpreter).

Random-weight models shaped the way ComfyUI detects them: an SD 1.5 checkpoint (UNet with 320 channels and
768-wide cross-attention, full-size CLIP-L, tiny TAESD), LoRAs and an r_embedder written by this package, a
digits student folder for the diffusers bridge, and (when the checkout holds the shipped text-digits-sd teacher) a LoRA
student of that teacher for the bridge. Samples must equal the diffusers pipelines' on the same weights, initial noise
and re-noising noise."""

import copy
import json
import os

import numpy as np
import pytest
import torch

from onestep_pipelines.testing.checkout import FORGET_INSTALLED, wheel_site, windows_style_clone
from onestep_pipelines.testing.comfyui import ComfyServer, comfyui_dir, execution_error, node_pack_start_cost, sd15_unet, write_sd15_checkpoint

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason="set COMFYUI_DIR to a ComfyUI checkout to run the server tests")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(REPO, "comfy_nodes", "example_workflows")
SEED, SIZE = 7, 64  # 64 px = an 8x8 latent
SD15_LATENT_SCALE = 0.18215  # ComfyUI returns latents divided by the SD 1.5 latent format's scale (process_latent_out)
TEXT_PROMPT = "a handwritten digit seven"
TEXT_LORA = "text_digits_dmd2_comfyui.safetensors"  # a random LoRA student of text-digits-sd (the shipped, trained one: SHIPPED_LORA)
SHIPPED_LORA = "text-digits-sd-lcm-lora"
# A test-only node: an IMAGE as a LATENT, so that SaveLatent writes it exactly (SaveImage's PNG keeps 8 bits)
IMAGE_PROBE = """class ImageAsLatent:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def run(self, images):
        return ({"samples": images.clone()},)


NODE_CLASS_MAPPINGS = {"TestImageAsLatent": ImageAsLatent}
"""
NODE_IDS = ["OneStepConsistencySampler", "OneStepTDMSampler", "OneStepFlowMapSampler", "OneStepFlowMapConditioning", "OneStepSigmas",
            "OneStepLoraLoader", "OneStepDiffusersStudent"]


def _lora_metadata(**overrides):
    from onestep_pipelines.metadata import StudentMetadata
    from onestep_pipelines.schedulers import ConsistencyScheduler

    scheduler = ConsistencyScheduler(gamma=1.0, timestep_preset="dmd2")
    return StudentMetadata.from_scheduler(scheduler, **{"method": "dmd2", "architecture": "sd", "num_inference_steps": 2, **overrides})


def _text_teacher_in(clone: str) -> str | None:
    """The shipped text-digits-sd teacher's folder inside ``clone`` (what the server loads), or None when absent."""
    import onestep_pipelines
    from onestep_pipelines.benchmark import teacher_folder

    relative = os.path.relpath(teacher_folder("text-digits-sd"), os.path.dirname(os.path.abspath(onestep_pipelines.__file__)))
    folder = os.path.join(clone, "onestep_pipelines", relative)
    return folder if os.path.isfile(os.path.join(folder, "model_index.json")) else None


def _write_text_lora_students(base, teacher: str) -> dict:
    """A LoRA student of the text-digits-sd teacher (random, non-zero LoRA on its UNet; 2-step DMD2 metadata), its
    files in models/loras (ComfyUI file under TEXT_LORA, the diffusers file), and the same LoRA declared for SDXL."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    from onestep_pipelines.students.lora import save_student_lora

    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], init_lora_weights=False))
    files = save_student_lora(str(base / "text_lora"), unet, _lora_metadata(base_model="text-digits-sd"), file_stem="text_digits_dmd2")
    loras = base / "models" / "loras"
    os.symlink(files["comfyui"], loras / TEXT_LORA)
    os.symlink(files["diffusers"], loras / "text_digits_dmd2_diffusers.safetensors")
    with safe_open(files["diffusers"], framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["onestep_student"] = _lora_metadata(architecture="sdxl", base_model="text-digits-sd").to_json()
    save_file(tensors, str(loras / "text_digits_sdxl.safetensors"), metadata=header)
    return {"comfyui": str(loras / TEXT_LORA), "diffusers": str(loras / "text_digits_dmd2_diffusers.safetensors")}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from peft import LoraConfig

    from onestep_pipelines.benchmark.digits import TEACHER_DIR
    from onestep_pipelines.metadata import StudentMetadata
    from onestep_pipelines.schedulers import ConsistencyScheduler
    from onestep_pipelines.models.r_conditioning import add_r_conditioning
    from onestep_pipelines.pipelines.pipeline_digits import DigitsPipeline
    from onestep_pipelines.students.lora import save_student_lora

    base = tmp_path_factory.mktemp("comfy")
    for folder in ("checkpoints", "loras", "diffusers"):
        (base / "models" / folder).mkdir(parents=True)
    (base / "custom_nodes").mkdir()
    # the "cloned into custom_nodes" route, from a checkout without symbolic links (Git on Windows), the package not installed
    windows_style_clone(REPO, str(base / "custom_nodes" / "onestep-pipelines"))
    (base / "custom_nodes" / "onestep_test_probe.py").write_text(IMAGE_PROBE)
    unet = sd15_unet(seed=0)
    write_sd15_checkpoint(str(base / "models" / "checkpoints" / "tiny_sd15.safetensors"), unet)

    lora_unet = copy.deepcopy(unet)  # a LoRA student on every attention projection and resnet conv, alpha != rank
    lora_unet.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
                                     alpha_pattern={"conv2": 2}, init_lora_weights=False))
    files = save_student_lora(str(base / "lora"), lora_unet, _lora_metadata())
    for kind in ("diffusers", "comfyui"):
        os.symlink(files[kind], base / "models" / "loras" / f"student_{kind}.safetensors")
    v_metadata = StudentMetadata.from_scheduler(ConsistencyScheduler(gamma=0.0, prediction_type="v_prediction"), method="progressive",
                                                architecture="sd", num_inference_steps=2)  # the same LoRA as a v-prediction student
    v_files = save_student_lora(str(base / "vlora"), lora_unet, v_metadata)
    os.symlink(v_files["comfyui"], base / "models" / "loras" / "v_student_comfyui.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(files["diffusers"], framework="pt") as f:  # the same LoRA, declared for SDXL
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["onestep_student"] = _lora_metadata(architecture="sdxl").to_json()
    save_file(tensors, str(base / "models" / "loras" / "sdxl_student.safetensors"), metadata=header)

    r_unet = add_r_conditioning(copy.deepcopy(unet))  # a flow-map student: the base UNet plus a trained-looking r embedding
    torch.manual_seed(3)
    for p in r_unet.r_embedder.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_file({k: v.contiguous() for k, v in r_unet.r_embedder.state_dict().items()}, str(base / "models" / "loras" / "r_embedder.safetensors"))

    r_lora_unet = copy.deepcopy(r_unet)  # a flow-map LoRA student: LoRA on the attention, its own r-embedding
    r_lora_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    from onestep_pipelines.schedulers import FlowMapScheduler

    r_metadata = StudentMetadata.from_scheduler(FlowMapScheduler(shift=3.0), method="flowmap", architecture="sd", num_inference_steps=2,
                                                r_conditioning=True)
    r_files = save_student_lora(str(base / "rlora"), r_lora_unet, r_metadata)
    os.symlink(r_files["comfyui"], base / "models" / "loras" / "flowmap_student_comfyui.safetensors")
    (base / "models" / "loras" / "damaged.safetensors").write_bytes(b"\xff" * 64)

    digits = DigitsPipeline.from_pretrained(TEACHER_DIR)  # the teacher run as a 4-step "student" (Euler, recorded in its metadata)
    digits.set_student(StudentMetadata.from_scheduler(ConsistencyScheduler.from_config(digits.scheduler.config, gamma=0.0), method="euler",
                                                      architecture="digits", num_inference_steps=4))
    digits.save_pretrained(str(base / "models" / "diffusers" / "digits-dmd2-student"))
    from onestep_pipelines.schedulers import PolicyScheduler
    from onestep_pipelines.training.methods.piflow import policy_head

    policy = DigitsPipeline.from_pretrained(TEACHER_DIR)  # a pi-Flow policy student: the teacher with a 4-component GM head
    policy_head(policy.transformer, "gmflow", 4, seed=0)
    scheduler = PolicyScheduler.from_config(policy.scheduler.config, num_components=4, substeps=8)
    policy.set_student(StudentMetadata.from_scheduler(scheduler, method="piflow", architecture="digits", num_inference_steps=2))
    policy.save_pretrained(str(base / "models" / "diffusers" / "digits-piflow-student"))
    incomplete = base / "models" / "diffusers" / "incomplete-student"
    incomplete.mkdir()
    (incomplete / "model_index.json").write_text((base / "models" / "diffusers" / "digits-dmd2-student" / "model_index.json").read_text())
    _write_family_teachers_and_loras(base)
    text_teacher = _text_teacher_in(str(base / "custom_nodes" / "onestep-pipelines"))
    text_loras = _write_text_lora_students(base, text_teacher) if text_teacher else {}
    with ComfyServer(str(base), forget_installed=True) as server:
        yield {"server": server, "unet": unet, "lora_unet": lora_unet, "r_unet": r_unet, "r_lora_dir": str(base / "rlora"), "base": base,
               "text_teacher": text_teacher, "text_loras": text_loras}


# the 2026 families through the bridge: tiny random teachers, and a LoRA in each family's published layout, named as published
FAMILY_LORAS = {"qwen_image": "Qwen-Image-Lightning-4steps-V1.0.safetensors", "flux2": "flux.2-turbo-lora.safetensors",
                "z_image": "Z-Image-Fun-Lora-Distill-4-Steps-2603.safetensors"}


def _family_lora(model, family: str) -> dict:
    """A random LoRA on a few of ``model``'s block layers in the layout the family's published file uses."""
    generator = torch.Generator().manual_seed(3)
    blocks = "layers" if family == "z_image" else "transformer_blocks"
    tensors = {}
    for target in ("attn.to_q", "attn.to_v") if family != "z_image" else ("attention.to_q", "feed_forward.w1"):
        module = f"{blocks}.0.{target}"
        layer = model.get_submodule(module)
        down, up = 0.3 * torch.randn(4, layer.in_features, generator=generator), 0.3 * torch.randn(layer.out_features, 4, generator=generator)
        if family == "qwen_image":  # lightx2v: bare names, lora_down / lora_up, alpha
            tensors |= {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up, f"{module}.alpha": torch.tensor(4.0)}
        elif family == "flux2":  # fal: diffusers transformer.* keys
            tensors |= {f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up}
        else:  # VideoX-Fun: bare peft keys, no alpha
            tensors |= {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
    return tensors


def _write_family_teachers_and_loras(base) -> None:
    from safetensors.torch import save_file

    from onestep_pipelines.testing import tiny_pipeline

    for family, name in FAMILY_LORAS.items():
        teacher = tiny_pipeline(family)
        teacher.save_pretrained(str(base / "models" / "diffusers" / f"tiny-{family}"))
        save_file(_family_lora(teacher.transformer, family), str(base / "models" / "loras" / name))


def _pipeline(unet, scheduler, cls=None):
    """A diffusers SD pipeline around ``unet`` (text encoder, tokenizer and VAE are unused: zero conditioning, latents out)."""
    from diffusers import StableDiffusionPipeline

    from onestep_pipelines.testing.tiny_pipelines import tiny_sd_pipeline

    parts = {**tiny_sd_pipeline().components, "unet": unet, "scheduler": scheduler}
    return (cls or StableDiffusionPipeline)(**parts, requires_safety_checker=False)


def _diffusers_latent(pipe, steps):
    """The pipeline's final latent for zero text conditioning, SEED's initial noise and SEED's re-noising noise."""
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.manual_seed(SEED))  # ComfyUI's prepare_noise
    size = noise.shape[-1] * pipe.vae_scale_factor
    with torch.no_grad():
        return pipe(prompt_embeds=torch.zeros(1, 77, 768), guidance_scale=1.0, num_inference_steps=steps, latents=noise.clone(),
                    generator=torch.Generator().manual_seed(SEED), output_type="latent", height=size, width=size).images


def _model_latent(server, entry) -> torch.Tensor:
    return server.latent(entry, "8") * SD15_LATENT_SCALE


def _zero_cond_workflow(sampler: dict, sigmas: dict, model_nodes: dict | None = None, model_ref=("1", 0)) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": sampler,
        "6": sigmas,
        "7": {"class_type": "SamplerCustom", "inputs": {"model": list(model_ref), "add_noise": True, "noise_seed": SEED, "cfg": 1.0,
              "positive": ["3", 0], "negative": ["3", 0], "sampler": ["5", 0], "sigmas": ["6", 0], "latent_image": ["4", 0]}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "parity"}},
    }
    prompt.update(model_nodes or {})
    return prompt


def _sigmas(model_ref, preset, steps, timesteps="999,749,499,249", shift=0.0):
    return {"class_type": "OneStepSigmas", "inputs": {"model": list(model_ref), "preset": preset, "steps": steps, "timesteps": timesteps,
                                                      "shift": shift, "denoise": 1.0}}


def test_nodes_are_listed_with_their_schemas(comfy):
    info = comfy["server"].get("/object_info")
    assert set(NODE_IDS) <= set(info)
    assert info["OneStepConsistencySampler"]["input"]["required"]["gamma"][1]["max"] == 1.0
    assert "r_embedder.safetensors" in json.dumps(info["OneStepFlowMapConditioning"]["input"])
    assert "digits-dmd2-student" in json.dumps(info["OneStepDiffusersStudent"]["input"])


@pytest.mark.parametrize("gamma,preset,steps", [(1.0, "lcm", 4), (0.3, "tcd", 3), (0.0, "trailing", 2), (1.0, "scm", 2)])
def test_consistency_sampler_equals_the_diffusers_pipeline(comfy, gamma, preset, steps):
    from onestep_pipelines.schedulers import ConsistencyScheduler

    server = comfy["server"]
    entry = server.run(_zero_cond_workflow({"class_type": "OneStepConsistencySampler", "inputs": {"gamma": gamma}}, _sigmas(("1", 0), preset, steps)))
    assert execution_error(entry) is None, execution_error(entry)
    expected = _diffusers_latent(_pipeline(comfy["unet"], ConsistencyScheduler(gamma=gamma, timestep_preset=preset)), steps)
    torch.testing.assert_close(_model_latent(server, entry), expected, rtol=0, atol=1e-4)


def test_tdm_sampler_equals_tdm_scheduler(comfy):
    from onestep_pipelines.schedulers import TDMScheduler

    server = comfy["server"]
    entry = server.run(_zero_cond_workflow({"class_type": "OneStepTDMSampler", "inputs": {}}, _sigmas(("1", 0), "tdm", 4)))
    assert execution_error(entry) is None, execution_error(entry)
    torch.testing.assert_close(_model_latent(server, entry), _diffusers_latent(_pipeline(comfy["unet"], TDMScheduler()), 4), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["diffusers", "comfyui"])
def test_lora_loader_patches_every_module_with_peft_scaling(comfy, kind):
    from onestep_pipelines.schedulers import ConsistencyScheduler

    server = comfy["server"]
    loader = {"class_type": "OneStepLoraLoader", "inputs": {"model": ["1", 0], "lora_name": f"student_{kind}.safetensors", "strength": 1.0,
                                                            "allow_partial": False, "fallback_steps": 4}}
    prompt = _zero_cond_workflow({"class_type": "OneStepConsistencySampler", "inputs": {"gamma": 1.0}}, {}, {"9": loader}, ("9", 0))
    prompt["7"]["inputs"].update(sampler=["9", 1], sigmas=["9", 2])  # the sampler and sigmas recorded in the file
    del prompt["5"], prompt["6"]
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    modules = sum(1 for name, _ in comfy["lora_unet"].named_modules() if name.endswith(".lora_A"))
    assert f"student_{kind}.safetensors: {modules}/{modules} LoRA modules mapped, {modules} weights patched" in server.read_log()
    expected = _diffusers_latent(_pipeline(comfy["lora_unet"], ConsistencyScheduler(gamma=1.0, timestep_preset="dmd2")), 2)
    torch.testing.assert_close(_model_latent(server, entry), expected, rtol=0, atol=1e-4)


def test_a_v_prediction_lora_student_of_an_epsilon_model_samples_as_in_diffusers(comfy):
    """A progressive-distillation student (v-prediction) loaded on an epsilon SD 1.5 checkpoint: the loader reads the
    MODEL's output as v, as the student's recorded scheduler does in diffusers."""
    from onestep_pipelines.schedulers import ConsistencyScheduler

    server = comfy["server"]
    loader = {"class_type": "OneStepLoraLoader", "inputs": {"model": ["1", 0], "lora_name": "v_student_comfyui.safetensors", "strength": 1.0,
                                                            "allow_partial": False, "fallback_steps": 4}}
    prompt = _zero_cond_workflow({}, {}, {"9": loader}, ("9", 0))
    prompt["7"]["inputs"].update(sampler=["9", 1], sigmas=["9", 2])
    del prompt["5"], prompt["6"]
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert "v_student_comfyui.safetensors" in server.read_log() and "v-prediction sampling" in server.read_log()
    expected = _diffusers_latent(_pipeline(comfy["lora_unet"], ConsistencyScheduler(gamma=0.0, prediction_type="v_prediction")), 2)
    torch.testing.assert_close(_model_latent(server, entry), expected, rtol=0, atol=1e-4)
    as_epsilon = _diffusers_latent(_pipeline(comfy["lora_unet"], ConsistencyScheduler(gamma=0.0)), 2)
    assert (_model_latent(server, entry) - as_epsilon).abs().max() > 0.1  # (the test tells the two readings apart)


@pytest.mark.parametrize("steps,gamma", [(1, 0.0), (2, 0.0), (3, 0.5)])
def test_flow_map_sampler_sends_r_and_equals_the_few_step_pipeline(comfy, steps, gamma):
    from onestep_pipelines.pipelines.few_step import FewStepStableDiffusionPipeline
    from onestep_pipelines.schedulers import FlowMapScheduler
    server = comfy["server"]
    nodes = {"10": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
             "9": {"class_type": "OneStepFlowMapConditioning", "inputs": {"model": ["10", 0], "r_embedder": "r_embedder.safetensors"}}}
    prompt = _zero_cond_workflow({"class_type": "OneStepFlowMapSampler", "inputs": {"gamma": gamma}}, _sigmas(("9", 0), "trailing", steps), nodes, ("9", 0))
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    pipe = _pipeline(comfy["r_unet"], FlowMapScheduler(shift=3.0, gamma=gamma), FewStepStableDiffusionPipeline)
    expected = _diffusers_latent(pipe, steps)
    torch.testing.assert_close(_model_latent(server, entry), expected, rtol=0, atol=1e-4)
    prompt["9"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}  # r silenced: a different sample
    plain = {**prompt, "5": {"class_type": "OneStepConsistencySampler", "inputs": {"gamma": 0.0}}}
    other = server.run(plain)
    assert not torch.allclose(_model_latent(server, other), expected, atol=1e-3)


def test_bad_input_gives_node_errors_and_the_server_keeps_serving(comfy):
    server = comfy["server"]
    consistency = {"class_type": "OneStepConsistencySampler", "inputs": {"gamma": 1.0}}
    cases = [
        (_sigmas(("1", 0), "custom", 4, timesteps="999,seven,499"), consistency, "'seven' is not a number"),
        (_sigmas(("1", 0), "custom", 4, timesteps="999;500"), consistency, "timesteps: '999;500' separates with ';'; give comma-separated numbers"),
        (_sigmas(("1", 0), "custom", 4, timesteps="499,749,249"), consistency, "strictly decreasing"),
        (_sigmas(("1", 0), "dmd2", 6), consistency, "at most 4"),
        (_sigmas(("1", 0), "trailing", 2, shift=2.0), consistency, "flow models only"),
        (_sigmas(("1", 0), "trailing", 2), {"class_type": "OneStepFlowMapSampler", "inputs": {"gamma": 0.0}}, "needs a rectified-flow model"),
    ]
    for sigmas, sampler, message in cases:
        entry = server.run(_zero_cond_workflow(sampler, sigmas))
        assert message in (execution_error(entry) or ""), execution_error(entry)
    with pytest.raises(ValueError, match="Value 1.5 bigger than max of 1.0.*\"details\": \"gamma\""):  # ComfyUI's own validation of the schema's range
        server.run(_zero_cond_workflow({"class_type": "OneStepConsistencySampler", "inputs": {"gamma": 1.5}}, _sigmas(("1", 0), "lcm", 2)))
    nodes = {"10": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}}
    entry = server.run(_zero_cond_workflow({"class_type": "OneStepFlowMapSampler", "inputs": {"gamma": 0.0}}, _sigmas(("10", 0), "trailing", 2), nodes, ("10", 0)))
    assert "does not take one" in (execution_error(entry) or "")
    loader = {"class_type": "OneStepLoraLoader", "inputs": {"model": ["1", 0], "lora_name": "sdxl_student.safetensors", "strength": 1.0,
                                                            "allow_partial": False, "fallback_steps": 4}}
    entry = server.run(_zero_cond_workflow(consistency, _sigmas(("9", 0), "lcm", 2), {"9": loader}, ("9", 0)))
    assert "is a LoRA for 'sdxl' models; this MODEL is 'sd'" in (execution_error(entry) or ""), execution_error(entry)
    entry = server.run(_zero_cond_workflow(consistency, _sigmas(("1", 0), "lcm", 2)))  # still serving
    assert execution_error(entry) is None and _model_latent(server, entry).shape == (1, 4, 8, 8)


@pytest.mark.parametrize("name", sorted(n[: -len(".api.json")] for n in os.listdir(WORKFLOWS) if n.endswith(".api.json")))
def test_example_workflows_run(comfy, name):
    """Every shipped workflow (ours and the community few-step graphs: LCM-LoRA, TCD, Hyper-SD, DMD2, Lightning, SD3,
    Flux), with its file names pointed at the tiny test files."""
    with open(os.path.join(WORKFLOWS, f"{name}.api.json")) as f:
        prompt = json.load(f)
    files = {"ckpt_name": "tiny_sd15.safetensors", "lora_name": "student_comfyui.safetensors", "r_embedder": "r_embedder.safetensors"}
    if comfy["text_teacher"] is None and any(node["inputs"].get("student") == "text-digits-sd" for node in prompt.values()):
        pytest.skip(NO_TEXT_TEACHER)
    if any(node["class_type"] == "UNETLoader" for node in prompt.values()):  # a native Qwen-Image graph: ComfyUI's detector cannot
        _assert_valid_graph(comfy["server"], prompt)  # load a tiny Qwen-Image (test_comfy_qwen_image.py runs the nodes on one)
        return
    for node in prompt.values():
        family = WORKFLOW_FAMILIES.get(node["inputs"].get("student"))
        if family is not None:  # a bridge graph of a 2026 family: its tiny teacher and published-layout LoRA
            node["inputs"].update(student=f"tiny-{family}", lora=FAMILY_LORAS[family], width=32, height=32)
            continue
        for key, value in files.items():
            if key in node["inputs"]:
                node["inputs"][key] = value
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=SIZE, height=SIZE)
    entry = comfy["server"].run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    images = [item for out in entry["outputs"].values() for item in out.get("images", [])]
    assert images and all(os.path.isfile(comfy["server"].output_path(i.get("subfolder", ""), i["filename"])) for i in images)


WORKFLOW_FAMILIES = {"FLUX.2-dev": "flux2", "Z-Image": "z_image"}  # the example workflows' diffusers folders -> tiny teachers


def _assert_valid_graph(server, prompt: dict) -> None:
    """Every node of ``prompt`` exists in the running server with the inputs it is given, and every combo value that is
    not a model file name is one the node offers."""
    info = server.get("/object_info")
    for node in prompt.values():
        assert node["class_type"] in info, node["class_type"]
        declared = {**info[node["class_type"]]["input"].get("required", {}), **info[node["class_type"]]["input"].get("optional", {})}
        assert set(node["inputs"]) <= set(declared), (node["class_type"], set(node["inputs"]) - set(declared))
        for name, value in node["inputs"].items():
            options = declared[name][0]
            if isinstance(options, list) and not isinstance(value, list) and not name.endswith("_name"):
                assert value in options, (node["class_type"], name, value)


def test_pip_installed_package_loads_through_the_one_line_shim(tmp_path):
    """The second install route: the wheel built from a checkout without symbolic links, installed (unpacked on the
    server's path, any other install ignored), and a one-line file in custom_nodes."""
    clone = windows_style_clone(REPO, str(tmp_path / "clone"))
    site = wheel_site(clone, str(tmp_path / "build"))
    (tmp_path / "custom_nodes").mkdir()
    (tmp_path / "custom_nodes" / "onestep.py").write_text("from onestep_pipelines.comfy_nodes import comfy_entrypoint  # noqa: F401\n")
    with ComfyServer(str(tmp_path), pythonpath=(site,), forget_installed=True) as server:
        assert set(NODE_IDS) <= set(server.get("/object_info"))


def _ui_workflows() -> dict[str, dict]:
    return {n[: -len(".json")]: json.load(open(os.path.join(WORKFLOWS, n))) for n in os.listdir(WORKFLOWS) if n.endswith(".json") and not n.endswith(".api.json")}


def _templates_served(server, pack: str) -> None:
    """ComfyUI's template browser lists every UI workflow under ``pack`` and serves each file as shipped."""
    expected = _ui_workflows()
    assert sorted(server.get("/workflow_templates").get(pack, [])) == sorted(expected)
    for name, workflow in expected.items():
        assert server.get(f"/api/workflow_templates/{pack}/{name}.json") == workflow, name


def test_a_clone_offers_the_example_workflows_as_templates(comfy):
    _templates_served(comfy["server"], "onestep-pipelines")


def test_pip_users_get_the_example_workflows_as_templates(tmp_path):
    """pip route with templates: ``python -m onestep_pipelines.comfy_nodes <ComfyUI>`` from the installed wheel writes
    custom_nodes/onestep (entry point + example_workflows copied from the wheel's package data)."""
    import subprocess
    import sys

    clone = windows_style_clone(REPO, str(tmp_path / "clone"))
    site = wheel_site(clone, str(tmp_path / "build"))
    base = tmp_path / "comfy"
    (base / "custom_nodes").mkdir(parents=True)
    code = FORGET_INSTALLED + (f"sys.path.insert(0, {site!r})\nimport runpy\nsys.argv = ['x', {str(base)!r}]\n"
                               "runpy.run_module('onestep_pipelines.comfy_nodes', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0 and f"{len(_ui_workflows())} example workflows" in out.stdout, out.stderr[-3000:]
    with ComfyServer(str(base), pythonpath=(site,), forget_installed=True) as server:
        assert set(NODE_IDS) <= set(server.get("/object_info"))
        _templates_served(server, "onestep")


def test_the_pack_adds_under_a_second_to_comfyui_start(comfy):
    """ComfyUI's own import time for the pack (import, comfy_entrypoint, node list, schemas) stays under 1 s, and
    loading it the way ComfyUI does imports none of diffusers, transformers, peft or the library's heavy parts."""
    printed = {os.path.basename(path): seconds for path, seconds in comfy["server"].custom_node_import_seconds().items()}
    assert printed["onestep-pipelines"] < 1.0, printed
    cost = node_pack_start_cost(str(comfy["base"] / "custom_nodes" / "onestep-pipelines"), forget_installed=True)
    assert cost["loaded"] and set(NODE_IDS) <= set(cost["nodes"]), cost["nodes"]
    assert cost["heavy"] == [], cost["heavy"][:20]


# ------------------------------------------------------------------------- exact on ComfyUI's own schedules
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal"]
MODEL_KINDS = {  # how the tiny SD 1.5-shaped checkpoint is sampled: epsilon VP, v-prediction VP, rectified flow
    "eps": {},
    "v": {"20": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "v_prediction", "zsnr": False}}},
    "flow": {"20": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}},
    "lcm": {"20": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "lcm", "zsnr": False}}},
}


def _branches(kind: str, samplers: dict, schedules: list[tuple[str, int, float]], seed=SEED, add_noise=True, advanced: bool = False) -> dict:
    """One workflow sampling the same latent with each sampler on each (scheduler, steps, denoise): SaveLatent nodes
    named ``"<sampler>|<scheduler>|<steps>|<denoise>"`` (ComfyUI's SamplerCustom, or SamplerCustomAdvanced)."""
    model = ["20", 0] if MODEL_KINDS[kind] else ["1", 0]
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        **MODEL_KINDS[kind],
    }
    n = 100
    for name, sampler in samplers.items():
        prompt[str(n)] = sampler
        sampler_ref = [str(n), 0]
        n += 1
        for scheduler, steps, denoise in schedules:
            prompt[str(n)] = {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": scheduler, "steps": steps, "denoise": denoise}}
            if advanced:
                prompt[str(n + 1)] = {"class_type": "RandomNoise" if add_noise else "DisableNoise", "inputs": {"noise_seed": seed} if add_noise else {}}
                prompt[str(n + 2)] = {"class_type": "BasicGuider", "inputs": {"model": model, "conditioning": ["3", 0]}}
                prompt[str(n + 3)] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": [str(n + 1), 0], "guider": [str(n + 2), 0],
                                      "sampler": sampler_ref, "sigmas": [str(n), 0], "latent_image": ["4", 0]}}
            else:
                prompt[str(n + 3)] = {"class_type": "SamplerCustom", "inputs": {"model": model, "add_noise": add_noise, "noise_seed": seed, "cfg": 1.0,
                                      "positive": ["3", 0], "negative": ["3", 0], "sampler": sampler_ref, "sigmas": [str(n), 0], "latent_image": ["4", 0]}}
            prompt[f"{name}|{scheduler}|{steps}|{denoise}"] = {"class_type": "SaveLatent", "inputs": {"samples": [str(n + 3), 0], "filename_prefix": f"s{n}"}}
            n += 4
    return prompt


def _latents(server, prompt: dict) -> dict:
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    return {key: server.latent(entry, key) for key in prompt if "|" in key}


EULER = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
GAMMA0 = {"class_type": "OneStepConsistencySampler", "inputs": {"gamma": 0.0}}
TDM = {"class_type": "OneStepTDMSampler", "inputs": {}}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_gamma_zero_and_tdm_equal_euler_on_every_comfyui_schedule(comfy, kind):
    """On any SIGMAS ComfyUI makes (every scheduler, denoise < 1), the consistency sampler with gamma 0 and the TDM
    sampler are Euler: within 1e-4 relative of the built-in euler."""
    schedules = [(name, 4, 1.0) for name in SCHEDULERS] + [("normal", 8, 0.5), ("karras", 6, 0.6)]
    latents = _latents(comfy["server"], _branches(kind, {"euler": EULER, "gamma0": GAMMA0, "tdm": TDM}, schedules))
    for scheduler, steps, denoise in schedules:
        expected = latents[f"euler|{scheduler}|{steps}|{denoise}"]
        for ours in ("gamma0", "tdm"):
            assert _relative(latents[f"{ours}|{scheduler}|{steps}|{denoise}"], expected) <= 1e-4, (ours, scheduler, steps, denoise)


def test_gamma_zero_is_deterministic_and_works_in_sampler_custom_advanced(comfy):
    schedules = [("karras", 4, 1.0), ("sgm_uniform", 4, 1.0)]
    runs = [_latents(comfy["server"], _branches("eps", {"gamma0": GAMMA0, "tdm": TDM, "euler": EULER}, schedules, seed=seed, add_noise=False))
            for seed in (1, 2)]
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key  # no fresh noise: the noise seed changes nothing
    advanced = _latents(comfy["server"], _branches("eps", {"gamma0": GAMMA0, "euler": EULER}, schedules, advanced=True))
    plain = _latents(comfy["server"], _branches("eps", {"gamma0": GAMMA0, "euler": EULER}, schedules))
    for key in advanced:
        torch.testing.assert_close(advanced[key], plain[key], rtol=0, atol=0)
    for scheduler, steps, denoise in schedules:
        assert _relative(advanced[f"gamma0|{scheduler}|{steps}|{denoise}"], advanced[f"euler|{scheduler}|{steps}|{denoise}"]) <= 1e-4


@pytest.mark.parametrize("kind", ["eps", "lcm"])
def test_gamma_one_equals_the_builtin_lcm_sampler(comfy, kind):
    """gamma 1 is LCM: equal to ComfyUI's lcm on its schedules, also on a ModelSamplingDiscrete(lcm) model."""
    schedules = [("sgm_uniform", 4, 1.0), ("simple", 2, 1.0), ("karras", 4, 1.0)]
    samplers = {"lcm": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}},
                "gamma1": {"class_type": "OneStepConsistencySampler", "inputs": {"gamma": 1.0}}}
    latents = _latents(comfy["server"], _branches(kind, samplers, schedules))
    for scheduler, steps, denoise in schedules:
        assert _relative(latents[f"gamma1|{scheduler}|{steps}|{denoise}"], latents[f"lcm|{scheduler}|{steps}|{denoise}"]) <= 1e-4


def test_gamma_between_re_noises_on_continuous_times(comfy):
    samplers = {"tcd": {"class_type": "OneStepConsistencySampler", "inputs": {"gamma": 0.3}}}
    schedules = [("karras", 4, 1.0), ("exponential", 3, 1.0)]
    a = _latents(comfy["server"], _branches("eps", samplers, schedules, seed=1))
    b = _latents(comfy["server"], _branches("eps", samplers, schedules, seed=2))
    for key in a:
        assert torch.isfinite(a[key]).all() and not torch.allclose(a[key], b[key])  # fresh noise: the seed matters


def test_the_lcm_lora_graph_gets_lcm_sigmas_from_model_sampling_discrete_lcm(comfy):
    """OneStepSigmas on ModelSamplingDiscrete(lcm) (a 50-entry table) gives the LCM grid's sigmas, which the built-in
    lcm sampler and ours sample alike."""
    server = comfy["server"]
    prompt = _zero_cond_workflow({"class_type": "OneStepConsistencySampler", "inputs": {"gamma": 1.0}}, _sigmas(("20", 0), "lcm", 4),
                                 MODEL_KINDS["lcm"], ("20", 0))
    ours = server.run(prompt)
    assert execution_error(ours) is None, execution_error(ours)
    prompt["5"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}}
    builtin = server.run(prompt)
    assert _relative(_model_latent(server, ours), _model_latent(server, builtin)) <= 1e-4
    expected = _diffusers_latent(_pipeline(comfy["unet"], __import__("onestep_pipelines").ConsistencyScheduler(gamma=1.0, timestep_preset="lcm")), 4)
    assert _relative(_model_latent(server, ours), expected) <= 1e-4  # the LCM grid's sigmas, as diffusers samples them


def test_timestep_zero_is_a_valid_custom_timestep(comfy):
    entry = comfy["server"].run(_zero_cond_workflow(GAMMA0, _sigmas(("1", 0), "custom", 2, timesteps="999,0")))
    assert execution_error(entry) is None, execution_error(entry)


def test_a_flow_map_lora_student_samples_like_the_diffusers_pipeline(comfy):
    """The student LoRA loader applies every part of a flow-map LoRA student (its r-embedding included) and outputs the
    flow-map sampler and sigmas: ComfyUI's latent equals the diffusers pipeline's with load_student_lora."""
    from onestep_pipelines.pipelines.few_step import FewStepStableDiffusionPipeline
    from onestep_pipelines.students.lora import load_student_lora

    server = comfy["server"]
    loader = {"class_type": "OneStepLoraLoader", "inputs": {"model": ["10", 0], "lora_name": "flowmap_student_comfyui.safetensors", "strength": 1.0,
                                                            "allow_partial": False, "fallback_steps": 4}}
    nodes = {"10": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}, "9": loader}
    prompt = _zero_cond_workflow({}, {}, nodes, ("9", 0))
    prompt["7"]["inputs"].update(sampler=["9", 1], sigmas=["9", 2])
    del prompt["5"], prompt["6"]
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert "second-time embedding applied" in server.read_log()
    from diffusers import DDIMScheduler

    pipe = _pipeline(copy.deepcopy(comfy["unet"]), DDIMScheduler(), FewStepStableDiffusionPipeline)
    load_student_lora(pipe, comfy["r_lora_dir"])  # sets the FlowMapScheduler and adds the r-embedding
    assert type(pipe.scheduler).__name__ == "FlowMapScheduler"
    torch.testing.assert_close(_model_latent(server, entry), _diffusers_latent(pipe, 2), rtol=0, atol=1e-4)


def test_errors_name_the_input_and_the_file_and_stay_short(comfy):
    server = comfy["server"]
    consistency = {"class_type": "OneStepConsistencySampler", "inputs": {"gamma": 1.0}}
    long_list = ",".join(str(t) for t in range(999, 0, -1)) + ",5"  # a 1000-entry list, not decreasing at the end
    cases = [
        (_sigmas(("1", 0), "custom", 4, timesteps=long_list), consistency, "OneStepSigmas: timesteps must be strictly decreasing, got [999.0"),
        (_sigmas(("1", 0), "lcm", 1000), consistency, "OneStepSigmas: preset 'lcm', steps 1000: num_inference_steps=1000 is more than"),
        (_sigmas(("1", 0), "custom", 4, timesteps="1000,500"), consistency, "OneStepSigmas: timesteps must lie in [0, 999]"),
        (_sigmas(("1", 0), "custom", 4, timesteps="999,seven"), consistency, "OneStepSigmas: timesteps: 'seven' is not a number"),
    ]
    for sigmas, sampler, message in cases:
        error = execution_error(server.run(_zero_cond_workflow(sampler, sigmas))) or ""
        assert message in error and "timesteps: timesteps" not in error and len(error) < 400, error  # each input named once; lists shortened
    damaged = {"class_type": "OneStepLoraLoader", "inputs": {"model": ["1", 0], "lora_name": "damaged.safetensors", "strength": 1.0,
                                                             "allow_partial": False, "fallback_steps": 4}}
    error = execution_error(server.run(_zero_cond_workflow(consistency, _sigmas(("9", 0), "lcm", 2), {"9": damaged}, ("9", 0)))) or ""
    assert "lora_name damaged.safetensors: not a readable safetensors file" in error and "download or copy it again" in error, error
    conditioning = {"class_type": "OneStepFlowMapConditioning", "inputs": {"model": ["1", 0], "r_embedder": "damaged.safetensors"}}
    error = execution_error(server.run(_zero_cond_workflow(consistency, _sigmas(("9", 0), "lcm", 2), {"9": conditioning}, ("9", 0)))) or ""
    assert error.startswith("OneStepFlowMapConditioning: r_embedder damaged.safetensors: not a readable") and error.count("r_embedder") == 1, error
    student = {"class_type": "OneStepDiffusersStudent", "inputs": {"student": "incomplete-student", "prompt": "", "class_labels": "1", "seed": 0,
               "steps": 0, "guidance": -1.0, "width": 0, "height": 0, "batch_size": 1}}
    entry = server.run({"1": student, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}})
    error = execution_error(entry) or ""
    assert "student incomplete-student: component 'scheduler' has no folder" in error or "component 'transformer' has no folder" in error, error


def _saved_image(server, entry, node="2") -> np.ndarray:
    from PIL import Image

    item = entry["outputs"][node]["images"][0]
    return np.asarray(Image.open(server.output_path(item.get("subfolder", ""), item["filename"])))


@pytest.mark.parametrize("substeps", [0, 64])
def test_policy_student_through_the_bridge_equals_its_pipeline(comfy, substeps):
    """A pi-Flow policy student in ComfyUI (the diffusers bridge) gives the diffusers pipeline's images, with the
    recorded substeps and with the substeps knob; SaveImage's PNG holds them to 8 bits (ComfyUI truncates 255 x)."""
    from diffusers import DiffusionPipeline

    from onestep_pipelines.schedulers import PolicyScheduler

    server = comfy["server"]
    student = {"class_type": "OneStepDiffusersStudent", "inputs": {"student": "digits-piflow-student", "prompt": "", "class_labels": "0,1,2,3",
               "seed": 7, "steps": 0, "guidance": -1.0, "width": 0, "height": 0, "batch_size": 1, "substeps": substeps}}
    entry = server.run({"1": student, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"policy{substeps}"}}})
    assert execution_error(entry) is None, execution_error(entry)
    pipe = DiffusionPipeline.from_pretrained(str(comfy["base"] / "models" / "diffusers" / "digits-piflow-student"))
    if substeps:
        pipe.scheduler = PolicyScheduler.from_config(pipe.scheduler.config, substeps=substeps)
    images = pipe(class_labels=[0, 1, 2, 3], generator=torch.Generator().manual_seed(7), output_type="np").images
    expected = np.clip(255.0 * np.repeat(images[0], 3, axis=-1), 0, 255).astype(np.uint8)
    saved = _saved_image(server, entry)
    assert saved.shape == expected.shape and np.abs(saved.astype(int) - expected.astype(int)).max() <= 1
    if substeps:
        entry8 = server.run({"1": {**student, "inputs": {**student["inputs"], "substeps": 0}},
                             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "policy8"}}})
        assert np.abs(_saved_image(server, entry8).astype(int) - saved.astype(int)).max() > 1  # the knob changes the roll-out
    wrong = {**student, "inputs": {**student["inputs"], "student": "digits-dmd2-student", "substeps": 16}}
    error = execution_error(server.run({"1": wrong, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "w"}}})) or ""
    assert "substeps: 16 applies to pi-Flow policy students (PolicyScheduler)" in error, error


NO_TEXT_TEACHER = ("the shipped text-digits-sd teacher (onestep_pipelines/assets/text_digits/sd) is not in this checkout; train it with "
                   "python -m onestep_pipelines.benchmark.train_text_digits sd")


def _text_student(**inputs) -> dict:
    return {"class_type": "OneStepDiffusersStudent", "inputs": {"student": "text-digits-sd", "prompt": TEXT_PROMPT, "class_labels": "", "seed": SEED,
            "steps": 0, "guidance": -1.0, "width": 0, "height": 0, "batch_size": 1, "substeps": 0, "lora": TEXT_LORA, "lora_strength": 1.0,
            **inputs}}


@pytest.mark.parametrize("kind,strength", [("comfyui", 1.0), ("diffusers", 0.6)])
def test_a_lora_student_of_a_shipped_teacher_through_the_bridge_equals_its_pipeline(comfy, kind, strength):
    """The same student in both surfaces: a LoRA student of the text-digits-sd teacher (its ComfyUI or its diffusers
    file), applied by the bridge node to the shipped teacher, gives the diffusers pipeline's IMAGE for the same prompt
    and seed (the bridge's CPU generator) within 1e-4: the few-step pipeline around the teacher, load_student_lora."""
    from diffusers import DiffusionPipeline

    from onestep_pipelines.pipelines import student_pipeline
    from onestep_pipelines.students import load_student_lora

    if comfy["text_teacher"] is None:
        pytest.skip(NO_TEXT_TEACHER)
    server, lora = comfy["server"], comfy["text_loras"][kind]
    assert "text-digits-sd" in json.dumps(server.get("/object_info/OneStepDiffusersStudent"))
    student = _text_student(lora=os.path.basename(lora), lora_strength=strength)
    entry = server.run({"1": student, "2": {"class_type": "TestImageAsLatent", "inputs": {"images": ["1", 0]}},
                        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": f"text_{kind}"}}})
    assert execution_error(entry) is None, execution_error(entry)
    teacher = DiffusionPipeline.from_pretrained(comfy["text_teacher"])
    pipe = student_pipeline(teacher, teacher.unet, teacher.scheduler)
    metadata = load_student_lora(pipe, lora, lora_scale=strength)
    assert metadata.num_inference_steps == 2 and type(pipe.scheduler).__name__ == "ConsistencyScheduler"
    with torch.no_grad():
        images = pipe(prompt=TEXT_PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt").images
    expected = images.float().clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(server.latent(entry, "3"), expected, rtol=0, atol=1e-4)


def test_the_shipped_trained_lora_student_draws_the_prompted_digit_as_in_diffusers(comfy):
    """The shipped, trained LoRA student (4-step consistency of text-digits-sd, offered by name): the bridge's IMAGE
    equals diffusers' own ``load_lora_weights`` on the stock teacher with the scheduler the LoRA records within 1e-4,
    and the images are the digit the prompt names (the benchmark's classifier)."""
    from diffusers import DiffusionPipeline

    from onestep_pipelines.benchmark import TEXT_STUDENT_LORAS
    from onestep_pipelines.benchmark.text_digits import TextDigitsMetric
    from onestep_pipelines.metadata import read_student_metadata

    if comfy["text_teacher"] is None:
        pytest.skip(NO_TEXT_TEACHER)
    server = comfy["server"]
    assert SHIPPED_LORA in json.dumps(server.get("/object_info/OneStepDiffusersStudent"))
    entry = server.run({"1": _text_student(lora=SHIPPED_LORA, batch_size=8),
                        "2": {"class_type": "TestImageAsLatent", "inputs": {"images": ["1", 0]}},
                        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "text_shipped"}}})
    assert execution_error(entry) is None, execution_error(entry)
    comfy_images = server.latent(entry, "3")
    metadata, _ = read_student_metadata(TEXT_STUDENT_LORAS[SHIPPED_LORA])
    stock = DiffusionPipeline.from_pretrained(comfy["text_teacher"])
    stock.load_lora_weights(os.path.dirname(TEXT_STUDENT_LORAS[SHIPPED_LORA]))  # diffusers' own loader
    stock.scheduler = metadata.make_scheduler()
    assert metadata.num_inference_steps == 4 and metadata.guidance_baked
    with torch.no_grad():
        images = stock(prompt=TEXT_PROMPT, num_inference_steps=4, guidance_scale=1.0, num_images_per_prompt=8,
                       generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt").images
    torch.testing.assert_close(comfy_images, images.float().clamp(0, 1).permute(0, 2, 3, 1), rtol=0, atol=1e-4)
    score = TextDigitsMetric().score_images(comfy_images.permute(0, 3, 1, 2) * 2 - 1, [TEXT_PROMPT] * 8)
    assert score.acc >= 7 / 8, score


def test_a_bad_lora_for_the_bridge_gives_a_node_error_and_the_server_keeps_serving(comfy):
    if comfy["text_teacher"] is None:
        pytest.skip(NO_TEXT_TEACHER)
    server = comfy["server"]

    def error(**inputs) -> str:
        entry = server.run({"1": _text_student(**inputs), "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bad"}}})
        return execution_error(entry) or ""

    message = error(lora="text_digits_sdxl.safetensors")
    assert message.startswith("OneStepDiffusersStudent: lora text_digits_sdxl.safetensors is a LoRA for 'sdxl' models; "
                              "student text-digits-sd is 'sd'"), message
    message = error(lora="damaged.safetensors")
    assert message.startswith("OneStepDiffusersStudent: lora damaged.safetensors: not a readable safetensors file") and "copy it again" in message, message
    message = error(lora="student_comfyui.safetensors")  # a LoRA of another (768-wide) SD UNet: shapes do not fit
    assert message.startswith("OneStepDiffusersStudent: lora student_comfyui.safetensors: ") and "nothing was loaded" in message, message
    assert message.endswith("a LoRA of another base model? Pick one trained on text-digits-sd.") and len(message) < 600, message
    assert error(steps=1) == ""  # still serving, and the teacher with its LoRA loads after the failures


def test_cancel_stops_the_diffusers_bridge_and_it_reports_progress(comfy):
    """/interrupt stops a long bridge generation between steps, and ComfyUI's progress messages come per step."""
    import asyncio
    import time
    import uuid

    import aiohttp

    server = comfy["server"]
    student = {"class_type": "OneStepDiffusersStudent", "inputs": {"student": "digits-dmd2-student", "prompt": "", "class_labels": "0,1,2,3,4,5,6,7,8,9",
               "seed": 0, "steps": 1000, "guidance": -1.0, "width": 0, "height": 0, "batch_size": 64}}
    prompt = {"1": student, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "long"}}}

    async def watch():
        client = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/ws?clientId={client}") as ws:
            status, _ = server.post("/prompt", {"prompt": prompt, "client_id": client})
            assert status == 200
            progress, interrupted_at = [], None
            while True:
                message = await ws.receive(timeout=120)
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                if data["type"] == "progress":
                    progress.append(data["data"]["value"])
                    if interrupted_at is None and len(progress) >= 20:
                        server.post("/interrupt", {})
                        interrupted_at = time.time()
                if data["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                    return data["type"], progress, time.time() - (interrupted_at or time.time())

    outcome, progress, stopped_after = asyncio.run(watch())
    assert outcome == "execution_interrupted", outcome
    assert stopped_after < 5.0 and 20 <= len(progress) < 1000 and progress == sorted(progress)


@pytest.mark.parametrize("family", sorted(FAMILY_LORAS))
def test_published_few_step_loras_of_the_2026_families_through_the_bridge_equal_diffusers(comfy, family):
    """Qwen-Image-Lightning, FLUX.2-dev-Turbo and Z-Image-Fun-Lora-Distill layouts (tiny, random), applied by the bridge
    node to a tiny teacher of their family in models/diffusers: the IMAGE equals the few-step pipeline with
    load_student_lora for the same prompt and seed, sampled on each file's published recipe (steps, shift, sigmas)."""
    from diffusers import DiffusionPipeline

    from onestep_pipelines.pipelines import student_pipeline
    from onestep_pipelines.students import load_student_lora

    server, folder = comfy["server"], comfy["base"] / "models" / "diffusers" / f"tiny-{family}"
    node = {"class_type": "OneStepDiffusersStudent", "inputs": {"student": f"tiny-{family}", "prompt": "a cat", "class_labels": "", "seed": SEED,
            "steps": 0, "guidance": -1.0, "width": 32, "height": 32, "batch_size": 1, "substeps": 0, "lora": FAMILY_LORAS[family], "lora_strength": 1.0}}
    entry = server.run({"1": node, "2": {"class_type": "TestImageAsLatent", "inputs": {"images": ["1", 0]}},
                        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": f"family_{family}"}}})
    assert execution_error(entry) is None, execution_error(entry)
    pipe = student_pipeline(DiffusionPipeline.from_pretrained(str(folder)))
    metadata = load_student_lora(pipe, str(comfy["base"] / "models" / "loras" / FAMILY_LORAS[family]), lora_scale=1.0)
    assert metadata.num_inference_steps == {"qwen_image": 4, "flux2": 8, "z_image": 4}[family]
    with torch.no_grad():
        images = pipe(prompt="a cat", height=32, width=32, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt").images
    torch.testing.assert_close(server.latent(entry, "3"), images.float().clamp(0, 1).permute(0, 2, 3, 1), rtol=0, atol=1e-4)
