"""The distillation loop (accelerate): student, EMA, checkpoints, resume, previews, export.

One explicit loop with its blocks in a fixed order (EDM style): status, step, EMA, checkpoint, preview.
Every step draws its data and noise from a generator seeded with ``(seed, step)``, so a run resumed from a
checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..benchmark.digits import load_digits_images
from ..benchmark.evaluate import save_grid
from ..metadata import StudentMetadata
from ..models import add_r_conditioning
from ..pipelines import PIPELINES_BY_ARCHITECTURE, DigitsPipeline
from ..pipelines.loading import write_atomically
from .. import schedulers
from ..students import save_student_lora, write_model_card
from .methods import TrainingDiverged, get_method
from .teachers import load_teacher

RUN_FILE = "run.json"


@dataclass
class DistillConfig:
    """Every option of ``onestep-train distill`` (the CLI help is built from these docs)."""

    method: str = field(default="dmd2", metadata={"help": "distillation method: dmd2, consistency, tdm or meanflow"})
    teacher: str = field(default="digits", metadata={"help": "'digits' (the embedded teacher), or a diffusers pipeline folder or Hub id (SD 1.5, SDXL, SD3, Flux)"})
    prompts: str = field(default="", metadata={"help": "text-to-image teachers: a text file with one prompt per line (data-free methods)"})
    data: str = field(default="", metadata={"help": "text-to-image teachers: an image folder with a .txt caption per image"})
    resolution: int = field(default=512, metadata={"help": "text-to-image teachers: image size of training samples"})
    output_dir: str = field(default="onestep-digits-student", metadata={"help": "run folder: checkpoints, previews, the student"})
    num_steps: int = field(default=1, metadata={"help": "student steps (NFE), 1 to 4"})
    max_train_steps: int = field(default=1000, metadata={"help": "generator updates"})
    batch_size: int = field(default=128, metadata={"help": "samples per micro-batch (per process)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step (all optimizers)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "student learning rate (AdamW)"})
    fake_learning_rate: float = field(default=1e-4, metadata={"help": "dmd2: fake-score learning rate"})
    fake_updates: int = field(default=1, metadata={"help": "dmd2: fake-score updates per generator update"})
    guidance_scale: float = field(default=1.0, metadata={"help": "teacher CFG scale (1 = none; baked into the student)"})
    divergence: str = field(default="reverse-kl", metadata={"help": "dmd2: reverse-kl, forward-kl or js (the last two need --gan-weight)"})
    gan_weight: float = field(default=0.0, metadata={"help": "dmd2: weight of the GAN head on fake-score features (0 = off)"})
    phases: int = field(default=0, metadata={"help": "consistency: ODE phases (PCM, sampled by jumps between phase edges); 0 or 1 = one phase (LCM)"})
    ode_steps: int = field(default=32, metadata={"help": "consistency, flowmap: teacher ODE grid (one Euler step of 1/ode_steps per target)"})
    loss: str = field(default="huber", metadata={"help": "consistency: huber (pseudo-Huber) or l2"})
    target_ema: float = field(default=0.95, metadata={"help": "consistency: EMA decay of the target network"})
    target: str = field(default="", metadata={"help": "meanflow: split (SplitMeanFlow, no JVP, default) or jvp (MeanFlow identity with torch.func.jvp); "
                                                   "flowmap: euler (a teacher Euler step of 1/ode_steps, no JVP, default) or jvp (Lagrangian tangent)"})
    source: str = field(default="teacher", metadata={"help": "meanflow: velocity from the teacher (distillation) or from data (e - x, no teacher)"})
    jump_fraction: float = field(default=0.5, metadata={"help": "flowmap euler: fraction of each interval integrated by the teacher (Euler steps of at most 1/ode_steps); 0 = one step of 1/ode_steps"})
    equal_fraction: float = field(default=0.25, metadata={"help": "meanflow: fraction of pairs with r = t"})
    endpoint_fraction: float = field(default=0.3, metadata={"help": "meanflow: fraction of t set to 1 and, independently, of r set to 0"})
    logit_mean: float = field(default=0.0, metadata={"help": "meanflow: mean of the logit-normal t"})
    logit_std: float = field(default=1.0, metadata={"help": "meanflow: standard deviation of the logit-normal t"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank of the student; 0 trains all weights"})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha (0 = the rank)"})
    lora_targets: str = field(default="", metadata={"help": "comma-separated module names the LoRA adapts (default: attention projections)"})
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay of the student weights (0 = no EMA)"})
    seed: int = field(default=0, metadata={"help": "seed of the whole run"})
    mixed_precision: str = field(default="no", metadata={"help": "accelerate mixed precision: no, fp16 or bf16"})
    checkpoint_every: int = field(default=200, metadata={"help": "save a resumable checkpoint every N updates"})
    checkpoints_to_keep: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    preview_every: int = field(default=200, metadata={"help": "write a preview grid every N updates (0 = never)"})
    resume: str = field(default="", metadata={"help": "'latest' or a checkpoint folder to continue from"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass (less memory)"})
    log_with: str = field(default="auto", metadata={"help": "accelerate tracker for the losses: auto (tensorboard when installed), none, or a tracker name"})
    evaluate: bool = field(default=True, metadata={"help": "print teacher-vs-student FD-digits at the end"})
    push_to_hub: str = field(default="", metadata={"help": "Hub repo id to upload the student to (token from HF_TOKEN / login)"})

    def __post_init__(self):
        get_method(self.method)
        checks = [
            (1 <= self.num_steps <= 4, "num_steps must be 1 to 4"),
            (self.max_train_steps > 0, "max_train_steps must be positive"),
            (self.batch_size > 0, "batch_size must be positive"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1"),
            (self.learning_rate > 0 and self.fake_learning_rate > 0, "learning rates must be positive"),
            (self.fake_updates >= 1, "fake_updates must be at least 1"),
            (self.phases >= 0 and self.ode_steps >= 1, "phases must be >= 0 and ode_steps >= 1"),
            (self.resolution > 0 and self.resolution % 16 == 0, "resolution must be a positive multiple of 16"),
            (0 <= self.target_ema < 1, "target_ema must lie in [0, 1)"),
            (0 <= self.equal_fraction <= 1 and 0 <= self.endpoint_fraction <= 1, "equal_fraction and endpoint_fraction must lie in [0, 1]"),
            (0 <= self.jump_fraction < 1, "jump_fraction must lie in [0, 1)"),
            (self.logit_std > 0, "logit_std must be positive"),
            (self.lora_rank >= 0, f"lora_rank must be 0 (full fine-tune) or positive, got {self.lora_rank}"),
            (0 <= self.ema_decay < 1, "ema_decay must lie in [0, 1)"),
            (self.checkpoint_every > 0, "checkpoint_every must be positive"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision must be no, fp16 or bf16"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")

    def comparable(self) -> dict:
        """The options a resumed run must share with the run it continues."""
        keep = ("method", "teacher", "prompts", "data", "resolution", "num_steps", "batch_size", "gradient_accumulation_steps", "lora_rank", "lora_targets", "seed",
                "divergence", "gan_weight", "phases", "ode_steps", "target", "source", "jump_fraction")
        return {k: getattr(self, k) for k in keep}


class DigitsData:
    """Real digits and their labels; data-free methods use the labels only."""

    def __init__(self, teacher, batch_size: int):
        self.images, self.labels = load_digits_images()
        self.batch_size = batch_size

    def batch(self, generator: torch.Generator) -> dict:
        idx = torch.randint(0, len(self.images), (self.batch_size,), generator=generator)
        return {"images": self.images[idx], "conditions": {"class_labels": self.labels[idx]}}


class PromptData:
    """Data-free batches: prompts drawn from a list (no images)."""

    def __init__(self, teacher, batch_size: int, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--prompts {path}: no such file.")
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {path} holds no prompt.")
        teacher.set_prompts(prompts)
        self.teacher, self.batch_size = teacher, batch_size

    def batch(self, generator: torch.Generator) -> dict:
        return {"conditions": self.teacher.sample_conditions(self.batch_size, generator)}


class ImageFolderData:
    """Images with captions (``name.png`` + ``name.txt``), encoded once by the teacher's VAE."""

    SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

    def __init__(self, teacher, batch_size: int, folder: str):
        from PIL import Image

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--data {folder}: no such folder.")
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(self.SUFFIXES))
        captioned = [n for n in names if os.path.isfile(os.path.join(folder, os.path.splitext(n)[0] + ".txt"))]
        if not captioned:
            raise ValueError(f"--data {folder} holds no image with a caption (name.png + name.txt).")
        captions = [open(os.path.join(folder, os.path.splitext(n)[0] + ".txt"), encoding="utf-8").read().strip() or " " for n in captioned]
        teacher.set_prompts(captions)
        pipe, size = teacher.pipeline, teacher.resolution
        latents = []
        with torch.no_grad():
            for name in captioned:
                image = Image.open(os.path.join(folder, name)).convert("RGB").resize((size, size))
                pixels = pipe.image_processor.preprocess(image).to(pipe.vae.device, pipe.vae.dtype)
                latent = pipe.vae.encode(pixels).latent_dist.mean
                shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
                latents.append((latent - shift) * pipe.vae.config.scaling_factor)
        self.images, self.batch_size = torch.cat(latents).float().cpu(), batch_size

    def batch(self, generator: torch.Generator) -> dict:
        idx = torch.randint(0, len(self.images), (self.batch_size,), generator=generator)
        return {"images": self.images[idx], "conditions": {"prompt_index": idx}}


