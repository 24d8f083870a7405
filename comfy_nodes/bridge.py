"""The diffusers bridge: run a diffusers-format student folder (any pipeline this package or diffusers loads,
e.g. a digits student, or a model ComfyUI cannot represent natively) with the scheduler recorded in it, and
hand ComfyUI an IMAGE. No ComfyUI import: usable and testable anywhere."""

from __future__ import annotations

import os
import threading

import torch

_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


def load_pipeline(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """``DiffusionPipeline.from_pretrained(path)`` (safetensors only), cached while the folder is unchanged."""
    from diffusers import DiffusionPipeline

    import onestep_pipelines  # noqa: F401  (registers the package's pipelines with diffusers' loader)

    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json).")
    key = (os.path.realpath(path), os.path.getmtime(index), str(device), dtype)
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()  # one pipeline at a time: students are small, base models are not
            pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, **({"torch_dtype": dtype} if dtype else {}))
            _CACHE[key] = pipe.to(device)
        return _CACHE[key]


def parse_labels(text: str) -> list[int]:
    try:
        labels = [int(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"class_labels: {text!r} is not a comma-separated list of integers.") from None
    if not labels:
        raise ValueError("class_labels: give at least one label, e.g. '0,1,2'.")
    return labels


def generate(pipe, prompt: str = "", class_labels: str = "", seed: int = 0, steps: int = 0, guidance: float = -1.0,
             width: int = 0, height: int = 0, batch_size: int = 1) -> torch.Tensor:
    """Images ``(batch, height, width, 3)`` in ``[0, 1]`` (ComfyUI's IMAGE). ``steps=0`` and ``guidance<0`` use the
    student's recorded defaults; ``width``/``height`` 0 the pipeline's."""
    kwargs = {"generator": torch.Generator("cpu").manual_seed(int(seed)), "output_type": "pt"}
    if steps > 0:
        kwargs["num_inference_steps"] = int(steps)
    elif getattr(pipe, "student", None) is None:
        raise ValueError("this pipeline records no student defaults: set steps > 0.")
    if guidance >= 0:
        kwargs["guidance_scale"] = float(guidance)
    if "class_labels" in _parameters(pipe):
        kwargs["class_labels"] = parse_labels(class_labels) * int(batch_size) if class_labels.strip() else None
    else:
        kwargs.update(prompt=prompt, num_images_per_prompt=int(batch_size))
        kwargs.update({k: v for k, v in (("width", width), ("height", height)) if v > 0})
    images = pipe(**kwargs).images
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu()


def _parameters(pipe) -> set[str]:
    """Arguments of the pipeline's ``__call__`` (through wrappers such as the few-step mixin's ``*args, **kwargs``)."""
    import inspect

    return {name for cls in type(pipe).__mro__ if "__call__" in vars(cls) for name in inspect.signature(vars(cls)["__call__"]).parameters}
