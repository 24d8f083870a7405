"""A quantized frozen base under LoRA adapters (``--quantize-base``), with torchao.

Weight-only quantization of every ``nn.Linear`` of the teacher's denoiser, in place, before the LoRA student, the LoRA
fake score and the target networks take it as their shared frozen base (``training.methods.base.tied_copy``): int8
(``Int8WeightOnlyConfig``: per-channel int8 weights, dequantized in the matmul; any device, the CPU included) or
float8 (``Float8WeightOnlyConfig``; GPUs with float8 arithmetic, compute capability 8.9 or newer). The adapters train
in float32 on top, as QLoRA does with 4-bit bases (Dettmers et al. 2023). The exported full student is the base at
full precision, reloaded, with the LoRA fused: quantization is a training-memory option, not part of the student.
"""

from __future__ import annotations

import logging
import warnings

import torch


def is_quantized(tensor: torch.Tensor) -> bool:
    """A torchao quantized tensor (a tensor subclass), which casts and copies must leave alone."""
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    return type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__")


def quantize_base(model: torch.nn.Module, kind: str, device: torch.device) -> int:
    """Quantize the linear layers of ``model`` (weight-only ``kind``: ``"int8"`` or ``"float8"``) in place; returns the
    number of layers. Raises a clear error without torchao, or for float8 on a device without it."""
    if kind == "float8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        raise ValueError(f"--quantize-base float8 needs a GPU with float8 arithmetic (compute capability 8.9 or newer); {device} has none: use int8.")
    previous = logging.getLogger("torchao").level
    logging.getLogger("torchao").setLevel(logging.ERROR)  # (it reports every optional CUDA kernel it cannot load on this machine)
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ValueError("--quantize-base needs torchao: pip install torchao") from None
    finally:
        logging.getLogger("torchao").setLevel(previous)
    # peft warns that such a LoRA layer cannot merge; this package never merges into a quantized base (the student is
    # exported over the base reloaded at full precision)
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
    layers = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
    quantize_(model, config, filter_fn=lambda module, name: isinstance(module, torch.nn.Linear))
    return len(layers)
