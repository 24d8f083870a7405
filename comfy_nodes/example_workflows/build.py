"""Writes the example workflows of the node pack: ``<name>.api.json`` (ComfyUI's API format, for ``/prompt``) and
``<name>.json`` (the UI format, for drag and drop and ComfyUI's template browser), from one description per workflow
below, into this folder (``comfy_nodes/example_workflows/``, installed with the package) and the UI files also into the
repository's ``example_workflows/`` (the folder ComfyUI reads in a clone in ``custom_nodes``: it looks for
``example_workflows`` only directly in a custom node's folder).

The UI format needs each node's widget order, which comes from a running ComfyUI's ``/object_info``:

    COMFYUI_DIR=/path/to/ComfyUI python comfy_nodes/example_workflows/build.py

starts one (with this repository as a custom node) and rewrites every file.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CLONE_EXAMPLES = os.path.join(REPO, "example_workflows")  # what ComfyUI serves from a clone of the repository


class Graph:
    """API-format workflow builder: ``g.node(class_type, **inputs)`` returns a node whose ``[i]`` is its output i."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def node(self, class_type: str, **inputs):
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return _Ref(node_id)


class _Ref:
    def __init__(self, node_id: str):
        self.node_id = node_id

    def __getitem__(self, index: int) -> list:
        return [self.node_id, index]


def _base(g: Graph, prompt: str = "a photo of a cat", flow: bool = False, xl: bool = False, ckpt_name: str | None = None):
    default = "sd3.5_medium_incl_clips.safetensors" if flow else "sd_xl_base_1.0.safetensors" if xl else "v1-5-pruned-emaonly.safetensors"
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_name or default)
    model = ckpt[0]
    if flow:
        model = g.node("ModelSamplingSD3", model=model, shift=3.0)[0]
    positive = g.node("CLIPTextEncode", text=prompt, clip=ckpt[1])
    negative = g.node("CLIPTextEncode", text="", clip=ckpt[1])
    latent = g.node("EmptyLatentImage", width=1024 if xl else 512, height=1024 if xl else 512, batch_size=1)
    return ckpt, model, positive, negative, latent


def _finish(g: Graph, ckpt, model, positive, negative, latent, sampler, sigmas, prefix: str, cfg: float = 1.0):
    out = g.node("SamplerCustom", model=model, add_noise=True, noise_seed=0, cfg=cfg, positive=positive[0], negative=negative[0],
                 sampler=sampler, sigmas=sigmas, latent_image=latent[0])
    image = g.node("VAEDecode", samples=out[0], vae=ckpt[2])
    g.node("SaveImage", images=image[0], filename_prefix=prefix)
    return g.nodes


def _sampler_workflow(preset: str, sampler: str, prefix: str, **sampler_inputs) -> dict:
    """One of our samplers on one of our sigma presets, on a plain SD 1.5 checkpoint."""
    g = Graph()
    ckpt, model, positive, negative, latent = _base(g)
    sigmas = g.node("OneStepSigmas", model=model, preset=preset, steps=4, timesteps="999,749,499,249", shift=0.0, denoise=1.0)
    node = g.node(sampler, **sampler_inputs)
    return _finish(g, ckpt, model, positive, negative, latent, node[0], sigmas[0], prefix)


def consistency_sampler() -> dict:
    """LCM / DMD2-style 4-step sampling: the consistency sampler (gamma 1) on the LCM preset."""
    return _sampler_workflow("lcm", "OneStepConsistencySampler", "onestep_consistency", gamma=1.0)


def tcd_custom_timesteps() -> dict:
    """TCD-style sampling (gamma 0.3) on a custom timestep list."""
    return _sampler_workflow("custom", "OneStepConsistencySampler", "onestep_tcd", gamma=0.3)


def tdm_sampler() -> dict:
    """A TDM student: the TDM sampler on the TDM preset."""
    return _sampler_workflow("tdm", "OneStepTDMSampler", "onestep_tdm")


def student_lora() -> dict:
    """A student LoRA: the loader patches the model and outputs the sampler and sigmas recorded in the file."""
    g = Graph()
    ckpt, model, positive, negative, latent = _base(g)
    lora = g.node("OneStepLoraLoader", model=model, lora_name="dmd2_student_comfyui.safetensors", strength=1.0, allow_partial=False, fallback_steps=4)
    return _finish(g, ckpt, lora[0], positive, negative, latent, lora[1], lora[2], "onestep_lora")


