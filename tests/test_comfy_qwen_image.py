"""The node pack on ComfyUI's *native* Qwen-Image model (``comfy/ldm/qwen_image``, ``supported_models.QwenImage``,
``model_base.QwenImage``), in-process (skipped unless COMFYUI_DIR points at a ComfyUI checkout).

The model is built directly, not through ComfyUI's loaders: its detector (``model_detection.detect_unet_config``) reads
only ``in_channels`` and the block count from a Qwen-Image state dict, so every width falls back to the real model's
(24 heads x 128, joint/text dim 3584, rope axes 16/56/56) and a tiny checkpoint cannot load. So the tiny model is built
the way ``comfy.sd.load_diffusion_model_state_dict`` continues after detection: ``supported_models.QwenImage(unet_config)``
with small widths -> ``set_inference_dtype`` -> ``get_model`` -> ``load_model_weights`` -> ``ModelPatcher``. Its
latent is ComfyUI's (Wan 2.1 format: 16 channels, ``[B, 16, 1, H, W]``, so ``in_channels`` is 16 x 2 x 2, the patch
size ComfyUI's Qwen-Image code assumes), and a prompt is a ``[1, L, joint_attention_dim]`` tensor (``extra_conds``
reads it as ``cross_attn``).

Sampling runs through ``comfy.sample.sample`` (the KSampler node) and ``comfy.sample.sample_custom`` (SamplerCustom)
under ComfyUI's two Qwen-Image graph settings: the model's own ModelSamplingFlux (shift 1.15) and the
ModelSamplingAuraFlow(shift=3.0) node of the Lightning LoRA workflows. LoRA files in the layouts Qwen-Image LoRAs ship
in go through ComfyUI's own key map and loader and through the pack's StudentLoraLoader node.
"""

import importlib.util
import json
import logging
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from onestep_pipelines.testing.comfyui import comfyui_dir, torchvision_standin

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason="set COMFYUI_DIR to a ComfyUI checkout to run the native Qwen-Image tests")

TINY = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, axes_dims_rope=(4, 6, 6))  # rope axes sum to the head dim, as in the real (16, 56, 56) / 128
WIDTH = TINY["attention_head_dim"] * TINY["num_attention_heads"]
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
           "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1")
