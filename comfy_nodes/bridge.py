"""The diffusers bridge: run a diffusers-format student folder (any pipeline this package or diffusers loads,
e.g. a digits student, or a model ComfyUI cannot represent natively) with the scheduler recorded in it, or a teacher
folder with a LoRA student applied, and hand ComfyUI an IMAGE. No ComfyUI import: usable and testable anywhere."""

from __future__ import annotations

import os
import threading

import torch

_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


def load_pipeline(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, lora: str | None = None,
                  lora_strength: float = 1.0, name: str | None = None):
    """``DiffusionPipeline.from_pretrained(path)`` (safetensors only), cached while the folder (and the LoRA file) are
    unchanged. With ``lora`` (a LoRA student file), the folder is the teacher: it is loaded as the few-step pipeline of
    its architecture and the LoRA applied at ``lora_strength`` with its recorded scheduler, steps and guidance
    (:func:`with_lora`). ``name``: the student as the node lists it, for error messages (default: the folder's name)."""
    from diffusers import DiffusionPipeline

    import onestep_pipelines  # noqa: F401  (registers the package's pipelines with diffusers' loader)

    label = name or os.path.basename(path)
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"student {label}: not a diffusers pipeline folder (no model_index.json).")
    _check_components(path, label)
    if lora is not None and not os.path.isfile(lora):
        raise ValueError(f"lora {os.path.basename(lora)}: no such file (was it moved or deleted?).")
    lora_key = (os.path.realpath(lora), os.path.getmtime(lora), float(lora_strength)) if lora is not None else None
    key = (os.path.realpath(path), os.path.getmtime(index), lora_key, str(device), dtype)
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()  # one pipeline at a time: students are small, base models are not
            try:
                pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, **({"torch_dtype": dtype} if dtype else {}))
            except (OSError, ValueError) as error:
                raise ValueError(f"student {label} could not be loaded: {error}") from None
            if lora is not None:
                pipe = with_lora(pipe, lora, lora_strength, label)
            _CACHE[key] = pipe.to(device)
        return _CACHE[key]


def with_lora(teacher, lora: str, strength: float = 1.0, label: str = "the student"):
    """``teacher`` (a stock or few-step pipeline) as the few-step pipeline of its architecture with the LoRA student
    file ``lora`` applied at ``strength`` (:func:`~onestep_pipelines.students.load_student_lora`: scheduler, steps and
    guidance from the file's metadata). Errors name the ``lora`` input and the file."""
    from onestep_pipelines.metadata import read_student_metadata
    from onestep_pipelines.pipelines import architecture_of, student_pipeline
    from onestep_pipelines.students import load_student_lora

    file = os.path.basename(lora)
    metadata, _ = read_student_metadata(lora, "lora")
    denoiser = next((teacher.components[n] for n in ("unet", "transformer") if teacher.components.get(n) is not None), None)
    try:
        architecture = architecture_of(teacher)
    except TypeError:
        architecture = None
    if denoiser is None or architecture is None:
        raise ValueError(f"lora {file}: student {label} ({type(teacher).__name__}) has no SD / SDXL UNet, SD3, Flux, Qwen-Image, FLUX.2, "
                         "Z-Image or digits denoiser to apply a LoRA student to; set lora to none.")
    if metadata is not None and metadata.architecture != architecture:
        raise ValueError(f"lora {file} is a LoRA for {metadata.architecture!r} models; student {label} is {architecture!r}: "
                         "pick a LoRA trained on this student's base model.")
    pipe = student_pipeline(teacher)
    try:
        load_student_lora(pipe, lora, lora_scale=float(strength))
    except (ValueError, OSError) as error:
        reason = str(error)
        reason = reason[len(lora):].lstrip(": ") if reason.startswith(lora) else reason.replace(lora, file)
        head, listed, keys = reason.partition(" Unmatched: ")  # keys that match nothing: a few, the count is in the head
        if listed:
            keys = keys.split(", ")
            reason = f"{head} Unmatched: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}; a LoRA of another base model? Pick one trained on {label}."
        raise ValueError(f"lora {file}: {reason}") from None
    return pipe


