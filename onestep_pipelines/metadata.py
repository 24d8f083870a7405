"""How a student must be sampled: the metadata that travels with its weights.

Full students keep it in ``model_index.json`` (the pipeline's ``student`` entry) next to their
``scheduler/scheduler_config.json``; LoRA students keep it in the safetensors header
(``onestep_student``) and in ``adapter_config.json``. Loading a student reads it to set the
scheduler, the default step count and the guidance, so nobody has to guess.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from .schedulers import ConsistencyScheduler, FlowMapScheduler, PolicyScheduler, TDMScheduler

FORMAT_VERSION = 1
METADATA_KEY = "onestep_student"
SCHEDULERS = {cls.__name__: cls for cls in (ConsistencyScheduler, FlowMapScheduler, PolicyScheduler, TDMScheduler)}
ARCHITECTURES = ("sd", "sdxl", "sd3", "flux", "qwen_image", "flux2", "z_image", "digits")
FAMILY_NAMES = {"sd": "Stable Diffusion 1.x", "sdxl": "SDXL", "sd3": "Stable Diffusion 3", "flux": "FLUX.1", "qwen_image": "Qwen-Image",
                "flux2": "FLUX.2", "z_image": "Z-Image", "digits": "digits"}  # architecture -> the model family's own name


@dataclass
class StudentMetadata:
    """Sampling recipe of a distilled student.

    Args:
        method: distillation method (``"dmd2"``, ``"consistency"``, ``"tdm"``, ``"meanflow"``, ``"flowmap"``, ...).
        architecture: model family the weights fit: one of ``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ``"qwen_image"``,
            ``"flux2"``, ``"z_image"``, ``"digits"``.
        scheduler_class: ``"ConsistencyScheduler"``, ``"FlowMapScheduler"``, ``"PolicyScheduler"`` or ``"TDMScheduler"``.
        scheduler_config: the scheduler's config (time type, prediction type, timestep preset, gamma, shift...).
        num_inference_steps: the default number of steps.
        recommended_steps: step counts the student was trained / evaluated for.
        guidance_scale: the guidance to sample with; when ``guidance_baked`` it is the scale trained into the
            student and sampling runs without CFG.
        guidance_baked: guidance is part of the student (one forward per step) rather than applied as CFG.
        r_conditioning: the model takes a second time ``r`` (flow-map / MeanFlow students).
        base_model: Hub id or path of the teacher.
        timesteps: the model timesteps of the default schedule (``num_inference_steps`` steps of the recorded
            scheduler); filled in from the scheduler, for readers that cannot run it (model cards, ComfyUI).
        sigmas: custom sigmas the pipeline passes to the scheduler by default (before its shift, as diffusers passes a
            call's ``sigmas``), where a student's recipe names them (fal's FLUX.2-dev-Turbo); None: the pipeline's own.
        guidance_embedding: the distilled-guidance embedding value the model takes (FLUX.1 / FLUX.2 [dev]'s
            ``guidance_scale``), where the student was trained or published with one; None: the pipeline's default.

    ``sigmas`` and ``guidance_embedding`` are written only when set, so records without them stay readable by
    earlier versions.
    """

    method: str
    architecture: str
    scheduler_class: str
    scheduler_config: dict
    num_inference_steps: int = 1
    recommended_steps: list[int] = field(default_factory=lambda: [1])
    guidance_scale: float = 1.0
    guidance_baked: bool = False
    r_conditioning: bool = False
    base_model: str | None = None
    timesteps: list[float] | None = None
    format_version: int = FORMAT_VERSION
    sigmas: list[float] | None = None
    guidance_embedding: float | None = None

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"student metadata: method must be a non-empty string, got {self.method!r}.")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"student metadata: architecture {self.architecture!r} is not one of {ARCHITECTURES}.")
        if self.scheduler_class not in SCHEDULERS:
            raise ValueError(f"student metadata: scheduler_class {self.scheduler_class!r} is not one of {sorted(SCHEDULERS)}.")
        if not isinstance(self.scheduler_config, dict):
            raise ValueError("student metadata: scheduler_config must be a dict.")
        self.scheduler_config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        steps = [self.num_inference_steps, *self.recommended_steps]
        if any(not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in steps):
            raise ValueError(f"student metadata: step counts must be positive integers, got {steps}.")
        if self.r_conditioning and self.scheduler_class != "FlowMapScheduler":
            raise ValueError("student metadata: an r-conditioned student samples with FlowMapScheduler.")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"student metadata format {self.format_version} is newer than this onestep-pipelines understands "
                f"({FORMAT_VERSION}); upgrade onestep-pipelines."
            )
        self.guidance_scale = float(self.guidance_scale)
        if self.sigmas is not None:
            self.sigmas = [float(s) for s in self.sigmas]
            if not self.sigmas or any(not 0 <= s <= 1 for s in self.sigmas) or self.sigmas != sorted(self.sigmas, reverse=True):
                raise ValueError(f"student metadata: sigmas must be a decreasing list in [0, 1], got {self.sigmas}.")
        if self.guidance_embedding is not None:
            self.guidance_embedding = float(self.guidance_embedding)
        scheduler = self.make_scheduler()  # validates the scheduler config
        if self.timesteps is None and not scheduler.config.use_dynamic_shifting:
            scheduler.set_timesteps(self.num_inference_steps)
            self.timesteps = [round(float(t), 6) for t in scheduler.timesteps]
        self.recommended_steps = list(self.recommended_steps)

    @classmethod
    def from_scheduler(cls, scheduler, **kwargs) -> "StudentMetadata":
        """Metadata whose scheduler entry is ``scheduler``'s class and config."""
        return cls(scheduler_class=type(scheduler).__name__, scheduler_config=dict(scheduler.config), **kwargs)

    def make_scheduler(self):
        """A fresh scheduler as recorded."""
        return SCHEDULERS[self.scheduler_class].from_config(self.scheduler_config)

    @property
    def time_type(self) -> str:
        return self.make_scheduler().config.time_type

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("sigmas", "guidance_embedding")}

    def schedule_conflicts(self, scheduler) -> list[str]:
        """How ``scheduler`` (any flow-matching scheduler with a diffusers config) would sample this student on another
        schedule than recorded: differences in shift, dynamic shifting and ``shift_terminal``; empty when it agrees
        (or when the student is not a flow student)."""
        ours, theirs = self.scheduler_config, dict(scheduler.config)
        if self.time_type != "flow" or "shift" not in theirs:
            return []
        keys = ["use_dynamic_shifting", "shift_terminal"]
        dynamic = bool(ours.get("use_dynamic_shifting", False))
        if dynamic == bool(theirs.get("use_dynamic_shifting", False)):
            keys += ["base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type"] if dynamic else ["shift"]
        defaults = self.make_scheduler().config
        return [f"{k}={theirs.get(k)!r} (the student's: {defaults.get(k)!r})" for k in keys
                if k in defaults and theirs.get(k, defaults.get(k)) != defaults.get(k) and not _same_number(theirs.get(k), defaults.get(k))]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "StudentMetadata":
        if not isinstance(data, dict):
            raise ValueError(f"student metadata must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown and data.get("format_version", FORMAT_VERSION) <= FORMAT_VERSION:
            raise ValueError(f"student metadata has unknown fields {unknown}.")
        missing = sorted(f.name for f in fields(cls) if f.name in ("method", "architecture", "scheduler_class", "scheduler_config") and f.name not in data)
        if missing:
            raise ValueError(f"student metadata lacks the fields {missing}.")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "StudentMetadata":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"student metadata is not valid JSON: {error}") from None
        return cls.from_dict(data)


def _same_number(a, b) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def metadata_from_header(header: dict, source: str) -> StudentMetadata | None:
    """The :class:`StudentMetadata` in a LoRA file's safetensors ``header`` (``None`` when it has none); an invalid
    record raises an error naming ``source`` (the input and the file)."""
    if METADATA_KEY not in header:
        return None
    try:
        return StudentMetadata.from_json(header[METADATA_KEY])
    except ValueError as error:
        raise ValueError(f"{source}: its onestep sampling metadata is invalid ({error}).") from None


def read_student_metadata(path: str, what: str = "LoRA") -> tuple[StudentMetadata | None, dict]:
    """``(metadata or None, header)`` of a LoRA student's ``.safetensors`` file, read from the header alone. Errors
    name ``what`` (the input the file came from) and the file: not safetensors, unreadable, invalid metadata."""
    from safetensors import safe_open

    source = f"{what} {os.path.basename(path)}"
    if not path.endswith(".safetensors"):
        raise ValueError(f"{source}: only .safetensors LoRA files load here (pickle files can run code); convert it or pick another.")
    try:
        with safe_open(path, framework="pt") as f:
            header = dict(f.metadata() or {})
    except Exception as error:  # safetensors raises its own SafetensorError for damaged files
        raise ValueError(f"{source}: not a readable safetensors file ({error}); download or copy it again.") from None
    return metadata_from_header(header, source), header
