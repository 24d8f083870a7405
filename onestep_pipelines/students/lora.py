"""LoRA students: files for diffusers and for ComfyUI, and a loader that never loads half a LoRA.

``save_student_lora`` writes, for a denoiser that carries a peft LoRA adapter (diffusers' ``add_adapter``):

- ``pytorch_lora_weights.safetensors``: diffusers / peft keys (``unet.<module>.lora_A.weight``), with the
  adapter's ``LoraConfig`` in the header (``lora_adapter_metadata``, so ``lora_alpha`` survives a reload in
  diffusers) and the student's sampling metadata (``onestep_student``);
- ``<stem>_comfyui.safetensors``: what ComfyUI's LoRA loader maps completely: kohya keys
  (``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight``) for UNets, ``transformer.<module>.lora_A``
  / ``lora_B`` keys for SD3 and Flux, and a ``<module>.alpha`` tensor holding the real alpha (ComfyUI scales by
  alpha / rank only when that tensor exists; diffusers' kohya converter writes the rank there instead);
- ``adapter_config.json``: the ``LoraConfig`` plus the sampling metadata;
- ``r_embedder.safetensors`` for r-conditioned students (the full weights of the second-time embedding); the ComfyUI
  file carries them too, as ``onestep_r_embedder.*`` (the node pack's loader applies them; ComfyUI's stock loader
  only logs them as keys it does not load).

``load_student_lora`` reads either weight file (local file or folder, or a Hub repo), checks that *every* LoRA
module maps onto the pipeline's denoiser with matching shapes (else an error listing the unmatched keys),
injects it with diffusers' ``load_lora_adapter``, optionally fuses it, and sets the scheduler from the metadata.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter

import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from ..hub import DIFFUSERS_WEIGHT_NAME, R_EMBEDDER_WEIGHT_NAME
from ..models.r_conditioning import add_r_conditioning, takes_r_timestep
from ..pipelines.mixin import FewStepPipelineMixin, architecture_of
from ..pipelines.loading import PICKLE_SUFFIXES, atomic_path, write_atomically
from ..metadata import METADATA_KEY, StudentMetadata
from .published import published_lora

logger = logging.getLogger(__name__)

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the LoraConfig
COMFYUI_R_PREFIX = "onestep_r_embedder."  # the second-time embedding inside a ComfyUI file


def _denoiser_of(pipe_or_model):
    for name in ("unet", "transformer"):
        model = getattr(pipe_or_model, name, None)
        if model is not None and not isinstance(pipe_or_model, torch.nn.Module):
            return name, model
    return ("unet" if architecture_of(pipe_or_model) in ("sd", "sdxl") else "transformer"), pipe_or_model


def _r_module(model) -> torch.nn.Module:
    """The second-time embedding of an r-conditioned model (``r_embedder``; ``r_embed`` in the digits model)."""
    module = getattr(model, "r_embedder", None) or getattr(model, "r_embed", None)
    if module is None or not takes_r_timestep(model):
        raise ValueError(f"{type(model).__name__} takes no second time r: add it with add_r_conditioning().")
    return module


def _module_alphas(model, adapter_name: str) -> dict[str, float]:
    """Effective alpha of each LoRA module: ComfyUI scales by alpha / rank, peft by ``scaling`` (alpha / r, or
    alpha / sqrt(r) with rsLoRA, with rank_pattern / alpha_pattern applied), so alpha = scaling * r."""
    return {
        name: float(module.scaling[adapter_name] * module.r[adapter_name])
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.r
    }


def comfyui_state_dict(lora: dict, alphas: dict[str, float], prefix: str) -> dict:
    """ComfyUI-ready tensors from a peft state dict (``<module>.lora_A.weight`` keys): kohya names for UNets
    (``prefix="unet"``), ``transformer.*`` names for SD3 / Flux; each module gets its real ``.alpha``."""
    if prefix == "unet":
        out = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora.items()})
        names = {module.replace(".", "_"): module for module in alphas}
        for key in [k for k in out if k.endswith(".alpha")]:
            out[key] = torch.tensor(alphas[names[key[: -len(".alpha")].removeprefix("lora_unet_")]])
        return out
    out = {f"transformer.{k}": v for k, v in lora.items()}
    out.update({f"transformer.{module}.alpha": torch.tensor(alpha) for module, alpha in alphas.items()})
    return out


COMFYUI_SUFFIXES = {"unet": (".lora_down.weight", ".lora_up.weight", ".alpha"), "transformer": (".lora_A.weight", ".lora_B.weight", ".alpha")}


def comfyui_unmapped_keys(keys, model) -> list[str]:
    """Keys of a ComfyUI-ready file that ComfyUI's LoRA loader would not apply to ``model``'s architecture.

    ComfyUI's rules (``comfy/lora.py``, ``model_lora_keys_unet``): for SD1.5 / SDXL UNets it accepts kohya names
    ``lora_unet_<diffusers module, "." -> "_">`` for every weight of a stock ``UNet2DConditionModel``; for SD3 and
    Flux ``transformer.<diffusers module>`` for every Linear of the stock transformer. A LoRA pair is read as
    ``lora_down`` / ``lora_up`` (or ``lora_A`` / ``lora_B``), scaled by ``<module>.alpha`` / rank when that tensor
    exists (else by 1). Modules this package adds (``r_embedder``) are unknown to ComfyUI.
    """
    prefix = "unet" if architecture_of(model) in ("sd", "sdxl") else "transformer"
    layers = (torch.nn.Linear, torch.nn.Conv2d) if prefix == "unet" else (torch.nn.Linear,)
    stock = {
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "base_layer", module), layers) and not any(p in name for p in (".base_layer", ".lora_", "r_embedder"))
    }
    known = {f"lora_unet_{n.replace('.', '_')}" for n in stock} if prefix == "unet" else {f"transformer.{n}" for n in stock}
    unmapped = []
    for key in keys:
        if key.startswith(COMFYUI_R_PREFIX):
            continue
        suffix = next((s for s in COMFYUI_SUFFIXES[prefix] if key.endswith(s)), None)
        if suffix is None or key[: -len(suffix)] not in known:
            unmapped.append(key)
    return unmapped


def _header_alpha(config: dict, module: str, rank: int) -> float:
    """ComfyUI alpha (scale x rank) of ``module`` under a peft ``LoraConfig`` dict (patterns as peft matches them)."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            alpha = value
            break
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return float(scale * rank)


