"""The node pack's ComfyUI-free parts (run in CI): sigma schedules against the diffusers schedulers, the LoRA key
conversion ComfyUI's loader needs, the diffusers bridge, imports without ComfyUI (and nothing heavy at ComfyUI's start),
node errors, and the example workflows' files and their install for pip users."""

import ast
import asyncio
import glob
import json
import os
import subprocess
import sys

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


def test_timestep_lists_read_as_written():
    assert parse_timesteps(" 999, 749 ,499,249, ") == [999.0, 749.0, 499.0, 249.0]  # spaces around entries, a trailing comma
    assert parse_timesteps("999.5,1e2,.5") == [999.5, 100.0, 0.5]
    long = " ".join(str(t) for t in range(999, 0, -1))  # a long input is echoed with its middle left out
    with pytest.raises(ValueError, match=r"'999 998 .* \.\.\. .* 2 1' is not a number") as error:
        parse_timesteps(long)
    assert len(str(error.value)) < 200


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
    (lambda s: parse_timesteps("999;500"), r"'999;500' separates with ';'; give comma-separated numbers such as '999,749,499,249'"),
    (lambda s: parse_timesteps("999,5;500"), "separates with ';'"),  # a decimal comma: no safe reading
    (lambda s: parse_timesteps("999,,500"), "'999,,500' has an empty entry between two commas"),
    (lambda s: parse_timesteps("999 749 499"), "'999 749 499' is not a number; give comma-separated numbers"),
    (lambda s: parse_timesteps("[999, 500]"), r"'\[999' is not a number"),
    (lambda s: parse_timesteps("999,nan"), "'nan' is not a number"),
    (lambda s: parse_timesteps("1_000,500"), "'1_000' is not a number"),
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
    from onestep_pipelines.comfy_nodes import bridge

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


def test_diffusers_bridge_samples_a_tdd_student_with_its_recorded_guidance_or_any_other(tmp_path):
    """A TDD student (decoupled guidance) records the CFG it samples with, unbaked: the bridge's guidance -1 runs the
    conditional and unconditional halves, an explicit guidance 1 one forward per step."""
    from onestep_pipelines.comfy_nodes import bridge

    from onestep_pipelines import DigitsPipeline, StudentMetadata
    from onestep_pipelines.benchmark.digits import TEACHER_DIR

    pipe = DigitsPipeline.from_pretrained(TEACHER_DIR)
    pipe.set_student(StudentMetadata.from_scheduler(ConsistencyScheduler.from_config(pipe.scheduler.config, gamma=0.2), method="tdd",
                                                    architecture="digits", num_inference_steps=2, guidance_scale=1.5))
    pipe.save_pretrained(tmp_path / "tdd")
    loaded = bridge.load_pipeline(str(tmp_path / "tdd"))
    batches = []
    loaded.transformer.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    default = bridge.generate(loaded, class_labels="3,7", seed=1)
    assert batches == [4, 4]
    batches.clear()
    plain = bridge.generate(loaded, class_labels="3,7", seed=1, guidance=1.0)
    assert batches == [2, 2] and (default - plain).abs().max() > 1e-3