MODULES = [f"transformer_blocks.{i}.{t}" for i in range(TINY["num_layers"]) for t in TARGETS]
RANK, ALPHA = 2, 3.0  # ComfyUI scales by alpha / rank = 1.5 where the file has .alpha keys
# LoRA layouts: module name -> (down key, up key, alpha key or None)
LAYOUTS = {
    "peft": lambda m: (f"transformer.{m}.lora_A.weight", f"transformer.{m}.lora_B.weight", None),  # diffusers / peft
    "diffusion_model": lambda m: (f"diffusion_model.{m}.lora_down.weight", f"diffusion_model.{m}.lora_up.weight", f"diffusion_model.{m}.alpha"),
    "kohya": lambda m: (f"lora_unet_{m.replace('.', '_')}.lora_down.weight", f"lora_unet_{m.replace('.', '_')}.lora_up.weight",
                        f"lora_unet_{m.replace('.', '_')}.alpha"),
    "bare": lambda m: (f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"),  # what comfy/lora.py calls "QwenImage lora format"
    "onetrainer": lambda m: (f"lora_transformer_{m.replace('.', '_')}.lora_down.weight", f"lora_transformer_{m.replace('.', '_')}.lora_up.weight",
                             f"lora_transformer_{m.replace('.', '_')}.alpha"),  # mapped for SD3 / Flux only: the negative control
}
ACCEPTED = ("peft", "diffusion_model", "kohya", "bare")


def _import_comfy_in_process(folder: str):
    """ComfyUI's modules in this process. ``comfy.model_base`` imports torchvision (Cosmos, Stable Cascade); a CPU torch
    whose torchvision wheel does not import gets the package's import stand-in while ComfyUI loads, removed afterwards."""
    import diffusers.utils.import_utils  # noqa: F401  (its torchvision probe runs at import)
    from transformers.utils import import_utils

    from onestep_pipelines.testing.comfyui import _import_comfy

    # transformers and diffusers cache whether torchvision is there: they must ask before the stand-in is on the path
    import_utils.is_torchvision_available(), import_utils.is_torchvision_v2_available()
    standin = torchvision_standin(sys.executable, folder)
    before = list(sys.meta_path)
    if standin:
        sys.path.insert(0, standin)
    try:
        _import_comfy()  # COMFYUI_DIR on sys.path, --cpu
        import comfy.lora
        import comfy.model_base
        import comfy.model_detection
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sample
        import comfy.samplers
        import comfy.supported_models
        import comfy_extras.nodes_model_advanced as advanced
        import folder_paths

        from onestep_pipelines.comfy_nodes import adapters, nodes
    finally:
        if standin:
            sys.path.remove(standin)
            sys.meta_path[:] = [f for f in sys.meta_path if f in before or type(f).__module__ != "torchvision"]
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
    assert standin is None or importlib.util.find_spec("torchvision") is None  # nothing of the stand-in is left
    return SimpleNamespace(comfy=comfy, advanced=advanced, folder_paths=folder_paths, adapters=adapters, nodes=nodes)


def _random_weights(model, seed: int = 0) -> dict:
    """Random weights in ComfyUI's layout (``load_model_weights`` input): matrices scaled by 1/sqrt(fan_in) so outputs
    stay O(1) (ComfyUI's layers are created uninitialised)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in model.diffusion_model.state_dict().items():
        if value.ndim >= 2:
            sd[key] = torch.randn(value.shape, generator=g) / value.shape[1] ** 0.5
        else:
            sd[key] = (1.0 if "norm" in key else 0.0) + 0.1 * torch.randn(value.shape, generator=g)
    return sd


def _forget_comfy(modules_before: set, path_before: list):
    """This process imports no ComfyUI again after this module (other tests expect an ImportError without it): its
    modules, and the node pack's modules that import it, leave sys.modules; COMFYUI_DIR leaves sys.path."""
    root = os.path.realpath(comfyui_dir())

    def comfy_made(name):
        module = sys.modules[name]
        files = [getattr(module, "__file__", None) or "", *getattr(module, "__path__", [])]
        return name.startswith("onestep_pipelines.comfy_nodes.") or any(f and os.path.realpath(f).startswith(root + os.sep) for f in files)

    for name in [n for n in set(sys.modules) - modules_before if comfy_made(n)]:  # (namespace packages read sys.modules)
        module = sys.modules.pop(name)
        parent, _, child = name.rpartition(".")
        if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
            delattr(sys.modules[parent], child)
    sys.path[:] = [p for p in sys.path if p in path_before]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    modules_before, path_before = set(sys.modules), list(sys.path)
    c = _import_comfy_in_process(str(tmp_path_factory.mktemp("standin")))
    comfy = c.comfy
    model_config = comfy.supported_models.QwenImage(dict(TINY))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    weights = _random_weights(model)
    model.load_model_weights(dict(weights), "")  # it pops what it loads
    mm = comfy.model_management
    c.qwen = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    c.aura = c.advanced.ModelSamplingAuraFlow().patch_aura(c.qwen, 3.0)[0]  # what the Lightning workflows put before the sampler
    c.weights = weights
    g = torch.Generator().manual_seed(1)
    c.latent = comfy.sample.fix_empty_latent_channels(c.qwen, torch.zeros(1, 16, 8, 8))  # EmptySD3LatentImage, as KSampler passes it on
    assert c.latent.shape == (1, 16, 1, 8, 8)  # Wan 2.1 latents: one frame
    c.noise = comfy.sample.prepare_noise(c.latent, 0)
    c.positive = [[torch.randn(1, 7, TINY["joint_attention_dim"], generator=g), {}]]
    c.negative = [[torch.randn(1, 4, TINY["joint_attention_dim"], generator=g), {}]]
    yield c
    _forget_comfy(modules_before, path_before)


def _graph(env, name):
    return {"flux_1.15": env.qwen, "auraflow_3": env.aura}[name]


def _custom(env, model, sampler, sigmas, cfg):
    """SamplerCustom: the latent after sampling ``sigmas`` with ``sampler``."""
    return env.comfy.sample.sample_custom(model, env.noise, cfg, sampler, sigmas, env.positive, env.negative, env.latent, disable_pbar=True, seed=0)


def _euler(env, model, sigmas, cfg):
    return _custom(env, model, env.comfy.samplers.sampler_object("euler"), sigmas, cfg)


def _ours(env, gamma=0.0):
    return env.nodes.ConsistencySampler.execute(gamma).result[0]


def _assert_same_latent(got, expected):
    assert torch.isfinite(expected).all() and float(expected.abs().max()) > 0
    relative = float((got - expected).abs().max() / expected.abs().max())
    assert relative <= 1e-5, f"relative difference {relative:.2e}"


# ------------------------------------------------------------------------------------------ the native model
def test_the_native_model_is_built_as_the_loader_builds_it_after_detection(env):
    comfy = env.comfy
    # why it is built directly: detection reads no widths, so the tiny checkpoint gets the real model's (built on "meta")
    assert comfy.model_detection.detect_unet_config(env.weights, "") == {"image_model": "qwen_image", "in_channels": 64, "num_layers": 2}
    detected = comfy.model_detection.model_config_from_unet(env.weights, "")
    assert type(detected) is comfy.supported_models.QwenImage
    full_width = detected.get_model({}, "", device="meta").diffusion_model
    assert full_width.inner_dim == 3072 and full_width.txt_in.weight.shape == (3072, 3584)  # our checkpoint: 32 and 24
    model = env.qwen.model
    assert type(model) is comfy.model_base.QwenImage and type(model.diffusion_model).__name__ == "QwenImageTransformer2DModel"
    assert model.diffusion_model.inner_dim == WIDTH and model.model_type == comfy.model_base.ModelType.FLUX
    ms = env.qwen.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.ModelSamplingFlux) and isinstance(ms, comfy.model_sampling.CONST) and ms.shift == pytest.approx(1.15)
    aura = env.aura.get_model_object("model_sampling")
    assert isinstance(aura, comfy.model_sampling.ModelSamplingDiscreteFlow) and (aura.shift, aura.multiplier) == (3.0, 1.0)
    assert env.adapters.sigma_space(ms).flow and env.adapters.sigma_space(aura).flow  # both are rectified flow to the pack
    conds = model.extra_conds(cross_attn=env.positive[0][0])
    assert torch.equal(conds["c_crossattn"].cond, env.positive[0][0])  # Qwen conditioning: [1, L, joint_dim] as cross_attn
    # the prompt reaches the model: CFG 2.5 differs from CFG 1 (which evaluates the positive prompt only)
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", 2)
    assert float((_euler(env, env.qwen, sigmas, 1.0) - _euler(env, env.qwen, sigmas, 2.5)).abs().max()) > 1e-2