def make_data(teacher, config: "DistillConfig", needs_images: bool):
    if teacher.architecture == "digits":
        if config.prompts or config.data:
            raise ValueError("the digits teacher trains on the embedded digits; --prompts and --data are for text-to-image teachers.")
        return DigitsData(teacher, config.batch_size)
    if config.data:
        return ImageFolderData(teacher, config.batch_size, config.data)
    if needs_images:
        raise ValueError(f"method {config.method!r} (with these options) trains on images: pass --data FOLDER (images + .txt captions).")
    if not config.prompts:
        raise ValueError("a text-to-image teacher needs --prompts FILE (one prompt per line) or --data FOLDER.")
    return PromptData(teacher, config.batch_size, config.prompts)


def _checkpoints(folder: str) -> list[str]:
    names = [n for n in os.listdir(folder) if n.startswith("step-")] if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n.split("-")[1]))]


def _check_output_dir(config: DistillConfig) -> None:
    run_file = os.path.join(config.output_dir, RUN_FILE)
    if os.path.isfile(run_file):
        with open(run_file, encoding="utf-8") as f:
            previous = json.load(f)
        if not config.resume:
            raise ValueError(f"{config.output_dir} holds another run; pass --resume latest to continue it, or choose a new --output-dir.")
        if previous != config.comparable():
            diff = {k: (previous.get(k), v) for k, v in config.comparable().items() if previous.get(k) != v}
            raise ValueError(f"--resume: the run in {config.output_dir} was started with other options {diff} (was, now).")
    elif config.resume:
        raise ValueError(f"--resume {config.resume}: {config.output_dir} holds no run to continue.")
    elif os.path.isdir(config.output_dir) and os.listdir(config.output_dir):
        raise ValueError(f"{config.output_dir} is not empty and holds no run of this trainer; choose a new --output-dir.")


