"""How a run spreads its networks over processes: one process, DDP, or FSDP2, as accelerate's launch config says.

- **DDP** (``accelerate launch`` with a multi-GPU config, or ``torchrun`` with CPU processes): every process holds every
  network; accelerate's ``prepare`` wraps each trained one, gradients are averaged.
- **FSDP2** (``distributed_type: FSDP`` with ``fsdp_version: 2``, e.g. ``training/configs/fsdp.yaml``): the student,
  the method's trained networks (fake score, discriminator head) and its target networks (EMA copies of the student)
  are sharded with ``torch.distributed.fsdp.fully_shard``, block by block (the config's
  ``fsdp_transformer_layer_cls_to_wrap``, else the model's ``_no_split_modules``); the optimizers are built over the
  sharded parameters afterwards, and the EMA shadows are sharded like them. The frozen teacher is replicated. Every
  process takes part in each forward of a sharded network, so previews and validation run on all of them, and the
  student is exported from whole tensors gathered into a weightless copy (``meta_copy``) on the main process.
  accelerate >= 1.x maps FSDP only onto accelerators; on CPU processes (gloo) :func:`use_fsdp_on_cpu` applies the
  same plugin so the CPU test suite covers the sharded path.
- **DeepSpeed** is refused: its engine trains one network with its own world-size-specific checkpoint files, while
  DMD2 / TDM train two, and this trainer's checkpoints must resume on any number of processes. FSDP2 shards what
  ZeRO-3 shards.

Checkpoints hold whole tensors either way (``training/checkpoint.py``), so a run saved with N processes resumes with M.
"""

from __future__ import annotations

import copy
import os

import torch
from accelerate.utils import DistributedType, parse_flag_from_env

FSDP_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "fsdp.yaml")


def use_fsdp_on_cpu(accelerator) -> None:
    """Apply accelerate's FSDP plugin (read from the ``FSDP_*`` variables ``accelerate launch`` sets) to CPU
    processes, which accelerate itself runs as DDP (``MULTI_CPU``)."""
    if accelerator.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        from accelerate import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP


def check_launch() -> None:
    """Refuse, before anything loads, what ``accelerate launch`` asked for and this trainer does not run (read from
    the variables the launcher sets): DeepSpeed, FSDP version 1."""
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(
            "DeepSpeed is not supported by onestep-train: its engine trains one network and writes checkpoints tied to "
            "the number of processes, while DMD2 / TDM train two and these checkpoints resume on any number. For "
            f"sharded weights, gradients and optimizer state use FSDP2: accelerate launch --config_file {FSDP_CONFIG} ..."
        )
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise ValueError(f"FSDP version {os.environ.get('FSDP_VERSION', '1')} is not supported by onestep-train: set "
                             f"fsdp_version: 2 in the accelerate config (as {FSDP_CONFIG} does).")


def engine(accelerator) -> str:
    """``"fsdp"``, ``"ddp"`` or ``"single"``."""
    if accelerator.distributed_type == DistributedType.FSDP:
        if accelerator.mixed_precision == "fp16":
            raise ValueError("mixed precision fp16 with FSDP: fp16 needs loss scaling over shards, which this trainer does not do; use bf16.")
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def wrap_class_names(model: torch.nn.Module, plugin) -> list[str]:
    """The block classes that become FSDP units: the config's list, else the model's ``_no_split_modules``. Every
    name must be a class of ``model`` (an error names the ones it lacks and the ones it has)."""
    names = list(plugin.transformer_cls_names_to_wrap or getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        candidates = sorted(getattr(model, "_no_split_modules", None) or
                            {type(m).__name__ for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst})
        raise ValueError(
            f"fsdp_transformer_layer_cls_to_wrap names {missing}, which {type(model).__name__} does not have; its blocks are "
            f"{candidates}. Fix the accelerate config (or leave the option out to use the model's own blocks)."
        )
    return names


def shard(module: torch.nn.Module, plugin, blocks: list[str] | None = None) -> torch.nn.Module:
    """``fully_shard`` each block of ``module`` named in ``blocks`` (innermost first), then ``module`` itself, with the
    plugin's resharding and offload policies. In place; returns ``module``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Weights are gathered as stored (float32) and every forward runs under the trainer's autocast, as without FSDP.
    # (accelerate's FSDP policy would cast every floating input to bf16, timesteps included, and bf16 cannot hold a
    # diffusion time: 999 becomes 1000.)
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward, "mp_policy": MixedPrecisionPolicy(), "offload_policy": plugin.cpu_offload}
    names = set(blocks or ())
    for sub in reversed(list(module.modules())[1:]):  # children come after their parents in modules(): reversed, inner first
        if type(sub).__name__ in names:
            fully_shard(sub, **kwargs)
    return fully_shard(module, **kwargs)


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters live on the meta device (no memory): the skeleton whole tensors are
    loaded into for export (``load_state_dict(..., assign=True)``). Buffers are copied (small, and non-persistent ones
    are in no state dict)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in module.parameters()}
    return copy.deepcopy(module, memo)