# ---------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("graph", ["flux_1.15", "auraflow_3"])
@pytest.mark.parametrize("scheduler,steps", [("simple", 1), ("simple", 4), ("simple", 8), ("beta", 4), ("normal", 3)])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_consistency_sampler_at_gamma_0_is_comfyuis_euler_on_its_own_schedulers(env, graph, scheduler, steps, cfg):
    """KSampler(euler, scheduler) against SamplerCustom(ConsistencySampler gamma 0, BasicScheduler's sigmas)."""
    model = _graph(env, graph)
    expected = env.comfy.sample.sample(model, env.noise, steps, cfg, "euler", scheduler, env.positive, env.negative, env.latent, disable_pbar=True,
                                       seed=0)
    sigmas = env.comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    _assert_same_latent(_custom(env, model, _ours(env), sigmas, cfg), expected)


@pytest.mark.parametrize("graph", ["flux_1.15", "auraflow_3"])
@pytest.mark.parametrize("preset,steps,timesteps,shift", [
    ("lcm", 4, "", 0.0), ("tcd", 2, "", 0.0), ("dmd2", 4, "", 0.0), ("tdm", 4, "", 0.0), ("trailing", 1, "", 0.0), ("trailing", 4, "", 0.0),
    ("trailing", 8, "", 0.0), ("linspace", 3, "", 0.0), ("rcm", 4, "", 0.0), ("scm", 2, "", 0.0), ("custom", 0, "1000,750,500,250", 0.0),
    ("trailing", 4, "", 5.0),
])
def test_few_step_sigmas_with_our_samplers_are_euler(env, graph, preset, steps, timesteps, shift):
    model = _graph(env, graph)
    sigmas = env.nodes.FewStepSigmas.execute(model, preset, max(steps, 1), timesteps, shift, 1.0).result[0]
    assert sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    # sCM's top TrigFlow time 1.5708 is just above pi / 2: flow sigma 1.0000037, a model timestep just above 1000
    assert float(sigmas[0]) <= 1.0 if preset != "scm" else float(sigmas[0]) == pytest.approx(1.0000037, abs=1e-6)
    expected = _euler(env, model, sigmas, 1.0)
    _assert_same_latent(_custom(env, model, _ours(env), sigmas, 1.0), expected)
    if preset == "tdm":  # the TDM sampler is the deterministic consistency sampler
        _assert_same_latent(_custom(env, model, env.nodes.TDMSampler.execute().result[0], sigmas, 1.0), expected)