def distill(config: DistillConfig) -> dict:
    """Run a distillation; returns ``{"student_dir": ..., "scores": ...}``."""
    _check_output_dir(config)
    log_with = config.log_with
    if log_with == "auto":
        log_with = "tensorboard" if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX") else "none"
    log_with = None if log_with in ("", "none") else log_with
    accelerator = Accelerator(mixed_precision=config.mixed_precision, project_dir=config.output_dir, log_with=log_with)
    set_seed(config.seed)
    teacher = load_teacher(config.teacher, resolution=config.resolution)
    teacher.pipeline.to(accelerator.device)
    method_cls = get_method(config.method)
    method_cls.check_teacher(teacher)
    student = copy.deepcopy(teacher.model).train()
    uses_r = getattr(method_cls, "uses_r", False)
    if uses_r:  # flow-map / MeanFlow students: the teacher plus a zero-initialised second-time embedding
        student = add_r_conditioning(student)
    if config.gradient_checkpointing:
        if not student._supports_gradient_checkpointing:
            raise ValueError(f"--gradient-checkpointing: {type(student).__name__} does not support gradient checkpointing.")
        student.enable_gradient_checkpointing()
    if config.lora_rank > 0:
        from peft import LoraConfig

        default = "qkv,proj" if teacher.architecture == "digits" else "to_q,to_k,to_v,to_out.0"
        targets = [t.strip() for t in (config.lora_targets or default).split(",") if t.strip()]
        student.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank, target_modules=targets))
    else:
        student.requires_grad_(True)
    r_module = getattr(student, "r_embedder", None) or getattr(student, "r_embed", None)
    if r_module is not None:  # trained fully by r-methods; left alone by one-time methods (DDP wants no unused params)
        r_module.requires_grad_(uses_r)
    gamma = method_cls.sampler_gamma(config)
    scheduler_cls = getattr(schedulers, method_cls.scheduler_class)
    scheduler = scheduler_cls.from_config(
        teacher.pipeline.scheduler.config, timestep_preset=method_cls.timestep_preset, **({} if gamma is None else {"gamma": gamma})
    )
    method = method_cls(teacher, student, scheduler, config)
    method.accelerator = accelerator
    method.accumulation_steps = config.gradient_accumulation_steps
    accelerator.register_for_checkpointing(method)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=method_cls.adam_betas, weight_decay=0.0)
    student, optimizer = accelerator.prepare(student, optimizer)
    method.student = student
    for attribute, value in method.auxiliary().items():  # fake score, discriminator head, their optimizer
        setattr(method, attribute, accelerator.prepare(value))
    ema = EMAModel(params, decay=config.ema_decay) if config.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    data = make_data(teacher, config, needs_images=method.needs_data)

    os.makedirs(config.output_dir, exist_ok=True)
    ckpt_dir = os.path.join(config.output_dir, "checkpoints")
    start = 0
    if config.resume:
        found = _checkpoints(ckpt_dir) if config.resume == "latest" else [config.resume]
        if not found or not os.path.isdir(found[-1]):
            raise ValueError(f"--resume {config.resume}: no checkpoint found in {ckpt_dir}.")
        accelerator.load_state(found[-1])
        start = int(os.path.basename(found[-1]).split("-")[1])
        accelerator.print(f"resumed from {found[-1]} (step {start})")
    write_atomically(os.path.join(config.output_dir, RUN_FILE), json.dumps(config.comparable(), indent=2) + "\n")
    if log_with:
        accelerator.init_trackers("onestep-train", config=dataclasses.asdict(config))

    def save_checkpoint(step: int) -> str:
        final = os.path.join(ckpt_dir, f"step-{step}")
        tmp = os.path.join(ckpt_dir, f".tmp-step-{step}")
        accelerator.save_state(tmp)
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in _checkpoints(ckpt_dir)[: -config.checkpoints_to_keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    progress = tqdm(range(start, config.max_train_steps), initial=start, total=config.max_train_steps, disable=not accelerator.is_main_process, desc=config.method)
    started = time.time()
    for step in progress:
        # step: one generator per (seed, step, micro-batch, process) for data and noise
        try:
            for micro in range(config.gradient_accumulation_steps):
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + (step * 64 + micro) * 97 + accelerator.process_index)
                method.last_micro_step = micro == config.gradient_accumulation_steps - 1
                logs = method.train_step(step, data.batch(generator), generator, optimizer)
        except TrainingDiverged as error:
            last = _checkpoints(ckpt_dir)
            raise TrainingDiverged(
                f"step {step + 1}: {error}; the run stopped before applying it. Last good checkpoint: "
                f"{last[-1] if last else 'none'} (lower the learning rate and --resume latest)."
            ) from None
        # EMA
        if ema is not None:
            ema.step(params)
        progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items()} | {"s/step": f"{(time.time() - started) / (step + 1 - start):.2f}"})
        if log_with:
            accelerator.log(logs, step=step + 1)
        # checkpoint and preview
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.max_train_steps:
            save_checkpoint(step + 1)
        if config.preview_every and (step + 1) % config.preview_every == 0 and accelerator.is_main_process:
            _preview(teacher, accelerator.unwrap_model(student), ema, params, scheduler, config, f"step-{step + 1}")

    accelerator.wait_for_everyone()
    seconds = time.time() - started
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
    result = {
        "seconds": seconds,
        "steps": config.max_train_steps - start,
        "seconds_per_step": seconds / max(1, config.max_train_steps - start),
        "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if accelerator.device.type == "cuda"
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # GPU: allocated tensors; CPU: peak RSS
        "rank_checksums": accelerator.gather(checksum).tolist(),  # identical on every process under DDP
    }
    if accelerator.is_main_process:
        result.update(_export(teacher, accelerator.unwrap_model(student), ema, params, scheduler, config))
        write_atomically(os.path.join(config.output_dir, "summary.json"), json.dumps(result, indent=2) + "\n")
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # a clean exit for gloo / NCCL workers
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return result