def comfyui_ready(tensors: dict, header: dict | None = None) -> tuple[dict, int]:
    """Any diffusers / peft / kohya LoRA -> ``(tensors ComfyUI's loader maps, number of LoRA modules)``.

    diffusers-peft UNet keys (``unet.<module>.lora_A.weight``), which ComfyUI does not map, become kohya keys
    (``lora_unet_<module, "." -> "_">.lora_down.weight``); ``transformer.*``, kohya and ComfyUI keys pass through.
    Modules without an ``.alpha`` tensor get the alpha of diffusers' ``lora_adapter_metadata`` header
    (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), so ComfyUI (alpha / rank) scales exactly like peft.
    """
    configs = {}
    if header and ADAPTER_METADATA_KEY in header:
        flat = json.loads(header[ADAPTER_METADATA_KEY])
        for prefix in ("unet", "transformer"):
            configs[prefix] = {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(f"{prefix}.")}
    parts = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "alpha": "alpha"}
    out, modules = {}, {}  # modules: output stem -> (prefix, diffusers module name, rank)
    for key, value in tensors.items():
        prefix = key.partition(".")[0]
        leaf = next((p for p in parts if key.endswith("." + p)), None)
        if prefix in ("unet", "transformer") and leaf is not None:
            module = key[len(prefix) + 1 : -len(leaf) - 1]
            stem = f"lora_unet_{module.replace('.', '_')}" if prefix == "unet" else f"transformer.{module}"
            out[f"{stem}.{parts[leaf] if prefix == 'unet' else leaf}"] = value
            if leaf == "lora_A.weight":
                modules[stem] = (prefix, module, int(value.shape[0]))
        else:
            out[key] = value
    for stem, (prefix, module, rank) in modules.items():
        if f"{stem}.alpha" not in out and prefix in configs:
            out[f"{stem}.alpha"] = torch.tensor(_header_alpha(configs[prefix], module, rank))
    return out, len({k.rsplit(".", 2)[0] for k in out if k.endswith((".lora_down.weight", ".lora_A.weight"))})