def tdd_lora() -> dict:
    """A TDD student LoRA (decoupled guidance): the loader's sampler (TCD, gamma 0.2) and sigmas, with classifier-free
    guidance on the student (cfg 1.5; a TDD student takes any scale, and its card says the one it records)."""
    g = Graph()
    ckpt, model, positive, negative, latent = _base(g)
    lora = g.node("OneStepLoraLoader", model=model, lora_name="tdd_student_comfyui.safetensors", strength=1.0, allow_partial=False, fallback_steps=4)
    return _finish(g, ckpt, lora[0], positive, negative, latent, lora[1], lora[2], "onestep_tdd_lora", cfg=1.5)


def flow_map_sampler() -> dict:
    """A flow-map (MeanFlow / flowmap) student on a flow model: r-conditioning + the flow-map sampler, 2 steps."""
    g = Graph()
    ckpt, model, positive, negative, latent = _base(g, flow=True)
    patched = g.node("OneStepFlowMapConditioning", model=model, r_embedder="r_embedder.safetensors")
    sigmas = g.node("OneStepSigmas", model=patched[0], preset="trailing", steps=2, timesteps="999,749,499,249", shift=0.0, denoise=1.0)
    sampler = g.node("OneStepFlowMapSampler", gamma=0.0)
    return _finish(g, ckpt, patched[0], positive, negative, latent, sampler[0], sigmas[0], "onestep_flowmap")


def diffusers_student() -> dict:
    """A diffusers-format student folder (models/diffusers/<name>) generating with its recorded scheduler."""
    g = Graph()
    image = g.node("OneStepDiffusersStudent", student="digits-dmd2-student", prompt="", class_labels="0,1,2,3,4,5,6,7,8,9", seed=0,
                   steps=0, guidance=-1.0, width=0, height=0, batch_size=1, substeps=0, lora="none", lora_strength=1.0)
    g.node("SaveImage", images=image[0], filename_prefix="onestep_diffusers")
    return g.nodes


def text_digits_lora_student() -> dict:
    """The shipped LoRA student text-digits-sd-lcm-lora (4-step consistency) on the shipped text-to-image teacher
    text-digits-sd, applied by the diffusers bridge (ComfyUI cannot detect UNets this small), sampling with the scheduler,
    steps and guidance the LoRA records: runs with nothing downloaded."""
    g = Graph()
    image = g.node("OneStepDiffusersStudent", student="text-digits-sd", prompt="a handwritten digit seven", class_labels="", seed=0,
                   steps=0, guidance=-1.0, width=0, height=0, batch_size=4, substeps=0, lora="text-digits-sd-lcm-lora",
                   lora_strength=1.0)
    g.node("SaveImage", images=image[0], filename_prefix="onestep_text_digits")
    return g.nodes


# ---------------------------------------------------------------------------- community few-step graphs, as their cards draw them
def _lora_model(g: Graph, model, lora_name: str):
    return g.node("LoraLoaderModelOnly", model=model, lora_name=lora_name, strength_model=1.0)[0]


