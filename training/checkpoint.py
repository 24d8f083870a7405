"""Checkpoints of a run: safetensors for every tensor, JSON for everything else, and no pickle anywhere, so a
checkpoint folder from someone else cannot run code when it is resumed.

``checkpoints/step-N/`` holds

- ``trainer_state.json``: the update count, the wall time of every part of the run so far, the options a resume must
  share, the number of processes and the files below;
- ``student.safetensors``: the student's trainable tensors by parameter name (a LoRA student's adapters, or every
  weight of a full student); its frozen weights are the teacher's and are rebuilt from it;
- ``ema.safetensors`` + ``ema.json``: the EMA of those tensors and its counters;
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW's moments keyed by parameter name, its parameter groups;
- one ``<name>.safetensors`` per network of the method (fake score, discriminator head, target network) and one
  ``<name>.safetensors`` + ``.json`` per optimizer of the method;
- ``rng.safetensors``: the torch generator states of process 0 (the training draws themselves are seeded per update).

Every tensor is saved whole (gathered from FSDP shards by ``torch.distributed.checkpoint.state_dict``) on the CPU, so
a checkpoint resumes on any number of processes and on any device. A checkpoint is written to a temporary folder and
renamed when complete: a killed run never leaves half a checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from onestep_pipelines.pipelines.loading import write_atomically

FORMAT = 1
STATE_FILE = "trainer_state.json"


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _options(**kwargs) -> StateDictOptions:
    return StateDictOptions(full_state_dict=distributed(), cpu_offload=distributed(), **kwargs)


def model_tensors(module: torch.nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors of ``module`` (all, or those named), on the CPU. Collective under torch.distributed."""
    state = get_model_state_dict(module, options=_options())
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if names is None or k in names}


def load_model_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``tensors`` into ``module`` (sharding them where the module is sharded); every tensor must have a home."""
    own = set(module.state_dict())
    unknown = sorted(set(tensors) - own)
    if unknown:
        raise ValueError(f"the checkpoint's {what} holds tensors this run's model lacks ({unknown[:4]}): it belongs to another model or method.")
    result = set_model_state_dict(module, tensors, options=StateDictOptions(full_state_dict=distributed(), strict=False))
    if result is not None and result.unexpected_keys:
        raise ValueError(f"the checkpoint's {what} does not fit this model: {result.unexpected_keys[:4]}")


def _named(modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
    return torch.nn.ModuleDict(modules)  # names optimizer state by "<prefix>.<parameter name>"


def optimizer_files(optimizer, modules: dict[str, torch.nn.Module]) -> tuple[dict, dict]:
    """``(tensors, json)`` of an optimizer's state keyed by parameter name. Collective under torch.distributed."""
    state = get_optimizer_state_dict(_named(modules), optimizer, options=_options())
    tensors, scalars = {}, {}
    for name, values in state.get("state", {}).items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} for group in state.get("param_groups", [])]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_files(optimizer, modules: dict[str, torch.nn.Module], tensors: dict, meta: dict, what: str) -> None:
    state: dict = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        name, _, entry = key.rpartition("/")
        state.setdefault(name, {})[entry] = value
    own = {f"{prefix}.{n}" for prefix, m in modules.items() for n, p in m.named_parameters() if p.requires_grad}
    unknown = sorted(set(state) - own)
    if unknown:
        raise ValueError(f"the checkpoint's {what} trains parameters this run lacks ({unknown[:4]}): it belongs to another model or method.")
    saved = meta["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's {what} has {len(saved)} parameter groups and this run's {len(optimizer.param_groups)}: "
                         "it belongs to another model or method.")
    # the checkpoint's moments with this run's learning rate, betas... (a resumed run may lower the learning rate)
    groups = [{k: v for k, v in own.items() if k != "params"} | {"params": group["params"]} for own, group in zip(optimizer.param_groups, saved)]
    set_optimizer_state_dict(_named(modules), optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=distributed()))