def _check_components(path: str, label: str) -> None:
    """Every component that ``model_index.json`` lists has a folder with its config (else an error naming it)."""
    import json

    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"student {label}: model_index.json is not valid JSON ({error}).") from None
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        folder = os.path.join(path, name)
        configs = ("config.json", "scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json")
        if not os.path.isdir(folder) or not any(os.path.isfile(os.path.join(folder, c)) for c in configs):
            raise ValueError(f"student {label}: component {name!r} has no folder with its config "
                             f"({name}/config.json); copy the whole student folder again.")


def parse_labels(text: str) -> list[int]:
    try:
        labels = [int(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"class_labels: {text!r} is not a comma-separated list of integers.") from None
    if not labels:
        raise ValueError("class_labels: give at least one label, e.g. '0,1,2'.")
    return labels


def generate(pipe, prompt: str = "", class_labels: str = "", seed: int = 0, steps: int = 0, guidance: float = -1.0,
             width: int = 0, height: int = 0, batch_size: int = 1, on_step=None, substeps: int = 0) -> torch.Tensor:
    """Images ``(batch, height, width, 3)`` in ``[0, 1]`` (ComfyUI's IMAGE). ``steps=0`` and ``guidance<0`` use the
    student's recorded defaults; ``width``/``height`` 0 the pipeline's; ``substeps`` > 0 the policy substeps of a pi-Flow
    student (PolicyScheduler) for this call. ``on_step(done, total)`` is called before the first step and after each
    one (progress, and the place to stop an interrupted run by raising)."""
    if substeps > 0:
        from onestep_pipelines.schedulers import PolicyScheduler

        if not isinstance(pipe.scheduler, PolicyScheduler):
            raise ValueError(f"substeps: {substeps} applies to pi-Flow policy students (PolicyScheduler); this student samples with "
                             f"{type(pipe.scheduler).__name__}. Leave it at 0.")
        recorded = pipe.scheduler
        pipe.scheduler = PolicyScheduler.from_config(recorded.config, substeps=int(substeps))
        try:
            return generate(pipe, prompt, class_labels, seed, steps, guidance, width, height, batch_size, on_step)
        finally:
            pipe.scheduler = recorded
    kwargs = {"generator": torch.Generator("cpu").manual_seed(int(seed)), "output_type": "pt"}
    if on_step is not None:
        def after_step(pipeline, i, t, tensors):
            on_step(i + 1, pipeline.scheduler.num_inference_steps)
            return {}

        kwargs["callback_on_step_end"] = after_step
    if steps > 0:
        kwargs["num_inference_steps"] = int(steps)
    elif getattr(pipe, "student", None) is None:
        raise ValueError("this pipeline records no student defaults: set steps > 0.")
    if guidance >= 0:  # in the usual convention; a few-step pipeline names it as its family does (true_cfg_scale, Z-Image's w - 1)
        kwargs.update(pipe.guidance_kwargs(float(guidance)) if hasattr(pipe, "guidance_kwargs") else {"guidance_scale": float(guidance)})
    if "class_labels" in _parameters(pipe):
        kwargs["class_labels"] = parse_labels(class_labels) * int(batch_size) if class_labels.strip() else None
    else:
        kwargs.update(prompt=prompt, num_images_per_prompt=int(batch_size))
        kwargs.update({k: v for k, v in (("width", width), ("height", height)) if v > 0})
    if on_step is not None:
        on_step(0, max(int(steps), 1))
    images = pipe(**kwargs).images
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu()


def _parameters(pipe) -> set[str]:
    """Arguments of the pipeline's ``__call__`` (through wrappers such as the few-step mixin's ``*args, **kwargs``)."""
    import inspect

    return {name for cls in type(pipe).__mro__ if "__call__" in vars(cls) for name in inspect.signature(vars(cls)["__call__"]).parameters}