def _scheduler(g: Graph, model, scheduler: str, steps: int):
    return g.node("BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=1.0)[0]


def lcm_lora() -> dict:
    """LCM-LoRA (latent-consistency/lcm-lora-sdv1-5): ModelSamplingDiscrete(lcm), 4 steps on the LCM grid, LCM sampling
    (gamma 1), CFG 1.5."""
    g = Graph()
    ckpt, model, positive, negative, latent = _base(g)
    model = g.node("ModelSamplingDiscrete", model=_lora_model(g, model, "lcm-lora-sdv1-5.safetensors"), sampling="lcm", zsnr=False)[0]
    sigmas = g.node("OneStepSigmas", model=model, preset="lcm", steps=4, timesteps="999,749,499,249", shift=0.0, denoise=1.0)
    sampler = g.node("OneStepConsistencySampler", gamma=1.0)
    return _finish(g, ckpt, model, positive, negative, latent, sampler[0], sigmas[0], "onestep_lcm_lora", cfg=1.5)


def tcd_lora() -> dict:
    """TCD LoRA (h1t/TCD-SDXL-LoRA): 4 steps, sgm_uniform, TCD sampling with gamma (TCD's eta) 0.3, CFG 1."""
    g = Graph()
    ckpt, model, positive, negative, latent = _base(g, xl=True)
    model = _lora_model(g, model, "TCD-SDXL-LoRA.safetensors")
    sampler = g.node("OneStepConsistencySampler", gamma=0.3)
    return _finish(g, ckpt, model, positive, negative, latent, sampler[0], _scheduler(g, model, "sgm_uniform", 4), "onestep_tcd_lora")


def hyper_sd_lora() -> dict:
    """Hyper-SD (ByteDance/Hyper-SD, Hyper-SDXL-8steps-lora): 8 steps, sgm_uniform, DDIM (gamma 0), CFG 1."""
    g = Graph()
    ckpt, model, positive, negative, latent = _base(g, xl=True)
    model = _lora_model(g, model, "Hyper-SDXL-8steps-lora.safetensors")
    sampler = g.node("OneStepConsistencySampler", gamma=0.0)
    return _finish(g, ckpt, model, positive, negative, latent, sampler[0], _scheduler(g, model, "sgm_uniform", 8), "onestep_hyper_sd")


def dmd2_unet() -> dict:
    """A DMD2 4-step SDXL UNet (tianweiy/DMD2) as a checkpoint: ModelSamplingDiscrete(eps), sgm_uniform, LCM-style
    sampling (gamma 1), CFG 1."""
    g = Graph()
    ckpt, model, positive, negative, latent = _base(g, xl=True, ckpt_name="dmd2_sdxl_4step.safetensors")
    model = g.node("ModelSamplingDiscrete", model=model, sampling="eps", zsnr=False)[0]
    sampler = g.node("OneStepConsistencySampler", gamma=1.0)
    return _finish(g, ckpt, model, positive, negative, latent, sampler[0], _scheduler(g, model, "sgm_uniform", 4), "onestep_dmd2")


def lightning_unet() -> dict:
    """SDXL-Lightning 4-step (ByteDance/SDXL-Lightning) as a checkpoint: ModelSamplingDiscrete(eps), sgm_uniform, Euler
    (gamma 0), CFG 1."""
    g = Graph()
    ckpt, model, positive, negative, latent = _base(g, xl=True, ckpt_name="sdxl_lightning_4step.safetensors")
    model = g.node("ModelSamplingDiscrete", model=model, sampling="eps", zsnr=False)[0]
    sampler = g.node("OneStepConsistencySampler", gamma=0.0)
    return _finish(g, ckpt, model, positive, negative, latent, sampler[0], _scheduler(g, model, "sgm_uniform", 4), "onestep_lightning")


def flow_sd3() -> dict:
    """A few-step SD3 student: ModelSamplingSD3(shift 3), the trailing preset, Euler (gamma 0)."""
    g = Graph()
    ckpt, model, positive, negative, latent = _base(g, flow=True)
    sigmas = g.node("OneStepSigmas", model=model, preset="trailing", steps=4, timesteps="999,749,499,249", shift=0.0, denoise=1.0)
    sampler = g.node("OneStepConsistencySampler", gamma=0.0)
    return _finish(g, ckpt, model, positive, negative, latent, sampler[0], sigmas[0], "onestep_sd3")


def flow_flux() -> dict:
    """A Flux student (FLUX.1-schnell style, 4 steps): ModelSamplingFlux at the image size, the trailing preset, Euler."""
    g = Graph()
    ckpt, model, positive, negative, latent = _base(g, ckpt_name="flux1-schnell-fp8.safetensors")
    model = g.node("ModelSamplingFlux", model=model, max_shift=1.15, base_shift=0.5, width=1024, height=1024)[0]
    sigmas = g.node("OneStepSigmas", model=model, preset="trailing", steps=4, timesteps="999,749,499,249", shift=0.0, denoise=1.0)
    sampler = g.node("OneStepConsistencySampler", gamma=0.0)
    return _finish(g, ckpt, model, positive, negative, latent, sampler[0], sigmas[0], "onestep_flux")


# ---------------------------------------------------------------------------- the 2026 families: published few-step LoRAs
def qwen_image_lightning() -> dict:
    """Qwen-Image-Lightning (lightx2v/Qwen-Image-Lightning, 8 steps) on ComfyUI's native Qwen-Image: the student LoRA
    loader recognises the file and outputs its recipe (Euler on shift 3, 8 steps, whatever the model's own shift 1.15),
    CFG 1."""
    g = Graph()
    model = g.node("UNETLoader", unet_name="qwen_image_fp8_e4m3fn.safetensors", weight_dtype="default")
    clip = g.node("CLIPLoader", clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors", type="qwen_image", device="default")
    vae = g.node("VAELoader", vae_name="qwen_image_vae.safetensors")
    lora = g.node("OneStepLoraLoader", model=model[0], lora_name="Qwen-Image-Lightning-8steps-V1.1.safetensors", strength=1.0, allow_partial=False,
                  fallback_steps=8)
    positive = g.node("CLIPTextEncode", text="a photo of a red fox in the snow", clip=clip[0])
    negative = g.node("CLIPTextEncode", text="", clip=clip[0])
    latent = g.node("EmptySD3LatentImage", width=1328, height=1328, batch_size=1)
    out = g.node("SamplerCustom", model=lora[0], add_noise=True, noise_seed=0, cfg=1.0, positive=positive[0], negative=negative[0], sampler=lora[1],
                 sigmas=lora[2], latent_image=latent[0])
    g.node("SaveImage", images=g.node("VAEDecode", samples=out[0], vae=vae[0])[0], filename_prefix="onestep_qwen_image_lightning")
    return g.nodes


def _bridge_lora(student: str, lora: str, strength: float, prefix: str, size: int = 1024) -> dict:
    g = Graph()
    image = g.node("OneStepDiffusersStudent", student=student, prompt="a photo of a red fox in the snow", class_labels="", seed=0, steps=0, guidance=-1.0,
                   width=size, height=size, batch_size=1, substeps=0, lora=lora, lora_strength=strength)
    g.node("SaveImage", images=image[0], filename_prefix=prefix)
    return g.nodes


def flux2_turbo_lora() -> dict:
    """FLUX.2-dev-Turbo (fal/FLUX.2-dev-Turbo) on a FLUX.2 [dev] diffusers folder (models/diffusers/FLUX.2-dev) through the
    diffusers bridge (this ComfyUI has no native FLUX.2): fal's 8 sigmas, guidance embedding 2.5, as the file's recipe."""
    return _bridge_lora("FLUX.2-dev", "flux.2-turbo-lora.safetensors", 1.0, "onestep_flux2_turbo")


def z_image_distill_lora() -> dict:
    """Z-Image-Fun-Lora-Distill (alibaba-pai, 8 steps) on a base Z-Image diffusers folder (models/diffusers/Z-Image)
    through the diffusers bridge (this ComfyUI has no native Z-Image): shift 3, no CFG, strength 0.8 as its card says."""
    return _bridge_lora("Z-Image", "Z-Image-Fun-Lora-Distill-8-Steps.safetensors", 0.8, "onestep_z_image_distill")


WORKFLOWS = {f.__name__: f for f in (consistency_sampler, tcd_custom_timesteps, tdm_sampler, student_lora, tdd_lora, flow_map_sampler, diffusers_student,
                                     text_digits_lora_student, lcm_lora, tcd_lora, hyper_sd_lora, dmd2_unet, lightning_unet, flow_sd3, flow_flux,
                                     qwen_image_lightning, flux2_turbo_lora, z_image_distill_lora)}


def to_ui(api: dict, object_info: dict) -> dict:
    """The UI (LiteGraph) form of an API workflow: nodes with widget values in ComfyUI's order, and links."""
    nodes, links = [], []
    outgoing: dict[tuple[str, int], list[int]] = {}
    for node_id, node in api.items():
        for value in node["inputs"].values():
            if isinstance(value, list):
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), value[1], int(node_id), None, None])
                outgoing.setdefault((value[0], value[1]), []).append(link_id)
    for order, (node_id, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        names = info.get("input_order", {}).get("required", []) + info.get("input_order", {}).get("optional", []) or list(spec)
        inputs, widgets = [], []
        for name in names:
            kind, options = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            value = node["inputs"].get(name)
            is_widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
            if is_widget and not isinstance(value, list):
                widgets.append(value)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
            elif value is not None:
                link_id = next(link[0] for link in links if link[3] == int(node_id) and link[4] is None and [str(link[1]), link[2]] == value)
                links[link_id - 1][4] = len(inputs)
                links[link_id - 1][5] = kind
                inputs.append({"name": name, "type": kind, "link": link_id})
        outputs = [
            {"name": out_name, "type": out_type, "links": outgoing.get((node_id, i), []), "slot_index": i}
            for i, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"]))
        ]
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [40 + 340 * (order % 4), 60 + 320 * (order // 4)], "size": [315, 130],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def write(name: str, data: dict, folder: str = HERE) -> None:
    path = os.path.join(folder, name)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main() -> None:
    import tempfile

    sys.path.insert(0, REPO)
    from onestep_pipelines.testing.comfyui import ComfyServer

    with tempfile.TemporaryDirectory() as base:
        os.makedirs(os.path.join(base, "custom_nodes"))
        with open(os.path.join(base, "custom_nodes", "onestep.py"), "w") as f:  # the installed package's entry point
            f.write("from onestep_pipelines.comfy_nodes import comfy_entrypoint  # noqa: F401\n")
        with ComfyServer(base) as server:
            object_info = server.get("/object_info")
    os.makedirs(CLONE_EXAMPLES, exist_ok=True)
    for name, make in WORKFLOWS.items():
        api = make()
        ui = to_ui(api, object_info)
        write(f"{name}.api.json", api)
        write(f"{name}.json", ui)
        write(f"{name}.json", ui, CLONE_EXAMPLES)
        print(f"wrote {name}.json and {name}.api.json (and example_workflows/{name}.json)")


if __name__ == "__main__":
    main()