def _ema_weights(ema, params):
    """A context that swaps the EMA weights in (and back out)."""

    class _Swap:
        def __enter__(self):
            if ema is not None:
                ema.store(params)
                ema.copy_to(params)

        def __exit__(self, *exc):
            if ema is not None:
                ema.restore(params)

    return _Swap()


def _student_pipeline(teacher, model, scheduler, metadata=None):
    scheduler = type(scheduler).from_config(scheduler.config)
    if teacher.architecture == "digits":
        pipe = DigitsPipeline(model.eval(), scheduler)
    else:
        components = {**teacher.pipeline.components, teacher.denoiser_name: model.eval(), "scheduler": scheduler}
        pipe = PIPELINES_BY_ARCHITECTURE[teacher.architecture](**components)
    pipe.set_progress_bar_config(disable=True)
    if metadata is not None:
        pipe.set_student(metadata, set_scheduler=False)
    return pipe


def _preview(teacher, model, ema, params, scheduler, config, name):
    folder = os.path.join(config.output_dir, "previews")
    os.makedirs(folder, exist_ok=True)
    with _ema_weights(ema, params), torch.no_grad():
        pipe = _student_pipeline(teacher, model, scheduler)
        generator = torch.Generator().manual_seed(0)
        if teacher.architecture == "digits":
            images = pipe(class_labels=list(range(10)) * 4, num_inference_steps=config.num_steps, generator=generator, output_type="latent").images
            save_grid(images.float().clamp(-1, 1), os.path.join(folder, f"{name}.png"))
        else:
            kwargs = {"true_cfg_scale" if teacher.architecture == "flux" else "guidance_scale": 1.0}
            images = pipe(prompt=teacher.prompts[:4], num_inference_steps=config.num_steps, height=config.resolution, width=config.resolution,
                          generator=generator, output_type="pt", **kwargs).images
            save_grid(images * 2 - 1, os.path.join(folder, f"{name}.png"), nrow=len(images), scale=1)
    model.train()


