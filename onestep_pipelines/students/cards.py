"""Hub model cards for students, rendered from the templates in ``model_cards/`` with huggingface_hub."""

from __future__ import annotations

import json
import os
import shutil

from huggingface_hub import ModelCard, ModelCardData

from ..benchmark import TEXT_TEACHERS
from ..pipelines import PIPELINE_NAMES
from ..pipelines.loading import INSTALL_COMMAND, REPOSITORY_URL, write_atomically
from ..metadata import FAMILY_NAMES, StudentMetadata

try:  # installed (wheel or editable): model_cards/ is the data package onestep_pipelines.model_cards
    from ..model_cards import TEMPLATES_DIR
except ImportError:  # a checkout on sys.path without installation (a clone in ComfyUI/custom_nodes)
    TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "model_cards")
KINDS = {"lora": "student_lora.md", "full": "student_full.md"}


def _guidance_text(m: StudentMetadata) -> str:
    if m.guidance_baked:
        return f"guidance {m.guidance_scale:g} baked in, no CFG at sampling"
    return "no guidance" if m.guidance_scale == 1.0 else f"classifier-free guidance {m.guidance_scale:g}"


def _scheduler_summary(m: StudentMetadata) -> str:
    cfg = m.make_scheduler().config
    parts = [f"time {cfg.time_type}", f"prediction {cfg.prediction_type}", f"preset {cfg.timestep_preset}"]
    if "gamma" in cfg:
        parts.append(f"gamma {cfg.gamma:g}")
    if cfg.get("shift", 1.0) != 1.0:
        parts.append(f"shift {cfg.shift:g}")
    return ", ".join(parts)


def _comfyui_sampler(m: StudentMetadata) -> str:
    cfg = m.make_scheduler().config
    if m.scheduler_class == "FlowMapScheduler":
        return "the onestep-pipelines flow-map sampler (it passes the second time r; no built-in sampler does)"
    gamma = cfg.get("gamma", 0.0)  # TDM: deterministic
    if gamma == 1.0:
        return "the built-in `lcm` sampler (or the onestep consistency sampler with gamma 1)"
    if gamma == 0.0:
        return "the built-in `euler` sampler" if cfg.time_type == "flow" else "the built-in `ddim` sampler"
    return f"the onestep consistency sampler with gamma {gamma:g}"


def _papers(method: str) -> str:
    """`` ([citation](arXiv link), ...)`` for a method of the trainer, empty for others (or without the trainer)."""
    try:
        from ..training.methods import papers
    except ImportError:  # a checkout used without installation has no onestep_pipelines.training
        return ""
    cited = papers(method)
    return " (" + "; ".join(f"[{cite}](https://arxiv.org/abs/{arxiv})" for cite, arxiv in cited) + ")" if cited else ""


def _looks_like_hub_id(name: str) -> bool:
    """``org/name`` that is not a local path (a Hub repository the card can link to)."""
    return name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/", "~"))


def base_model_name(source: str | None) -> str | None:
    """What a student records as its base model, for a teacher loaded from ``source`` (a Hub id, a local folder or
    ``"digits"``): a name that means something off the machine it was distilled on, never a local path.

    A Hub id and ``"digits"`` stay as they are. A local folder gives the Hub id it is a copy of when it shows one: a
    Hub cache snapshot (``.../models--org--name/snapshots/<revision>``) or a ``_name_or_path`` Hub id recorded in its
    ``model_index.json``; otherwise the folder's own name (no ``/``: the model card calls it a local teacher).
    """
    if source is None or source == "digits" or not os.path.isdir(os.path.expanduser(source)):
        return source
    folder = os.path.abspath(os.path.expanduser(source))
    parts = folder.split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):  # huggingface_hub's cache
        return parts[-3][len("models--"):].replace("--", "/")  # (Hub ids hold no "--")
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            recorded = json.load(f).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and _looks_like_hub_id(recorded) and "\\" not in recorded:
        return recorded
    return os.path.basename(folder)


def _local_name(base_model: str) -> str:
    """The name a card shows for a base model that is not on the Hub (a folder's name, also for an old student that
    recorded a path)."""
    return os.path.basename(os.path.normpath(base_model))


