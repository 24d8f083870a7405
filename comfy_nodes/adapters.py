"""What the nodes do, as functions: ComfyUI objects in, ComfyUI objects out. Imported only inside ComfyUI.

The update rules, presets and LoRA key conversion live in ``onestep_pipelines`` (sampling core, students);
this module only translates ComfyUI's conventions: a model's ``model_sampling`` becomes a
:class:`~onestep_pipelines.sampling.SigmaSpace`, the target time ``r`` travels in
``model_options["transformer_options"]`` and reaches an r-conditioned model through a model patch.

The samplers and sigmas need only the sampling core; the LoRA and r-embedding functions import the library's metadata,
students and models (diffusers, peft) when first called, so a workflow without them never loads those.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

import comfy.lora
import comfy.model_sampling
import comfy.samplers

from onestep_pipelines.sampling import SigmaSpace, few_step_sigmas, sample_consistency, sample_flow_map

if TYPE_CHECKING:  # the LoRA functions import these (and with them diffusers and peft) when first called
    from onestep_pipelines.metadata import StudentMetadata

R_KEY = "onestep_r_sigma"  # transformer_options entry carrying the flow-map target sigma
R_PATCH_KEY = "onestep_r_conditioning"  # model_options flag set by the r-conditioning patch
ARCHITECTURES = {"SD15": "sd", "SDXL": "sdxl", "SD3": "sd3", "Flux": "flux", "FluxSchnell": "flux", "QwenImage": "qwen_image"}
log = logging.getLogger("onestep_pipelines")


# ------------------------------------------------------------------------------------------ time
def sigma_space(model_sampling) -> SigmaSpace:
    """Rectified flow (``CONST``) or a discrete VP model (epsilon / v); anything else is refused.

    A VP model's table is its sigma at every training timestep, read through its own ``sigma(timestep)``: the full
    1000-step table for ModelSamplingDiscrete, and for ModelSamplingDiscrete(sampling=lcm) (a 50-entry table of the
    LCM grid) the same sigmas on that grid, interpolated between, as ComfyUI does."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return SigmaSpace(flow=True)
    discrete = isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and not isinstance(
        model_sampling, (comfy.model_sampling.ModelSamplingDiscreteEDM, comfy.model_sampling.StableCascadeSampling)
    )
    if discrete and isinstance(model_sampling, comfy.model_sampling.EPS) and not isinstance(model_sampling, comfy.model_sampling.EDM):
        steps = int(getattr(model_sampling, "num_timesteps", len(model_sampling.sigmas)))
        table = model_sampling.sigma(torch.arange(steps, dtype=torch.float32)).detach().float().cpu()
        return SigmaSpace(flow=False, discrete_sigmas=table)
    raise ValueError(
        f"onestep samplers support rectified-flow models (SD3, Flux, ...) and discrete VP models (SD 1.5 / SDXL, epsilon or v); "
        f"this model samples with {type(model_sampling).__name__}."
    )


def model_sigmas(model, steps: int, preset: str, timesteps: list[float] | None, shift: float, denoise: float) -> torch.Tensor:
    """SIGMAS of a few-step schedule for ``model`` (a ModelPatcher), converted with its own model_sampling."""
    ms = model.get_model_object("model_sampling")
    multiplier = float(getattr(ms, "multiplier", 1.0))
    own_shift = lambda u: ms.sigma(torch.as_tensor(u, dtype=torch.float32) * multiplier).float()  # noqa: E731
    space = sigma_space(ms)
    steps_of_grid = 1000 if space.flow else len(space.discrete_sigmas)
    return few_step_sigmas(
        space, steps, preset=preset, timesteps=timesteps, shift=shift if shift > 0 else None, denoise=denoise, flow_shift=own_shift,
        num_train_timesteps=steps_of_grid,
    )


# -------------------------------------------------------------------------------------- samplers
def _model_sampling(model):
    return model.inner_model.inner_model.model_sampling  # KSamplerX0Inpaint -> CFGGuider wrapper -> BaseModel


def comfy_consistency(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=1.0):
    """KSAMPLER function: :func:`~onestep_pipelines.sampling.sample_consistency` in the model's sigma space."""
    return sample_consistency(model, x, sigmas, extra_args, callback, disable, gamma=gamma, space=sigma_space(_model_sampling(model)))


def _pass_r(extra_args: dict, r_sigma: torch.Tensor) -> dict:
    model_options = dict(extra_args.get("model_options", {}))
    model_options["transformer_options"] = {**model_options.get("transformer_options", {}), R_KEY: r_sigma}
    return {**extra_args, "model_options": model_options}