@pytest.mark.parametrize("graph", ["flux_1.15", "auraflow_3"])
def test_trailing_sigmas_are_comfyuis_simple_schedule(env, graph):
    model = _graph(env, graph)
    for steps in (1, 2, 4, 8):
        ours = env.nodes.FewStepSigmas.execute(model, "trailing", steps, "", 0.0, 1.0).result[0]
        theirs = env.comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-3)


def test_flow_map_sampler_on_qwen_image(env):
    """The flow-map sampler refuses a MODEL without r-conditioning; the pack's r-conditioning patches the Qwen-Image
    denoiser's time embedding: with a zero-initialised r-embedding (a student at initialisation) the flow-map sampler
    at gamma 0 is exactly Euler, with a trained (non-zero) one r changes the result."""
    from diffusers.models.embeddings import Timesteps

    from onestep_pipelines.models.r_conditioning import IntervalEmbedding

    adapters = env.adapters
    sigmas = env.nodes.FewStepSigmas.execute(env.aura, "trailing", 4, "", 0.0, 1.0).result[0]
    sampler = env.nodes.FlowMapSampler.execute(0.0).result[0]
    with pytest.raises(ValueError, match="this MODEL does not take one"):
        _custom(env, env.aura, sampler, sigmas, 1.0)
    width = adapters._out_features(env.aura.get_model_object("diffusion_model").time_text_embed)
    r_embedder = IntervalEmbedding(Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0), width)
    euler = _euler(env, env.aura, sigmas, 1.0)
    _assert_same_latent(_custom(env, adapters.patch_r_conditioning(env.aura, r_embedder), sampler, sigmas, 1.0), euler)
    torch.nn.init.normal_(r_embedder.embedding.linear_2.weight, std=0.5)
    moved = _custom(env, adapters.patch_r_conditioning(env.aura, r_embedder), sampler, sigmas, 1.0)
    assert moved.isfinite().all() and (moved - euler).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------- LoRA
def _lora(env, layout: str, seed: int = 0) -> tuple[dict, dict]:
    """``(file tensors, {module: (down, up)})`` of a random rank-2 LoRA on every target module, in ``layout``."""
    g = torch.Generator().manual_seed(seed)
    tensors, pairs = {}, {}
    for m in MODULES:
        out_dim, in_dim = env.weights[f"{m}.weight"].shape
        down, up = torch.randn(RANK, in_dim, generator=g) / in_dim ** 0.5, 0.1 * torch.randn(out_dim, RANK, generator=g)
        down_key, up_key, alpha_key = LAYOUTS[layout](m)
        tensors[down_key], tensors[up_key] = down, up
        if alpha_key:
            tensors[alpha_key] = torch.tensor(ALPHA)
        pairs[m] = (down, up)
    return tensors, pairs


def _patched_weights(env, patched) -> dict:
    """``{module: weight}`` of a ModelPatcher as ComfyUI loads it for sampling (``load_models_gpu``, which also takes off
    the patches of another clone still loaded on the shared model)."""
    env.comfy.model_management.load_models_gpu([patched])
    return {m: patched.model.diffusion_model.get_submodule(m).weight.detach().clone() for m in MODULES}