def save_student_lora(
    save_directory: str,
    pipe_or_model,
    metadata: StudentMetadata,
    adapter_name: str = "default",
    comfyui: bool = True,
    file_stem: str = "student",
) -> dict[str, str]:
    """Write a LoRA student (see the module docstring); returns ``{"diffusers": path, "comfyui": path, ...}``.

    Args:
        save_directory: output folder (created).
        pipe_or_model: a pipeline, or its UNet / transformer, carrying the peft adapter ``adapter_name``.
        metadata: how the student samples (:class:`StudentMetadata`); its architecture must match the model.
        comfyui: also write ``<file_stem>_comfyui.safetensors`` (not for the digits model, which ComfyUI cannot run).
    """
    prefix, model = _denoiser_of(pipe_or_model)
    if architecture_of(model) != metadata.architecture:
        raise ValueError(f"metadata.architecture={metadata.architecture!r} but the model is {architecture_of(model)!r}.")
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is None:
        raise ValueError(f"The {prefix} has no LoRA adapter named {adapter_name!r} (adapters: {list(getattr(model, 'peft_config', {}))}).")
    if config.use_dora or config.lora_bias:
        raise ValueError("DoRA and LoRA-bias adapters are not supported by save_student_lora.")
    lora = get_peft_model_state_dict(model, adapter_name=adapter_name)
    alphas = _module_alphas(model, adapter_name)
    config_dict = json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    student_json = metadata.to_json()
    header = {"format": "pt", METADATA_KEY: student_json}
    # everything is built and checked before the first file is written
    files = {"diffusers": (DIFFUSERS_WEIGHT_NAME, {f"{prefix}.{k}": v for k, v in lora.items()},
                           {**header, ADAPTER_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config_dict.items()})})}
    if comfyui and metadata.architecture != "digits":
        tensors = comfyui_state_dict(lora, alphas, prefix)
        unmapped = comfyui_unmapped_keys(tensors, model)
        if unmapped:
            raise ValueError(
                f"{len(unmapped)} LoRA keys would not load in ComfyUI (modules outside the stock {metadata.architecture} "
                f"model, e.g. r_embedder): {unmapped[:8]}. Leave them out of target_modules or pass comfyui=False."
            )
        rank = Counter(int(v.shape[0]) for k, v in lora.items() if k.endswith("lora_A.weight")).most_common(1)[0][0]
        files["comfyui"] = (f"{file_stem}_comfyui.safetensors", tensors, {**header, "ss_network_dim": str(rank), "ss_network_alpha": str(config.lora_alpha)})
    if metadata.r_conditioning:  # full weights of the second-time embedding (a LoRA on it is in the main file)
        base = {k.replace(".base_layer", ""): v for k, v in _r_module(model).state_dict().items() if ".lora_" not in k}
        files["r_embedder"] = (R_EMBEDDER_WEIGHT_NAME, base, header)
        if "comfyui" in files:
            files["comfyui"][1].update({COMFYUI_R_PREFIX + k: v for k, v in base.items()})
    os.makedirs(save_directory, exist_ok=True)
    paths = {}
    for kind, (name, tensors, file_header) in files.items():
        paths[kind] = os.path.join(save_directory, name)
        with atomic_path(paths[kind]) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=file_header)
    paths["config"] = os.path.join(save_directory, "adapter_config.json")
    write_atomically(paths["config"], json.dumps({**config_dict, METADATA_KEY: metadata.to_dict()}, indent=2, sort_keys=True) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------- loading
def _resolve(path_or_repo: str, weight_name: str | None, allow_pickle: bool, **hub_kwargs) -> str:
    """Local file, local folder or Hub repo id -> path of the LoRA weight file."""
    if os.path.isfile(path_or_repo):
        path = path_or_repo
    elif os.path.isdir(path_or_repo):
        if weight_name is None:
            names = sorted(os.listdir(path_or_repo))
            weight_name = DIFFUSERS_WEIGHT_NAME if DIFFUSERS_WEIGHT_NAME in names else None
            candidates = [n for n in names if n.endswith(".safetensors") and n != R_EMBEDDER_WEIGHT_NAME]
            if weight_name is None and len(candidates) == 1:
                weight_name = candidates[0]
            if weight_name is None:
                pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
                raise ValueError(
                    f"{path_or_repo} holds no single LoRA safetensors file (found {candidates + pickled}); pass weight_name=."
                )
        path = os.path.join(path_or_repo, weight_name)
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(path_or_repo, weight_name or DIFFUSERS_WEIGHT_NAME, **hub_kwargs)
    if path.endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise ValueError(f"{path} is a pickle file, which can run code when loaded; use safetensors or pass allow_pickle=True.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No LoRA file at {path}.")
    return path


def _read(path: str) -> tuple[dict, dict]:
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    return torch.load(path, map_location="cpu", weights_only=True), {}  # allow_pickle was given


# the LoRA layouts in circulation: prefixes before the module name, and the names of a pair's halves and its alpha
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te_")
_PARTS = {"lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
          "lora.down.weight": "lora_A.weight", "lora.up.weight": "lora_B.weight", "lora_A.default.weight": "lora_A.weight",
          "lora_B.default.weight": "lora_B.weight", "alpha": "alpha"}


def _module_and_part(key: str, modules: dict, kohya_names: dict, prefix: str) -> tuple[str | None, str | None]:
    """``(module of the model, part)`` of one LoRA key in any common layout: diffusers / peft (``<prefix>.<module>.lora_A``),
    bare module names (lightx2v's Lightning files), ``diffusion_model.`` (ComfyUI / original repos), ``base_model.model.``
    (peft), kohya (``lora_unet_<module with _>``, also with a stray ``_`` as VideoX-Fun writes it); halves named
    ``lora_A`` / ``lora_B``, ``lora_down`` / ``lora_up`` or ``lora.down`` / ``lora.up``, and ``.alpha``."""
    leaf = next((p for p in _PARTS if key.endswith("." + p)), None)
    if leaf is None:
        return None, None
    body = key[: -len(leaf) - 1]
    if body.startswith(_KOHYA_PREFIXES):
        stem = body.split("_", 2)[2].lstrip("_")
        return kohya_names.get(stem), _PARTS[leaf]
    for start in (*_PREFIXES, f"{prefix}."):
        if body.startswith(start):
            body = body[len(start):]
            break
    return (body if body in modules else None), _PARTS[leaf]


def _to_peft(tensors: dict, model, prefix: str) -> tuple[dict, dict[str, float], list[str]]:
    """Any supported key layout (:func:`_module_and_part`) -> (peft state dict, alpha per module, keys that do not map)."""
    modules = dict(model.named_modules())
    kohya_names = {name.replace(".", "_"): name for name in modules}
    lora, alphas, unmatched = {}, {}, []
    for key, value in tensors.items():
        module, part = _module_and_part(key, modules, kohya_names, prefix)
        if module is None:
            unmatched.append(key)
        elif part == "alpha":
            alphas[module] = float(value)
        else:
            lora[f"{module}.{part}"] = value
    for module in {k.rsplit(".", 2)[0] for k in lora}:  # both halves of every pair
        missing = [part for part in ("lora_A", "lora_B") if f"{module}.{part}.weight" not in lora]
        if missing:
            unmatched.append(f"{module} (no {' / '.join(missing)} weight)")
    for key, value in lora.items():  # shapes must fit the layer they patch
        module, part = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        layer = modules[module]
        layer = getattr(layer, "base_layer", layer)
        expected = getattr(layer, "in_features", getattr(layer, "in_channels", None)) if part == "lora_A" else getattr(
            layer, "out_features", getattr(layer, "out_channels", None)
        )
        got = value.shape[1] if part == "lora_A" else value.shape[0]
        if expected != got:
            unmatched.append(f"{key} (shape {tuple(value.shape)} does not fit {type(layer).__name__} {module})")
    return lora, alphas, unmatched


def _lora_config(lora: dict, alphas: dict[str, float]) -> dict:
    """LoraConfig kwargs for exactly the modules in ``lora`` with their ranks and alphas."""
    ranks = {k[: -len(".lora_A.weight")]: int(v.shape[0]) for k, v in lora.items() if k.endswith(".lora_A.weight")}
    r = Counter(ranks.values()).most_common(1)[0][0]
    full_alphas = {m: alphas.get(m, float(rank)) for m, rank in ranks.items()}  # no alpha stored: alpha = rank
    alpha = Counter(full_alphas.values()).most_common(1)[0][0]
    exact = lambda m: f"^{re.escape(m)}$"  # noqa: E731
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {exact(m): k for m, k in ranks.items() if k != r},
        "alpha_pattern": {exact(m): a for m, a in full_alphas.items() if a != alpha},
        "use_dora": False,
        "lora_bias": False,
    }