def numbers_table(rows: list[dict]) -> str:
    """A markdown table from a list of dicts with the same keys (floats to 4 significant digits)."""
    if not rows:
        return ""
    columns = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_model_card(
    folder: str,
    metadata: StudentMetadata,
    kind: str,
    repo_id: str | None = None,
    numbers: list[dict] | None = None,
    grid=None,
    title: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """Render and write ``folder/README.md`` for a student saved in ``folder``.

    Args:
        kind: ``"lora"`` (a folder written by :func:`save_student_lora`) or ``"full"`` (a saved pipeline).
        repo_id: the Hub id the snippets load from (defaults to the folder's name).
        numbers: rows for the numbers table, e.g. ``[{"model": "teacher", "NFE": 32, "FD": 3.14}, ...]``.
        grid: a sample grid (PIL image or image path), copied to ``folder/samples.png`` and shown.
        license: a Hub license id (defaults to the base model's, which you should check).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {sorted(KINDS)}.")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder; save the student first.")
    repo_id = repo_id or os.path.basename(os.path.normpath(folder))
    m = metadata
    lora = {}
    if kind == "lora":
        config_path = os.path.join(folder, "adapter_config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} is missing: write the LoRA with save_student_lora first.")
        with open(config_path, encoding="utf-8") as f:
            lora = json.load(f)
    grid_name = None
    if grid is not None:
        grid_name = "samples.png"
        if isinstance(grid, (str, os.PathLike)):
            shutil.copyfile(grid, os.path.join(folder, grid_name))
        else:
            grid.save(os.path.join(folder, grid_name))
    digits = m.architecture == "digits"
    shipped = digits and m.base_model in (None, "digits")
    shipped_text = m.base_model in TEXT_TEACHERS  # a text-to-image digits teacher shipped with the package, by name
    elsewhere = m.base_model is not None and not (shipped or shipped_text)  # a teacher not shipped with the package
    on_hub = elsewhere and _looks_like_hub_id(m.base_model)
    local = elsewhere and not on_hub  # a teacher folder that is not on the Hub
    card_data = ModelCardData(
        library_name="diffusers",
        # the Hub has no class-conditional task: class-conditional models (DiT / SiT / MAR on ImageNet) are filed under
        # unconditional-image-generation and tagged class-conditional
        pipeline_tag="unconditional-image-generation" if digits else "text-to-image",
        base_model=m.base_model if on_hub else None,
        tags=["few-step", m.method, "onestep-pipelines", *(["class-conditional"] if digits else []), *(["lora"] if kind == "lora" else [])],
        license=license,
    )
    if card_data.base_model:
        card_data.base_model_relation = "adapter" if kind == "lora" else "finetune"
    base = _local_name(m.base_model) if local else m.base_model
    if shipped:
        base_ref, base_name = "the onestep-pipelines digits teacher (shipped with the package: `onestep_pipelines.load_digits_teacher()`)", "the digits teacher"
    elif shipped_text:
        base_ref = f"`{m.base_model}`, a text-to-image digits teacher shipped with onestep-pipelines (`teacher_folder(\"{m.base_model}\")`)"
        base_name = f"the shipped teacher `{m.base_model}`"
    elif on_hub:
        base_ref, base_name = f"[{m.base_model}](https://huggingface.co/{m.base_model})", m.base_model
    elif local:
        base_ref = f"a local teacher, `{base}` (a pipeline folder on the machine it was distilled on, not on the Hub)"
        base_name = f"local teacher `{base}`"
    else:
        base_ref, base_name = "its base model", "the digits teacher" if digits else "the base model"
    base_comment = "  # the local teacher's folder" if local else ""
    teacher_import = "from onestep_pipelines.benchmark import teacher_folder\n" if shipped_text else ""
    source = f'teacher_folder("{m.base_model}")' if shipped_text else f'"{base or "<base model id>"}"'
    pipeline_class = PIPELINE_NAMES[m.architecture]
    device = 'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
    dtype = "torch_dtype=torch.float16 if device == \"cuda\" else torch.float32"
    comfyui_file = next((n for n in sorted(os.listdir(folder)) if n.endswith("_comfyui.safetensors")), None)
    card = ModelCard.from_template(
        card_data,
        template_path=os.path.join(TEMPLATES_DIR, KINDS[kind]),
        title=title or f"{m.method} few-step student ({FAMILY_NAMES[m.architecture]})",
        method=m.method,
        papers=_papers(m.method),
        base_ref=base_ref,
        base_model_name=base_name,
        load_base=(
            "from onestep_pipelines import load_digits_teacher, load_student_lora\n\npipe = load_digits_teacher()"
            if shipped
            else f'from onestep_pipelines import DigitsPipeline, load_student_lora\n\npipe = DigitsPipeline.from_pretrained("{base}"){base_comment}'
            if digits
            else f"import torch\nfrom onestep_pipelines import {pipeline_class}, load_student_lora\n{teacher_import}\n{device}"
            f"pipe = {pipeline_class}.from_pretrained({source}, {dtype}).to(device){base_comment}"
        ),
        repository_url=REPOSITORY_URL,
        install_command=INSTALL_COMMAND,
        imports="import onestep_pipelines  # lets DiffusionPipeline load this student's classes" if digits
        else "import torch\nimport onestep_pipelines  # lets DiffusionPipeline load this student's classes",
        device_line="" if digits else device,
        load_args="" if digits else f", {dtype}).to(device",
        repo_id=repo_id,
        pipeline_class=pipeline_class,
        call_args='class_labels=["seven", 3]' if digits else '"a handwritten digit seven"' if shipped_text else '"a photo of a red fox in the snow"',
        num_inference_steps=m.num_inference_steps,
        recommended_steps=", ".join(str(n) for n in m.recommended_steps),
        timesteps=m.timesteps if m.timesteps is not None else "resolution-dependent",
        guidance_text=_guidance_text(m),
        scheduler_class=m.scheduler_class,
        scheduler_summary=_scheduler_summary(m),
        r_conditioning=m.r_conditioning,
        comfyui_file=comfyui_file,
        comfyui_sampler=_comfyui_sampler(m),
        comfyui_cfg=1.0 if m.guidance_baked else m.guidance_scale,
        comfyui_note="ComfyUI cannot load this architecture natively." if digits else _comfyui_route(m.architecture),
        rank=lora.get("r"),
        alpha=lora.get("lora_alpha"),
        numbers=numbers_table(numbers or []),
        grid=grid_name,
    )
    write_atomically(os.path.join(folder, "README.md"), str(card))
    return card


def _comfyui_route(architecture: str) -> str:
    if architecture in ("flux2", "z_image"):
        return (f"the ComfyUI this package is tested with (October 2025) has no native {FAMILY_NAMES[architecture]} model (newer ComfyUI "
                "has; untested here): the node pack's Diffusers Student node runs the diffusers folder.")
    return "the LoRA form of a student is the native ComfyUI route."
