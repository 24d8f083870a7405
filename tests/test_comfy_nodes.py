"""The node pack's ComfyUI-free parts (run in CI): sigma schedules against the diffusers schedulers, the LoRA key
conversion ComfyUI's loader needs, the diffusers bridge, imports without ComfyUI, and the example workflows' files."""

import asyncio
import glob
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_student_files import lora_student

from onestep_pipelines.sampling import SigmaSpace, few_step_sigmas, parse_timesteps, shift_sigmas
from onestep_pipelines.schedulers import ConsistencyScheduler
from onestep_pipelines.students.lora import comfyui_ready, comfyui_unmapped_keys, save_student_lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_NODES = {"OneStepConsistencySampler", "OneStepTDMSampler", "OneStepFlowMapSampler", "OneStepFlowMapConditioning", "OneStepSigmas",
             "OneStepLoraLoader", "OneStepDiffusersStudent"}


def _vp_space(scheduler):
    abar = scheduler.alphas_cumprod
    return SigmaSpace(flow=False, discrete_sigmas=((1 - abar) / abar).sqrt())


@pytest.mark.parametrize("preset,steps", [("lcm", 4), ("tcd", 2), ("dmd2", 4), ("tdm", 4), ("trailing", 3), ("rcm", 4), ("scm", 2), ("trailing", 1)])
def test_sigmas_follow_the_scheduler_on_vp_and_flow_models(preset, steps):
    vp = ConsistencyScheduler(timestep_preset=preset)
    vp.set_timesteps(steps)
    space = _vp_space(vp)
    sigmas = few_step_sigmas(space, steps, preset)
    torch.testing.assert_close(sigmas[:-1], space.discrete_sigmas[vp.timesteps].float())
    assert sigmas[-1] == 0 and space.timestep(sigmas[:-1]).tolist() == vp.timesteps.tolist()

    flow = ConsistencyScheduler(time_type="flow", shift=3.0, timestep_preset=preset)
    flow.set_timesteps(steps)
    got = few_step_sigmas(SigmaSpace(flow=True), steps, preset, flow_shift=lambda u: shift_sigmas(u, 3.0))  # the model's own shift
    torch.testing.assert_close(got, flow.sigmas, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(few_step_sigmas(SigmaSpace(flow=True), steps, preset, shift=3.0), got)  # an explicit shift


def test_custom_timesteps_and_denoise():
    vp = ConsistencyScheduler()
    vp.set_timesteps(timesteps=[999, 749, 499, 249])
    space = _vp_space(vp)
    torch.testing.assert_close(few_step_sigmas(space, 0, timesteps=parse_timesteps("999, 749,499 ,249")), torch.cat([space.discrete_sigmas[vp.timesteps].float(), torch.zeros(1)]))
    flow = few_step_sigmas(SigmaSpace(flow=True), 0, timesteps=[1000, 500], flow_shift=lambda u: u)
    torch.testing.assert_close(flow, torch.tensor([1.0, 0.5, 0.0]))
    half = few_step_sigmas(space, 2, "trailing", denoise=0.5)  # the last 2 of a 4-step schedule, as ComfyUI's BasicScheduler
    torch.testing.assert_close(half, few_step_sigmas(space, 4, "trailing")[-3:])


@pytest.mark.parametrize("call,message", [
    (lambda s: parse_timesteps("999,seven,499"), "'seven' is not a number"),
    (lambda s: parse_timesteps(" , "), "the list is empty"),
    (lambda s: few_step_sigmas(s, 0, timesteps=[499, 749, 249]), "strictly decreasing"),
    (lambda s: few_step_sigmas(s, 0, timesteps=[999, 500.5]), "integers"),
    (lambda s: few_step_sigmas(s, 0, timesteps=[1200, 500]), "timesteps"),
    (lambda s: few_step_sigmas(s, 6, "dmd2"), "at most 4"),
    (lambda s: few_step_sigmas(s, 2, "trailing", shift=3.0), "flow models only"),
    (lambda s: few_step_sigmas(s, 2, "trailing", denoise=0.0), "denoise must be in"),
    (lambda s: few_step_sigmas(s, 0, timesteps=[999, 499], denoise=0.5), "denoise applies to presets"),
    (lambda s: few_step_sigmas(s, 2, "karras"), "preset 'karras' is unknown"),
])
def test_bad_schedules_are_refused_with_the_reason(call, message):
    with pytest.raises(ValueError, match=message):
        call(_vp_space(ConsistencyScheduler()))


@pytest.mark.parametrize("arch", ["sd", "sdxl", "sd3", "flux"])
def test_any_diffusers_lora_becomes_what_comfyui_maps_with_peft_scaling(arch, tmp_path):
    """The diffusers-format file, converted for ComfyUI, equals the ComfyUI file the trainer writes: every key in
    ComfyUI's accepted names, every module with its real alpha (rank_pattern, alpha_pattern)."""
    pipe, metadata = lora_student(arch)
    paths = save_student_lora(tmp_path, pipe, metadata)
    with safe_open(paths["diffusers"], "pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    with safe_open(paths["comfyui"], "pt") as f:
        comfy_file = {k: f.get_tensor(k) for k in f.keys()}
    ready, modules = comfyui_ready(tensors, header)
    assert modules == sum(1 for n, _ in pipe.denoiser.named_modules() if n.endswith(".lora_A")) > 0
    assert comfyui_unmapped_keys(ready, pipe.denoiser) == []
    assert set(ready) == set(comfy_file)
    for key, value in comfy_file.items():
        torch.testing.assert_close(ready[key].float(), value.float(), msg=key)
    assert sorted({float(v) for k, v in ready.items() if k.endswith(".alpha")}) != [4.0]  # patterns survived (not alpha = rank)
    assert comfyui_ready(comfy_file, {}) == (comfy_file, modules)  # ComfyUI files pass through


def test_rslora_alpha_and_kohya_pass_through():
    down, up = torch.randn(4, 8), torch.randn(8, 4)
    header = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.use_rslora": True, "unet.r": 4})}
    ready, modules = comfyui_ready({"unet.mid.to_q.lora_A.weight": down, "unet.mid.to_q.lora_B.weight": up}, header)
    assert modules == 1 and set(ready) == {"lora_unet_mid_to_q.lora_down.weight", "lora_unet_mid_to_q.lora_up.weight", "lora_unet_mid_to_q.alpha"}
    assert float(ready["lora_unet_mid_to_q.alpha"]) / 4 == pytest.approx(8 / 2)  # ComfyUI's alpha / rank == peft's alpha / sqrt(r)
    kohya = {"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": up, "lora_unet_x.alpha": torch.tensor(2.0)}
    assert comfyui_ready(kohya) == (kohya, 1)


def test_diffusers_bridge_generates_an_image_with_the_recorded_scheduler(tmp_path):
    from comfy_nodes import bridge

    from onestep_pipelines import DigitsPipeline, StudentMetadata
    from onestep_pipelines.benchmark.digits import TEACHER_DIR

    pipe = DigitsPipeline.from_pretrained(TEACHER_DIR)
    pipe.set_student(StudentMetadata.from_scheduler(ConsistencyScheduler.from_config(pipe.scheduler.config, gamma=0.0), method="euler",
                                                    architecture="digits", num_inference_steps=3))
    pipe.save_pretrained(tmp_path / "student")
    loaded = bridge.load_pipeline(str(tmp_path / "student"))
    assert bridge.load_pipeline(str(tmp_path / "student")) is loaded  # cached
    calls = []
    loaded.transformer.register_forward_hook(lambda *a: calls.append(1))
    images = bridge.generate(loaded, class_labels="3,7", seed=1, batch_size=2)
    assert images.shape == (4, 8, 8, 3) and 0 <= images.min() and images.max() <= 1 and len(calls) == 3  # 3 recorded steps
    again = bridge.generate(loaded, class_labels="3,7", seed=1, batch_size=2)
    torch.testing.assert_close(images, again)
    with pytest.raises(ValueError, match="not a comma-separated list"):
        bridge.generate(loaded, class_labels="three")
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        bridge.load_pipeline(str(tmp_path))
    with pytest.raises(ValueError, match="substeps: 8 applies to pi-Flow policy students"):
        bridge.generate(loaded, class_labels="3", substeps=8)


def test_diffusers_bridge_samples_policy_students_with_a_substeps_knob(tmp_path):
    from comfy_nodes import bridge

    from onestep_pipelines import DigitsPipeline, PolicyScheduler, StudentMetadata
    from onestep_pipelines.benchmark.digits import TEACHER_DIR
    from onestep_pipelines.training.methods.piflow import policy_head

    pipe = DigitsPipeline.from_pretrained(TEACHER_DIR)
    policy_head(pipe.transformer, "dx", 3)
    scheduler = PolicyScheduler.from_config(pipe.scheduler.config, policy="dx", num_components=3, substeps=4)
    pipe.set_student(StudentMetadata.from_scheduler(scheduler, method="piflow", architecture="digits", num_inference_steps=2))
    pipe.save_pretrained(tmp_path / "student")
    loaded = bridge.load_pipeline(str(tmp_path / "student"))
    recorded = bridge.generate(loaded, class_labels="3,7", seed=1)
    finer = bridge.generate(loaded, class_labels="3,7", seed=1, substeps=32)
    assert loaded.scheduler.config.substeps == 4  # the knob is for that call only
    expected = loaded(class_labels=[3, 7], generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(recorded, expected.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).clamp(0, 1))
    assert 0 < float((recorded - finer).abs().max())


def test_node_pack_imports_without_comfyui():
    import onestep_pipelines.comfy_nodes as installed

    assert os.path.samefile(installed.__file__, os.path.join(REPO, "comfy_nodes", "__init__.py"))  # package-dir mapping
    with pytest.raises(ImportError):  # the nodes need ComfyUI; only calling the entry point imports them
        asyncio.run(installed.comfy_entrypoint())
    with open(os.path.join(REPO, "__init__.py")) as f:  # the "cloned into custom_nodes" entry point
        assert "from .comfy_nodes import comfy_entrypoint" in f.read()


@pytest.mark.parametrize("api_path", sorted(glob.glob(os.path.join(REPO, "comfy_nodes", "workflows", "*.api.json"))))
def test_example_workflows_agree_in_both_formats(api_path):
    with open(api_path) as f:
        api = json.load(f)
    with open(api_path.replace(".api.json", ".json")) as f:
        ui = json.load(f)
    assert {n["class_type"] for n in api.values()} & OUR_NODES
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    api_links = sorted((int(v[0]), v[1], int(k)) for k, n in api.items() for v in n["inputs"].values() if isinstance(v, list))
    assert sorted((link[1], link[2], link[3]) for link in ui["links"]) == api_links
    for node in ui["nodes"]:
        widgets = [v for v in api[str(node["id"])]["inputs"].values() if not isinstance(v, list)]
        assert [w for w in node["widgets_values"] if w != "fixed" or "fixed" in widgets] == widgets


def test_sigma_space_timestep_round_trip():
    vp = ConsistencyScheduler()
    space = _vp_space(vp)
    t = torch.tensor([999, 500, 0])
    assert space.timestep(space.discrete_sigmas[t]).tolist() == t.tolist()
    assert space.timestep(torch.tensor(0.0)).item() == -1
    assert np.isclose(float(space.intermediate_sigma(space.discrete_sigmas[499], 1.0)), 0.0)