def comfy_flow_map(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=0.0):
    """KSAMPLER function: :func:`~onestep_pipelines.sampling.sample_flow_map`, ``r`` in transformer_options."""
    extra_args = {} if extra_args is None else extra_args
    if not sigma_space(_model_sampling(model)).flow:
        raise ValueError("the flow-map sampler needs a rectified-flow model (SD3, Flux, or a model patched with ModelSamplingSD3).")
    if not extra_args.get("model_options", {}).get(R_PATCH_KEY):
        raise ValueError(
            "the flow-map sampler sends a second time r, but this MODEL does not take one: apply "
            "'Flow-Map r-Conditioning (onestep)' with the student's r_embedder.safetensors first."
        )
    return sample_flow_map(model, x, sigmas, extra_args, callback, disable, gamma=gamma, pass_r=_pass_r)


def consistency_sampler(gamma: float):
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
    return comfy.samplers.KSAMPLER(comfy_consistency, extra_options={"gamma": float(gamma)})


def flow_map_sampler(gamma: float):
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
    return comfy.samplers.KSAMPLER(comfy_flow_map, extra_options={"gamma": float(gamma)})


# -------------------------------------------------------------------------------- r-conditioning
TIME_EMBEDDINGS = {"UNetModel": "time_embed", "MMDiT": "t_embedder", "OpenAISignatureMMDITWrapper": "t_embedder", "Flux": "time_in",
                   "QwenImageTransformer2DModel": "time_text_embed"}


class RTimeEmbedding(torch.nn.Module):
    """The model's time embedding plus ``r_embedder(t - r)`` (the adapter of ``add_r_conditioning``) while an
    interval is set; exactly the original module otherwise."""

    def __init__(self, original: torch.nn.Module, r_embedder: torch.nn.Module):
        super().__init__()
        self.original, self.r_embedder = original, r_embedder
        self.interval = None

    def forward(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        if self.interval is None:
            return out
        interval = self.interval.to(out.device).float().expand(out.shape[0]) if self.interval.numel() == 1 else self.interval.to(out.device).float()
        return out + self.r_embedder.to(out.device)(interval).to(out.dtype)


def r_embedder_from_file(path: str) -> torch.nn.Module:
    """The second-time embedding saved with an r-conditioned student (``r_embedder.safetensors``)."""
    tensors, _ = read_safetensors(path, "r_embedder")
    return r_embedder_from_tensors({k.removeprefix("r_embedder."): v for k, v in tensors.items()}, path, "r_embedder")


def r_embedder_from_tensors(tensors: dict, source: str, what: str) -> torch.nn.Module:
    """The second-time embedding from its tensors (an r_embedder file, or the ``onestep_r_embedder.*`` keys of a
    student's ComfyUI LoRA file); errors name the node input ``what`` and the file ``source``."""
    from diffusers.models.embeddings import Timesteps

    from onestep_pipelines.models.r_conditioning import IntervalEmbedding

    expected = {"embedding.linear_1.weight", "embedding.linear_1.bias", "embedding.linear_2.weight", "embedding.linear_2.bias"}
    if set(tensors) != expected:
        raise ValueError(f"{what} {os.path.basename(source)} holds no second-time embedding of this package (keys {sorted(tensors)[:4]}); "
                         "use the r_embedder.safetensors or the _comfyui.safetensors file written with the student.")
    channels, embed_dim = tensors["embedding.linear_1.weight"].shape[1], tensors["embedding.linear_2.weight"].shape[0]
    module = IntervalEmbedding(Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0), embed_dim)
    module.load_state_dict(tensors)
    return module.eval()


def patch_r_conditioning(model, r_embedder: torch.nn.Module):
    """A clone of ``model`` whose denoiser takes the flow-map target time sent by the flow-map sampler."""
    diffusion_model = model.get_model_object("diffusion_model")
    name = TIME_EMBEDDINGS.get(type(diffusion_model).__name__)
    if name is None:
        raise ValueError(f"r-conditioning supports UNet, SD3 (MMDiT), Flux and Qwen-Image denoisers, not {type(diffusion_model).__name__}.")
    original = getattr(diffusion_model, name)
    width = _out_features(original)
    if width != r_embedder.embedding.linear_2.out_features:
        raise ValueError(f"this r_embedder makes {r_embedder.embedding.linear_2.out_features}-wide embeddings; the model's time embedding is {width} wide (another base model).")
    wrapped = RTimeEmbedding(original, r_embedder)
    ms = model.get_model_object("model_sampling")
    previous = model.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        r = args["c"].get("transformer_options", {}).get(R_KEY)
        if r is not None:  # the interval in the units of the model's timestep (x 1000 for flow models, as in diffusers)
            sigma = args["timestep"]
            scale = 1000.0 / float(getattr(ms, "multiplier", 1.0)) if isinstance(ms, comfy.model_sampling.CONST) else 1.0
            wrapped.interval = (ms.timestep(sigma) - ms.timestep(r.flatten()[0].to(sigma))) * scale
        try:
            return previous(apply_model, args) if previous is not None else apply_model(args["input"], args["timestep"], **args["c"])
        finally:
            wrapped.interval = None

    patched = model.clone()
    patched.add_object_patch(f"diffusion_model.{name}", wrapped)
    patched.set_model_unet_function_wrapper(wrapper)
    patched.model_options[R_PATCH_KEY] = True
    return patched