def _converted_by_diffusers(pipe, tensors: dict) -> dict | None:
    """The LoRA as the diffusers loader of ``pipe``'s family converts it (original-repo layouts such as FLUX.2's BFL
    names with fused ``qkv``, which :func:`_module_and_part` does not rename), as ``transformer.*`` keys with the alphas
    folded into the weights; None where diffusers has no converter or it fails."""
    convert = getattr(type(pipe), "lora_state_dict", None)
    if convert is None or isinstance(pipe, torch.nn.Module):
        return None
    folded = dict(tensors)  # alphas folded into the down halves first: not every converter reads them (FLUX.2's does not)
    for key in [k for k in folded if k.endswith(".alpha")]:
        stem = key[: -len(".alpha")]
        down = next((f"{stem}.{d}" for d in ("lora_down.weight", "lora_A.weight") if f"{stem}.{d}" in folded), None)
        if down is not None:
            alpha = folded.pop(key)
            folded[down] = folded[down] * (float(alpha) / folded[down].shape[0])
    try:
        result = convert(folded)
    except Exception:  # diffusers' converters raise ValueError / KeyError / NotImplementedError on layouts they do not know
        return None
    return result[0] if isinstance(result, tuple) else result


def _lora_modules(tensors: dict) -> set[str]:
    """The LoRA pairs of a file in any layout (keys of their down / A halves)."""
    downs = tuple(f".{leaf}" for leaf, part in _PARTS.items() if part == "lora_A.weight")
    return {k for k in tensors if k.endswith(downs)}