def _assert_lora_applied(env, patched, pairs: dict, scale: float):
    weights = _patched_weights(env, patched)
    for m, (down, up) in pairs.items():
        torch.testing.assert_close(weights[m], env.weights[f"{m}.weight"] + scale * up @ down, rtol=1e-6, atol=1e-6, msg=m)
    base = _patched_weights(env, env.qwen)  # the base model is untouched
    assert all(torch.equal(base[m], env.weights[f"{m}.weight"]) for m in MODULES)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_comfyuis_key_map_loads_qwen_image_lora_layouts(env, layout, caplog):
    """ComfyUI's own loader (the LoraLoaderModelOnly path): every module of the four usual layouts is patched and no key
    is left ("lora key not loaded"); OneTrainer's ``lora_transformer_*`` is mapped for SD3 / Flux only."""
    tensors, pairs = _lora(env, layout)
    key_map = env.comfy.lora.model_lora_keys_unet(env.qwen.model, {})
    with caplog.at_level(logging.WARNING):
        patches = env.comfy.lora.load_lora(tensors, key_map)
    not_loaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    if layout not in ACCEPTED:
        assert patches == {} and len(not_loaded) == len(tensors)
        return
    assert not_loaded == [] and len(patches) == len(MODULES) == 28
    assert set(patches) == {f"diffusion_model.{m}.weight" for m in MODULES}
    patched = env.qwen.clone()
    assert len(patched.add_patches(patches, 1.0)) == len(MODULES)
    _assert_lora_applied(env, patched, pairs, ALPHA / RANK if LAYOUTS[layout]("x")[2] else 1.0)


def _loras_folder(env, monkeypatch, tmp_path):
    monkeypatch.setitem(env.folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))


def _load_with_node(env, name, strength=1.0, allow_partial=False, fallback_steps=4):
    return env.nodes.StudentLoraLoader.execute(env.aura, name, strength, allow_partial, fallback_steps).result


@pytest.mark.parametrize("layout", ACCEPTED)
def test_student_lora_loader_node_patches_every_module(env, layout, monkeypatch, tmp_path):
    """The node with allow_partial False: every module mapped, weights W + alpha / rank * up @ down (peft files take
    alpha from diffusers' lora_adapter_metadata header, as peft scales them), and without sampling metadata a gamma-0
    sampler on the trailing schedule, which is ComfyUI's Euler on the patched model."""
    _loras_folder(env, monkeypatch, tmp_path)
    tensors, pairs = _lora(env, layout, seed=3)
    header = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})} if layout == "peft" else None
    save_file(tensors, str(tmp_path / f"{layout}.safetensors"), metadata=header)
    patched, sampler, sigmas, report = _load_with_node(env, f"{layout}.safetensors")
    assert report == "28/28 LoRA modules mapped, 28 weights patched; no onestep sampling metadata"
    _assert_lora_applied(env, patched, pairs, ALPHA / RANK)
    torch.testing.assert_close(sigmas, env.nodes.FewStepSigmas.execute(env.aura, "trailing", 4, "", 0.0, 1.0).result[0])
    assert sampler.extra_options == {"gamma": 0.0}
    with_lora = _euler(env, patched, sigmas, 1.0)
    _assert_same_latent(_custom(env, patched, sampler, sigmas, 1.0), with_lora)
    assert float((with_lora - _euler(env, env.aura, sigmas, 1.0)).abs().max()) > 1e-3  # the LoRA changes the image

    half = _load_with_node(env, f"{layout}.safetensors", strength=0.5)[0]
    _assert_lora_applied(env, half, pairs, 0.5 * ALPHA / RANK)


def test_student_lora_loader_node_refuses_a_partial_qwen_lora(env, monkeypatch, tmp_path):
    _loras_folder(env, monkeypatch, tmp_path)
    tensors, pairs = _lora(env, "bare")
    tensors.update({"transformer_blocks.0.ff.net.0.proj.lora_down.weight": torch.zeros(RANK, WIDTH),  # a Flux module name
                    "transformer_blocks.0.ff.net.0.proj.lora_up.weight": torch.zeros(WIDTH, RANK)})
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError) as error:
        _load_with_node(env, "partial.safetensors")
    assert str(error.value) == ("lora_name partial.safetensors: only 28 of 29 LoRA modules map onto this model (unmapped: "
                                "transformer_blocks.0.ff.net.0.proj); set allow_partial to load them anyway.")
    patched, _, _, report = _load_with_node(env, "partial.safetensors", allow_partial=True)
    assert report.startswith("28/29 LoRA modules mapped, 28 weights patched")
    _assert_lora_applied(env, patched, pairs, ALPHA / RANK)


def _student_file(env, tmp_path, name, architecture, trained_times=None):
    """A 4-step DMD2 student LoRA (gamma 1, flow shift 3) for ``architecture``, in the bare layout (with
    ``trained_times``: a student trained at those sigmas, one step each)."""
    from onestep_pipelines import StudentMetadata
    from onestep_pipelines.schedulers import ConsistencyScheduler

    scheduler = ConsistencyScheduler(time_type="flow", shift=3.0, timestep_preset="dmd2", gamma=1.0, trained_times=trained_times)
    metadata = StudentMetadata.from_scheduler(scheduler, method="dmd2", architecture=architecture, num_inference_steps=len(trained_times or range(4)))
    tensors, pairs = _lora(env, "bare", seed=5)
    save_file(tensors, str(tmp_path / name), metadata={"onestep_student": metadata.to_json()})
    return pairs