def _out_features(module: torch.nn.Module) -> int:
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].out_features


# ------------------------------------------------------------------------------------------ LoRA
def read_safetensors(path: str, what: str) -> tuple[dict, dict]:
    """``(tensors, header)`` of a safetensors file, with an error naming the file and the input it came from."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as error:  # safetensors raises its own SafetensorError for damaged files
        raise ValueError(f"{what} {os.path.basename(path)}: not a readable safetensors file ({error}); "
                         "download or copy it again.") from None


def read_lora(path: str) -> tuple[dict, StudentMetadata | None, dict]:
    from onestep_pipelines.metadata import metadata_from_header

    tensors, header = read_safetensors(path, "lora_name")
    return tensors, metadata_from_header(header, f"lora_name {os.path.basename(path)}"), header


def published_recipe(path: str, architecture: str | None):
    """``(metadata, entry)`` of a published few-step LoRA recognised by its file name (Qwen-Image-Lightning, ...) for a
    model of ``architecture``, else ``(None, None)``: the recipe its authors give, as our own students record it."""
    from onestep_pipelines.students.published import published_lora

    entry = published_lora(path, architecture) if architecture is not None else None
    return (entry.metadata(path), entry) if entry is not None else (None, None)


def model_architecture(model) -> str | None:
    return ARCHITECTURES.get(type(model.model.model_config).__name__)


def lora_patches(model, tensors: dict, header: dict) -> tuple[dict, int, list[str]]:
    """``(ComfyUI patches, modules in the file, file modules that match nothing in this model)``."""
    from onestep_pipelines.students.lora import comfyui_ready

    ready, n_modules = comfyui_ready(tensors, header)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(ready, key_map, log_missing=False)
    stems = {k.rsplit(".", 2)[0] for k in ready if k.endswith((".lora_down.weight", ".lora_A.weight"))}
    mapped = {s for s in stems if s in key_map and _target(key_map[s]) in patches}
    return patches, n_modules, sorted(stems - mapped)


def _target(value):
    return value[0] if isinstance(value, tuple) else value


def load_lora(model, path: str, strength: float, allow_partial: bool):
    """``(patched model, metadata, report)``; refuses a LoRA for another architecture, and a partial load unless
    ``allow_partial``. An r-conditioned (flow-map / MeanFlow) student also gets its second-time embedding (from the
    file's ``onestep_r_embedder.*`` keys, or an ``r_embedder.safetensors`` beside it)."""
    from onestep_pipelines.students.lora import COMFYUI_R_PREFIX

    name = os.path.basename(path)
    tensors, metadata, header = read_lora(path)
    r_tensors = {k[len(COMFYUI_R_PREFIX):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(COMFYUI_R_PREFIX)]}
    architecture = model_architecture(model)
    if metadata is not None and architecture is not None and metadata.architecture != architecture:
        raise ValueError(f"lora_name {name} is a LoRA for {metadata.architecture!r} models; this MODEL is {architecture!r}: load its base model.")
    published = None
    if metadata is None:
        metadata, published = published_recipe(path, architecture)
    patches, n_modules, unmapped = lora_patches(model, tensors, header)
    if n_modules == 0:
        raise ValueError(f"lora_name {name} holds no LoRA pairs (lora_A/lora_B or lora_down/lora_up).")
    if len(unmapped) == n_modules:
        raise ValueError(f"lora_name {name}: none of its {n_modules} LoRA modules exists in this {architecture or 'model'}; a LoRA for another base model?")
    if unmapped and not allow_partial:
        shown = ", ".join(unmapped[:3]) + (" ..." if len(unmapped) > 3 else "")
        raise ValueError(f"lora_name {name}: only {n_modules - len(unmapped)} of {n_modules} LoRA modules map onto this model "
                         f"(unmapped: {shown}); set allow_partial to load them anyway.")
    patched = model.clone()
    applied = patched.add_patches(patches, strength)
    report = f"{n_modules - len(unmapped)}/{n_modules} LoRA modules mapped, {len(applied)} weights patched"
    if published is not None:
        report += f"; recognised as {published.name} ({published.repo}): sampling as its recipe says"
        if strength != published.strength:
            report += f" (its authors recommend strength {published.strength:g})"
    if metadata is not None and metadata.scheduler_config.get("prediction_type") == "v_prediction":
        patched = with_v_prediction(patched, name)
        report += ", v-prediction sampling"
    if metadata is not None and metadata.r_conditioning:
        beside = os.path.join(os.path.dirname(path), "r_embedder.safetensors")
        if r_tensors:
            r_embedder = r_embedder_from_tensors(r_tensors, path, "lora_name")
        elif os.path.isfile(beside):
            r_embedder = r_embedder_from_file(beside)
        else:
            raise ValueError(f"lora_name {name} is a flow-map student (it takes a second time r) but carries no r-embedding and no "
                             "r_embedder.safetensors lies beside it: use the student's _comfyui.safetensors file.")
        patched = patch_r_conditioning(patched, r_embedder)
        report += ", second-time embedding applied"
    log.info("onestep LoRA %s: %s", path, report)
    return patched, metadata, report


def with_v_prediction(model, name: str):
    """``model`` (a ModelPatcher) reading its output as v (a student switched to v-prediction, e.g. progressive
    distillation of an epsilon SD model), as ComfyUI's ModelSamplingDiscrete node does for ``v_prediction``; its noise
    table is kept."""
    ms = comfy.model_sampling
    current = model.get_model_object("model_sampling")
    output = type(current).calculate_denoised
    table = isinstance(current, ms.ModelSamplingDiscrete) and type(current).sigma is ms.ModelSamplingDiscrete.sigma  # the 1000-step table
    if table and output is ms.V_PREDICTION.calculate_denoised:
        return model
    if not (table and output is ms.EPS.calculate_denoised):
        raise ValueError(f"lora_name {name} is a v-prediction student of a discrete VP model; this MODEL samples with {type(current).__name__}: "
                         "load the base model it was trained on.")

    class VPrediction(ms.ModelSamplingDiscrete, ms.V_PREDICTION):
        pass

    sampling = VPrediction(model.model.model_config)
    sampling.set_sigmas(current.sigmas.detach().clone())
    patched = model.clone()
    patched.add_object_patch("model_sampling", sampling)
    return patched


def student_sampling(model, metadata: StudentMetadata | None, fallback_steps: int):
    """SAMPLER and SIGMAS recorded in a student's metadata (gamma, preset or the times it was trained at, steps); without metadata a
    deterministic (gamma 0) sampler on the uniform schedule with ``fallback_steps``."""
    if metadata is None:
        return consistency_sampler(0.0), model_sigmas(model, fallback_steps, "trailing", None, 0.0, 1.0)
    config = metadata.scheduler_config
    gamma = float(config.get("gamma", 0.0 if metadata.scheduler_class == "TDMScheduler" else 1.0))
    sampler = flow_map_sampler(gamma) if metadata.r_conditioning else consistency_sampler(gamma)
    preset = config.get("timestep_preset") or ("tdm" if metadata.scheduler_class == "TDMScheduler" else "trailing")
    # a flow student recorded on a static shift samples on it whatever the MODEL's own (Qwen-Image-Lightning: 3, where
    # ComfyUI's Qwen-Image default is 1.15); dynamic-shift and VP students on the MODEL's model_sampling
    flow_model = isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    static = flow_model and metadata.time_type == "flow" and not config.get("use_dynamic_shifting", False)
    trained = config.get("trained_times")
    if trained and len(trained) == metadata.num_inference_steps:  # where the student was trained: exact sigmas / timesteps
        flow = metadata.time_type == "flow"
        return sampler, model_sigmas(model, len(trained), "trailing", [t * 1000 if flow else t for t in trained], 1.0 if flow and flow_model else 0.0, 1.0)
    sigmas = model_sigmas(model, metadata.num_inference_steps, preset, None, float(config.get("shift", 1.0)) if static else 0.0, 1.0)
    return sampler, sigmas


def describe(metadata: StudentMetadata | None) -> str:
    if metadata is None:
        return "no onestep sampling metadata"
    guidance = "CFG 1 (guidance baked in)" if metadata.guidance_baked else f"CFG {metadata.guidance_scale:g}"
    return f"{metadata.method} student, {metadata.scheduler_class}, {metadata.num_inference_steps} steps, {guidance}"