def _export(teacher, model, ema, params, scheduler, config) -> dict:
    """Write the student (full pipeline, or LoRA + merged pipeline), its model card, FD table and grid."""
    from ..benchmark.digits import DigitsMetric
    from ..benchmark.evaluate import sample_digits

    metadata = StudentMetadata.from_scheduler(
        scheduler, method=config.method, architecture=teacher.architecture, num_inference_steps=config.num_steps,
        recommended_steps=[config.num_steps], guidance_scale=config.guidance_scale,
        guidance_baked=config.guidance_scale != 1.0, base_model=teacher.source, r_conditioning=getattr(get_method(config.method), "uses_r", False),
    )
    out = {}
    with _ema_weights(ema, params), torch.no_grad():
        model = model.eval()
        if config.lora_rank > 0:
            save_student_lora(os.path.join(config.output_dir, "lora"), model, metadata)
            out["lora_dir"] = os.path.join(config.output_dir, "lora")
            model = copy.deepcopy(model)
            model.fuse_lora()
            model.unload_lora()
        pipe = _student_pipeline(teacher, model, scheduler, metadata)
        student_dir = os.path.join(config.output_dir, "student")
        pipe.save_pretrained(student_dir)
        out["student_dir"] = student_dir
        rows, grid = [], None
        if config.evaluate and teacher.architecture == "digits":
            metric = DigitsMetric()
            teacher.pipeline.set_progress_bar_config(disable=True)
            for nfe in (1, 4, 32):
                score = metric.score(*sample_digits(teacher.pipeline, nfe, euler_grid=True))
                rows.append({"model": "teacher (Euler)", "NFE": nfe, "FD-digits": score.fd, "accuracy": score.acc})
            # the student at the step count it was trained for; flow-map students at 1, 2, 4 and 8 steps too
            for nfe in sorted({config.num_steps, 1, 2, 4, 8}) if metadata.r_conditioning else [config.num_steps]:
                images, labels = sample_digits(pipe, nfe)
                score = metric.score(images, labels)
                rows.append({"model": f"student ({config.method})", "NFE": nfe, "FD-digits": score.fd, "accuracy": score.acc})
                grid = images[:100] if nfe == config.num_steps else grid
            out["scores"] = rows
        if grid is not None:
            save_grid(grid, os.path.join(config.output_dir, "samples.png"))
        for folder, kind in ((student_dir, "full"), (out.get("lora_dir"), "lora")):
            if folder:
                write_model_card(folder, metadata, kind, numbers=rows, grid=os.path.join(config.output_dir, "samples.png") if grid is not None else None)
    if config.push_to_hub:
        from ..students import push_student

        out["hub_url"] = push_student(out.get("lora_dir") or student_dir, config.push_to_hub)
    return out