def test_a_qwen_image_student_lora_samples_as_its_metadata_records(env, monkeypatch, tmp_path):
    _loras_folder(env, monkeypatch, tmp_path)
    pairs = _student_file(env, tmp_path, "student.safetensors", "qwen_image")
    patched, sampler, sigmas, report = _load_with_node(env, "student.safetensors", fallback_steps=7)
    assert report == "28/28 LoRA modules mapped, 28 weights patched; dmd2 student, ConsistencyScheduler, 4 steps, CFG 1"
    _assert_lora_applied(env, patched, pairs, ALPHA / RANK)
    assert sampler.extra_options == {"gamma": 1.0}
    torch.testing.assert_close(sigmas, env.nodes.FewStepSigmas.execute(env.aura, "dmd2", 4, "", 0.0, 1.0).result[0])
    assert torch.isfinite(_custom(env, patched, sampler, sigmas, 1.0)).all()


def test_a_student_trained_at_its_own_times_samples_there(env, monkeypatch, tmp_path):
    """A student trained with ``--sigmas 1,0.3`` records them (scheduler ``trained_times``): the loader's SIGMAS are
    those exact sigmas, not the preset's through the model's shift."""
    _loras_folder(env, monkeypatch, tmp_path)
    _student_file(env, tmp_path, "timed.safetensors", "qwen_image", trained_times=[1.0, 0.3])
    _, _, sigmas, report = _load_with_node(env, "timed.safetensors", fallback_steps=7)
    assert "2 steps" in report
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.3, 0.0]))


def test_the_lora_family_check_knows_qwen_image(env, monkeypatch, tmp_path):
    """A LoRA whose metadata says 'flux' is refused on Qwen-Image, naming both families."""
    assert env.adapters.model_architecture(env.qwen) == "qwen_image" == env.adapters.model_architecture(env.aura)
    _loras_folder(env, monkeypatch, tmp_path)
    _student_file(env, tmp_path, "flux_student.safetensors", "flux")
    with pytest.raises(Exception, match="is a LoRA for 'flux' models; this MODEL is 'qwen_image'"):
        _load_with_node(env, "flux_student.safetensors")


def test_a_qwen_image_lightning_file_samples_on_shift_3_whatever_the_models_shift(env, monkeypatch, tmp_path):
    """lightx2v's Qwen-Image-Lightning files carry no metadata (bare keys, lora_down / lora_up, .alpha): recognised by
    name, their recipe (static shift 3, 4 steps here, gamma 0) gives the SIGMAS, so on ComfyUI's default Qwen-Image
    sampling (shift 1.15) the node's output equals ComfyUI's Euler on the usual Lightning graph (ModelSamplingAuraFlow
    shift 3, simple schedule)."""
    _loras_folder(env, monkeypatch, tmp_path)
    tensors, pairs = _lora(env, "bare", seed=5)
    save_file(tensors, str(tmp_path / "Qwen-Image-Lightning-4steps-V1.0.safetensors"))
    patched, sampler, sigmas, report = env.nodes.StudentLoraLoader.execute(env.qwen, "Qwen-Image-Lightning-4steps-V1.0.safetensors", 1.0, False, 8).result
    assert report.startswith("28/28 LoRA modules mapped, 28 weights patched; recognised as qwen-image-lightning (lightx2v/Qwen-Image-Lightning)")
    assert sampler.extra_options == {"gamma": 0.0} and len(sigmas) == 5
    lightning_graph = env.comfy.samplers.calculate_sigmas(env.aura.get_model_object("model_sampling"), "simple", 4)
    torch.testing.assert_close(sigmas, lightning_graph.float(), rtol=0, atol=1e-3)
    _assert_lora_applied(env, patched, pairs, ALPHA / RANK)
    on_aura = _load_with_node(env, "Qwen-Image-Lightning-4steps-V1.0.safetensors")[0]
    _assert_same_latent(_custom(env, patched, sampler, sigmas, 1.0), _euler(env, on_aura, sigmas, 1.0))