def load_student_lora(
    pipe,
    path_or_repo: str,
    adapter_name: str | None = None,
    weight_name: str | None = None,
    lora_scale: float | None = None,
    fuse: bool = False,
    set_scheduler: bool = True,
    allow_pickle: bool = False,
    **hub_kwargs,
) -> StudentMetadata | None:
    """Load a LoRA student into ``pipe`` (a diffusers pipeline with a UNet or transformer).

    Reads the diffusers file or the ComfyUI file written by :func:`save_student_lora`, or any diffusers / peft /
    kohya / ComfyUI / original-repo LoRA for the same model (layouts diffusers' own loader converts are converted by
    it). Every LoRA module must map onto the pipeline's denoiser with matching shapes, otherwise nothing is loaded and
    the error lists the unmatched keys. With sampling metadata in the file, or for a published few-step LoRA of
    :data:`~onestep_pipelines.students.published.PUBLISHED_LORAS` (recognised by its file name: Qwen-Image-Lightning,
    FLUX.2-dev-Turbo, Z-Image-Fun-Lora-Distill), the pipeline's scheduler (and, for :class:`FewStepPipelineMixin`
    pipelines, the default steps and guidance) are set from it; r-conditioned students also get the second-time
    embedding (``r_embedder.safetensors``).

    Args:
        adapter_name: peft adapter name (defaults to the metadata's method, else "student").
        lora_scale: adapter weight (or the scale of the fused weights when ``fuse``); None: 1, or the strength a
            published LoRA's authors recommend.
        fuse: merge the LoRA into the weights and remove the adapter.
        allow_pickle: allow ``.bin`` / ``.pt`` files (pickle can run code; loaded with ``weights_only=True``).
        hub_kwargs: ``revision``, ``token``, ``cache_dir``... for Hub repo ids.

    Returns:
        The student's :class:`StudentMetadata`, or None when the file has none.
    """
    path_or_repo = os.fspath(path_or_repo)
    prefix, model = _denoiser_of(pipe)
    original = model
    path = _resolve(path_or_repo, weight_name, allow_pickle, **hub_kwargs)
    tensors, header = _read(path)
    embedded_r = {k[len(COMFYUI_R_PREFIX):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(COMFYUI_R_PREFIX)]}
    metadata = StudentMetadata.from_json(header[METADATA_KEY]) if METADATA_KEY in header else None
    architecture = architecture_of(model)
    published = None if metadata is not None else published_lora(weight_name or path, architecture)
    if published is not None:
        metadata = published.metadata(weight_name or path)
        logger.info("%s is %s (%s): sampling as its recipe says: %s, %d steps.", os.path.basename(path), published.name, published.repo,
                    metadata.scheduler_class, metadata.num_inference_steps)
    if lora_scale is None:
        lora_scale = published.strength if published is not None else 1.0
    if metadata is not None and metadata.architecture != architecture:
        raise ValueError(f"{path} is a LoRA for {metadata.architecture!r} models; this pipeline's {prefix} is {architecture!r}.")
    if metadata is not None and metadata.r_conditioning:
        if not isinstance(pipe, FewStepPipelineMixin):
            raise ValueError(f"r-conditioned students need a few-step pipeline that passes r, not {type(pipe).__name__}.")
        model = add_r_conditioning(model)
    lora, alphas, unmatched = _to_peft(tensors, model, prefix)
    converted = _converted_by_diffusers(pipe, tensors) if unmatched else None
    if converted:
        lora_c, alphas_c, unmatched_c = _to_peft(converted, model, prefix)
        if not unmatched_c and len(_lora_modules(converted)) >= len(_lora_modules(tensors)):  # (fused qkv pairs come out split)
            lora, alphas, unmatched = lora_c, alphas_c, unmatched_c
    if unmatched or not lora:
        shown = ", ".join(unmatched[:20]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 20 else "")
        raise ValueError(
            f"{path}: {len(unmatched)} of {len(tensors)} LoRA keys do not map onto this {architecture} {prefix} "
            f"({type(model).__name__}); nothing was loaded. Unmatched: {shown or 'no LoRA weights found'}"
        )
    if ADAPTER_METADATA_KEY in header and not alphas:
        config = {k[len(prefix) + 1 :]: v for k, v in json.loads(header[ADAPTER_METADATA_KEY]).items() if k.startswith(f"{prefix}.")}
    else:
        config = _lora_config(lora, alphas)
    if metadata is not None and metadata.r_conditioning and embedded_r:  # a ComfyUI file carries it
        _r_module(model).load_state_dict(embedded_r)
    elif metadata is not None and metadata.r_conditioning:
        r_path = os.path.join(os.path.dirname(path), R_EMBEDDER_WEIGHT_NAME)
        if not os.path.isfile(path_or_repo) and not os.path.isdir(path_or_repo):
            from huggingface_hub import hf_hub_download

            r_path = hf_hub_download(path_or_repo, R_EMBEDDER_WEIGHT_NAME, **hub_kwargs)
        if not os.path.isfile(r_path):
            raise FileNotFoundError(f"This r-conditioned student needs {R_EMBEDDER_WEIGHT_NAME} next to {path}.")
        _r_module(model).load_state_dict(_read(r_path)[0])
    adapter_name = adapter_name or (metadata.method if metadata is not None else "student")
    model.load_lora_adapter(lora, prefix=None, adapter_name=adapter_name, metadata=config)
    loaded = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if set(loaded) != set(lora):
        model.delete_adapters(adapter_name)
        raise ValueError(f"{path}: peft loaded {len(loaded)} of {len(lora)} LoRA tensors; the adapter was removed.")
    if fuse:
        model.fuse_lora(lora_scale=lora_scale, adapter_names=[adapter_name])
        model.unload_lora()
    elif lora_scale != 1.0:
        model.set_adapters([adapter_name], weights=[lora_scale])
    if model is not original:
        setattr(pipe, prefix, model)
    if metadata is not None and set_scheduler:
        if isinstance(pipe, FewStepPipelineMixin):
            pipe.set_student(metadata)
        else:
            pipe.scheduler = metadata.make_scheduler()
    elif metadata is not None and not isinstance(pipe, FewStepPipelineMixin) and metadata.schedule_conflicts(pipe.scheduler):
        logger.warning("%s samples on another schedule than this pipeline's scheduler: %s. Load it with set_scheduler=True.",
                       os.path.basename(path), ", ".join(metadata.schedule_conflicts(pipe.scheduler)))
    if isinstance(pipe, FewStepPipelineMixin) and metadata is not None and not set_scheduler:
        pipe.set_student(metadata, set_scheduler=False)
    return metadata