def test_diffusers_bridge_applies_a_lora_student_to_a_teacher_folder(tmp_path):
    """With a LoRA file the bridge loads the folder as the teacher, in the few-step pipeline of its architecture with
    the LoRA applied (load_student_lora at the strength), cached per (folder, LoRA file and mtime, strength); bad LoRA
    files give errors naming the lora input and the file."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from safetensors.torch import save_file

    from onestep_pipelines import StudentMetadata
    from onestep_pipelines.comfy_nodes import bridge
    from onestep_pipelines.pipelines import student_pipeline
    from onestep_pipelines.students import load_student_lora
    from onestep_pipelines.testing.tiny_pipelines import tiny_sd_pipeline

    teacher = tiny_sd_pipeline()
    teacher.save_pretrained(tmp_path / "teacher")
    torch.manual_seed(0)
    teacher.unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False))
    metadata = StudentMetadata.from_scheduler(ConsistencyScheduler(timestep_preset="dmd2"), method="dmd2", architecture="sd", num_inference_steps=2)
    files = save_student_lora(str(tmp_path / "lora"), teacher.unet, metadata)
    folder = str(tmp_path / "teacher")
    loaded = bridge.load_pipeline(folder, lora=files["comfyui"], lora_strength=0.5, name="tiny")
    assert type(loaded).__name__ == "FewStepStableDiffusionPipeline" and loaded.student.num_inference_steps == 2
    assert bridge.load_pipeline(folder, lora=files["comfyui"], lora_strength=0.5) is loaded  # cached
    images = bridge.generate(loaded, prompt="a digit", seed=3)
    reference = DiffusionPipeline.from_pretrained(folder)
    reference = student_pipeline(reference, reference.unet, reference.scheduler)
    load_student_lora(reference, files["diffusers"], lora_scale=0.5)
    expected = reference(prompt="a digit", generator=torch.Generator("cpu").manual_seed(3), output_type="pt").images
    torch.testing.assert_close(images, expected.clamp(0, 1).permute(0, 2, 3, 1), rtol=0, atol=1e-5)
    full = bridge.load_pipeline(folder, lora=files["comfyui"], lora_strength=1.0)
    assert full is not loaded and float((bridge.generate(full, prompt="a digit", seed=3) - images).abs().max()) > 1e-4
    os.utime(files["comfyui"], (1, 1))  # the file changed: loaded again
    assert bridge.load_pipeline(folder, lora=files["comfyui"], lora_strength=1.0) is not full
    assert bridge.load_pipeline(folder) is not full and getattr(bridge.load_pipeline(folder), "student", None) is None  # no LoRA: the teacher
    with safe_open(files["diffusers"], framework="pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "sdxl.safetensors"), metadata={**header, "onestep_student": StudentMetadata.from_dict(
        {**metadata.to_dict(), "architecture": "sdxl"}).to_json()})
    (tmp_path / "damaged.safetensors").write_bytes(b"\xff" * 64)
    save_file({"unet.nowhere.lora_A.weight": torch.zeros(2, 4), "unet.nowhere.lora_B.weight": torch.zeros(4, 2)}, str(tmp_path / "other.safetensors"))
    for file, message in [("sdxl.safetensors", "lora sdxl.safetensors is a LoRA for 'sdxl' models; student tiny is 'sd'"),
                          ("damaged.safetensors", "lora damaged.safetensors: not a readable safetensors file"),
                          ("other.safetensors", "lora other.safetensors: 2 of 2 LoRA keys do not map onto this sd unet"),
                          ("missing.safetensors", "lora missing.safetensors: no such file")]:
        with pytest.raises(ValueError) as error:
            bridge.load_pipeline(folder, lora=str(tmp_path / file), name="tiny")
        assert str(error.value).startswith(message) and str(tmp_path) not in str(error.value), error.value


def test_diffusers_bridge_samples_policy_students_with_a_substeps_knob(tmp_path):
    from onestep_pipelines.comfy_nodes import bridge

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
        assert "from onestep_pipelines.comfy_nodes import comfy_entrypoint" in f.read()


@pytest.mark.parametrize("api_path", sorted(glob.glob(os.path.join(REPO, "comfy_nodes", "example_workflows", "*.api.json"))))
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


# ------------------------------------------------------------------------------ what ComfyUI's start imports
HEAVY = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "sklearn", "onestep_pipelines.pipelines", "onestep_pipelines.students",
         "onestep_pipelines.models", "onestep_pipelines.schedulers", "onestep_pipelines.metadata", "onestep_pipelines.training",
         "onestep_pipelines.benchmark.")  # the benchmark package's __init__ (the shipped teachers' names) is light, its submodules are not
COMFYUI_OWN = {"folder_paths", "comfy_api.latest"}  # loaded by ComfyUI before any node pack


def _module_level_imports(path: str, package: str) -> set[str]:
    found = set()
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(f"{package}.{node.module}" if node.level else node.module)
    return found - {"__future__"}


@pytest.mark.slow  # a fresh interpreter
def test_comfyui_start_imports_nothing_heavy():
    """ComfyUI imports nodes.py and builds every schema at start (for every start, whether the nodes are used or
    not): its module-level imports are ComfyUI's own modules and ones that load no diffusers, transformers or peft
    (checked in a fresh interpreter); the adapters and the bridge are imported by the nodes' execute."""
    top = _module_level_imports(os.path.join(REPO, "comfy_nodes", "nodes.py"), "onestep_pipelines.comfy_nodes")
    assert "onestep_pipelines.comfy_nodes.adapters" not in top and "onestep_pipelines.comfy_nodes.bridge" not in top
    ours = sorted(top - COMFYUI_OWN)
    code = (f"import sys\nfor name in {ours + ['onestep_pipelines.comfy_nodes']!r}:\n    __import__(name)\n"
            f"print(sorted(m for m in sys.modules if m.startswith({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"loaded at ComfyUI's start: {out.stdout.strip()[:500]}"


# ------------------------------------------------------------------------------------------- node errors
def _bridge():
    from onestep_pipelines.comfy_nodes import bridge

    return bridge


def _error(call) -> ValueError:
    try:
        call()
    except ValueError as error:
        return error
    raise AssertionError("no ValueError")


@pytest.mark.parametrize("where,call,expected", [
    ("timesteps", lambda: parse_timesteps("999,seven"), "timesteps: 'seven' is not a number;"),
    ("timesteps", lambda: few_step_sigmas(SigmaSpace(flow=True), 0, timesteps=[499, 749]), "timesteps must be strictly decreasing, got [499.0, 749.0]."),
    ("preset 'dmd2', steps 6", lambda: few_step_sigmas(SigmaSpace(flow=True), 6, "dmd2"), "preset 'dmd2', steps 6: "),
    ("prompt / class_labels / steps / substeps", lambda: _bridge().parse_labels("three"),
     "class_labels: 'three' is not a comma-separated list of integers."),
    ("r_embedder x.safetensors", lambda: (_ for _ in ()).throw(ValueError("r_embedder x.safetensors: not a readable safetensors file")),
     "r_embedder x.safetensors: not a readable safetensors file"),
])
def test_node_errors_say_their_input_once(where, call, expected):
    from onestep_pipelines.comfy_nodes.errors import fail

    message = str(fail(where, _error(call)))
    assert message.startswith(expected), message
    first = where.split()[0]
    assert message.count(f"{first}: {first}") == 0 and message.count(where) <= 1, message


def test_node_errors_are_not_cut():
    """The fix at the end of a long reason arrives whole (errors used to be cut at 500 characters, hint first)."""
    from onestep_pipelines.comfy_nodes.errors import fail

    unmapped = ", ".join(f"lora_unet_down_blocks_{i}_attentions_0_transformer_blocks_0_attn1_to_q" for i in range(8))
    reason = ValueError(f"lora_name student.safetensors: only 2 of 10 LoRA modules map onto this model (unmapped: {unmapped}); "
                        "set allow_partial to load them anyway.")
    message = str(fail("", reason, "Or load the LoRA's base model."))
    assert len(message) > 600 and message == f"{reason} Or load the LoRA's base model."


# --------------------------------------------------------------------------------------- example workflows
def test_a_clone_has_the_example_workflows_where_comfyui_looks():
    """ComfyUI lists and serves templates from ``<custom node folder>/example_workflows/*.json`` only: in a clone that
    is the repository's example_workflows/, equal to the UI files installed with the package (build.py writes both)."""
    from onestep_pipelines.comfy_nodes.install import EXAMPLES, ui_workflows

    assert os.path.samefile(EXAMPLES, os.path.join(REPO, "comfy_nodes", "example_workflows"))
    shipped = {os.path.basename(p): open(p, "rb").read() for p in ui_workflows()}
    in_clone = {os.path.basename(p): open(p, "rb").read() for p in glob.glob(os.path.join(REPO, "example_workflows", "*"))}
    assert len(shipped) == 18 and in_clone == shipped
    assert all(json.loads(data)["nodes"] for data in shipped.values())  # UI format: templates load in the editor


@pytest.mark.slow  # a fresh interpreter (python -m)
def test_pip_users_install_the_pack_with_its_example_workflows(tmp_path):
    from onestep_pipelines.comfy_nodes.install import ENTRY_POINT, install, ui_workflows

    with pytest.raises(ValueError, match="no custom_nodes folder"):
        install(str(tmp_path))
    (tmp_path / "custom_nodes").mkdir()
    target = install(str(tmp_path))
    assert target == str(tmp_path / "custom_nodes" / "onestep")
    assert sorted(os.listdir(os.path.join(target, "example_workflows"))) == sorted(os.path.basename(p) for p in ui_workflows())
    assert open(os.path.join(target, "__init__.py")).read().endswith(ENTRY_POINT)
    (tmp_path / "custom_nodes" / "onestep" / "example_workflows" / "old.json").write_text("{}")
    install(str(tmp_path))  # again (after an upgrade): the copies are replaced
    assert "old.json" not in os.listdir(os.path.join(target, "example_workflows"))
    (tmp_path / "custom_nodes" / "theirs").mkdir()
    with pytest.raises(ValueError, match="was not written by this command"):
        install(str(tmp_path), "theirs")
    (tmp_path / "custom_nodes" / "onestep.py").write_text(ENTRY_POINT)
    with pytest.raises(ValueError, match="onestep.py also loads a node pack"):
        install(str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "onestep_pipelines.comfy_nodes", str(tmp_path), "--name", "onestep2"], capture_output=True,
                         text=True, cwd=str(tmp_path))
    assert out.returncode == 0 and "18 example workflows" in out.stdout, out.stderr[-2000:]
    assert len(os.listdir(tmp_path / "custom_nodes" / "onestep2" / "example_workflows")) == 18