def ema_files(ema, names: list[str]) -> tuple[dict, dict]:
    """diffusers' ``EMAModel``: shadow tensors by parameter name, and its counters."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    tensors = {name: whole_tensor(t) for name, t in zip(names, shadow)}
    return tensors, state


def load_ema_files(ema, names: list[str], tensors: dict, meta: dict) -> None:
    """The shadow weights and the update counter of a checkpoint's EMA; its decay settings stay this run's (a run
    resumed with another ``--ema-decay`` averages with it from there on)."""
    missing = [n for n in names if n not in tensors]
    if missing or len(tensors) != len(names):
        raise ValueError(f"the checkpoint's EMA does not match this student's trainable weights (missing {missing[:4]}).")
    for param, name in zip(ema.shadow_params, names):
        copy_into(param, tensors[name])
    ema.optimization_step = meta["optimization_step"]


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor gathered whole from its FSDP2 shards (a DTensor; collective), on the CPU."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().cpu().contiguous()


def copy_into(target: torch.Tensor, whole: torch.Tensor) -> None:
    with torch.no_grad():
        if hasattr(target, "device_mesh"):  # a DTensor shard: distribute the whole tensor like the target
            from torch.distributed.tensor import distribute_tensor

            target.copy_(distribute_tensor(whole.to(target.device, target.dtype), target.device_mesh, target.placements))
        else:
            target.copy_(whole.to(target.device, target.dtype))


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict) -> None:
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# ------------------------------------------------------------------------------------------------ folders
def list_checkpoints(folder: str) -> list[str]:
    """Complete checkpoints in ``folder``, oldest first."""
    names = [n for n in os.listdir(folder) if n.startswith("step-") and n[5:].isdigit()] if os.path.isdir(folder) else []
    paths = [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[5:]))]
    return [p for p in paths if os.path.isfile(os.path.join(p, STATE_FILE))]


def read_state(path: str, flag: str = "--resume") -> dict:
    """``trainer_state.json`` of a checkpoint folder, with a clear error (naming ``flag``) for anything else."""
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{flag} {path}: not a checkpoint of this trainer (no {STATE_FILE}).")
    with open(file, encoding="utf-8") as f:
        state = json.load(f)
    if state.get("format", 0) > FORMAT:
        raise ValueError(f"{flag} {path}: checkpoint format {state.get('format')} is newer than this onestep-pipelines reads ({FORMAT}); upgrade.")
    return state


def save(folder: str, step: int, parts: dict[str, tuple[dict, dict | None]], state: dict, keep: int, is_main: bool) -> str:
    """Write ``parts`` (``{file stem: (tensors, json or None)}``) and ``state`` as ``folder/step-<step>`` (main process
    only, atomically), then drop all but the newest ``keep`` checkpoints."""
    final = os.path.join(folder, f"step-{step}")
    if not is_main:
        return final
    tmp = os.path.join(folder, f".tmp-step-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for stem, (tensors, meta) in parts.items():
        save_file(tensors, os.path.join(tmp, f"{stem}.safetensors"))
        if meta is not None:
            write_atomically(os.path.join(tmp, f"{stem}.json"), json.dumps(meta, indent=1) + "\n")
    files = sorted(os.listdir(tmp))
    write_atomically(os.path.join(tmp, STATE_FILE), json.dumps({"format": FORMAT, **state, "files": files}, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    return final


def load_part(path: str, stem: str) -> tuple[dict, dict | None]:
    """``(tensors, json or None)`` of one part of a checkpoint (safetensors and JSON only)."""
    tensors_file = os.path.join(path, f"{stem}.safetensors")
    if not os.path.isfile(tensors_file):
        raise ValueError(f"checkpoint {path} has no {stem}.safetensors: it belongs to another method or is incomplete.")
    meta_file = os.path.join(path, f"{stem}.json")
    meta = None
    if os.path.isfile(meta_file):
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    return load_file(tensors_file), meta
