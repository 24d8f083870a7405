"""The distillation loop (accelerate): student, EMA, checkpoints, resume, validation, previews, export.

One explicit loop with its blocks in a fixed order (EDM style): status, step, EMA, logs, checkpoint, validation,
preview. Every micro-batch draws its data and noise from :class:`~onestep_pipelines.training.draws.Draws`, seeded by
``(seed, update, micro-batch)``, so a run resumed from a checkpoint continues exactly as if it had never stopped,
with any number of processes. Nothing in the loop reads a device value on the host except every ``--log-every``
updates, so accelerators are never kept waiting.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.util
import json
import os
import resource
import time

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from onestep_pipelines import schedulers
from onestep_pipelines.benchmark.digits import DigitsMetric
from onestep_pipelines.benchmark.evaluate import save_grid, score_digits, trajectory_straightness
from onestep_pipelines.benchmark.text_digits import TextDigitsMetric, score_text_digits
from onestep_pipelines.metadata import StudentMetadata
from onestep_pipelines.models import add_r_conditioning
from onestep_pipelines import pipelines
from onestep_pipelines.pipelines.loading import write_atomically
from onestep_pipelines.students import base_model_name, save_student_lora, write_model_card

from . import checkpoint, hub_checks, sharding
from .config import CONFIG_FILE, RUN_FILE, DistillConfig, config_yaml, flag
from .data import make_data
from .draws import Draws
from .methods import TrainingDiverged, get_method, recorded_name
from .methods.base import FiniteGuard, Method, add_lora, tied_copy
from .quantized import is_quantized, quantize_base
from .stopping import StopRequest, TrainingInterrupted
from .threads import CpuThreads
from .teachers import load_teacher


def choose_precision(config: DistillConfig, device: torch.device) -> tuple[str, str]:
    """``(mixed precision, why)``. ``auto``: full precision on the CPU and for the 1.3 M-parameter digits model (its
    updates are bound by kernel launches, which autocast only adds to); bf16 for text-to-image teachers on an
    accelerator that supports it (fp16 otherwise), the precision their published recipes train in. fp16 on the CPU
    is refused (CPU autocast has no fp16: the first update would fail)."""
    if config.mixed_precision != "auto":
        precision, why = config.mixed_precision, "as asked"
    elif os.environ.get("ACCELERATE_MIXED_PRECISION"):
        precision, why = os.environ["ACCELERATE_MIXED_PRECISION"], "auto: from the accelerate config"
    else:
        return _auto_precision(config, device)
    if precision == "fp16" and device.type == "cpu":
        source = "--mixed-precision fp16" if why == "as asked" else "fp16 (ACCELERATE_MIXED_PRECISION, from the accelerate config)"
        raise ValueError(f"{source} needs a GPU, and this run is on the CPU: use --mixed-precision bf16 or no.")
    return precision, why


def _auto_precision(config: DistillConfig, device: torch.device) -> tuple[str, str]:
    if device.type == "cpu":
        return "no", "auto: the CPU"
    if config.digits_teacher:
        return "no", "auto: the digits model is too small to gain from autocast"
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    return ("bf16" if bf16 else "fp16"), "auto: a text-to-image teacher on an accelerator"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated tensors on CUDA, resident memory elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters of ``module`` in ``dtype``, in place (diffusers' ``.to(dtype)`` warns about modules it keeps in
    float32; these models have none)."""
    for p in module.parameters():
        if not is_quantized(p):  # (a quantized base keeps its storage: --quantize-base)
            p.data = p.data.to(dtype)


def parameter_memory(modules) -> tuple[int, int]:
    """``(bytes, shared bytes)`` of the parameters of ``modules``, each tensor counted once (by its storage), and the
    bytes of those that more than one module holds (a tied frozen base)."""
    seen, owners = {}, {}
    for index, module in enumerate(modules):
        for p in module.parameters():
            p = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 shard: this process's part
            inner = [getattr(p, name) for name in p.__tensor_flatten__()[0]] if is_quantized(p) else [p]  # a quantized weight's parts
            for t in inner:
                key = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else id(t)
                seen[key] = t.untyped_storage().nbytes() if t.device.type != "meta" else 0
                owners.setdefault(key, set()).add(index)
    return sum(seen.values()), sum(n for key, n in seen.items() if len(owners[key]) > 1)


def _count(module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def distill(config: DistillConfig, teacher=None, data=None, export: bool = True) -> dict:
    """Run a distillation; returns the run summary (``student_dir``, ``scores``, timings...).

    ``teacher`` (a :class:`~onestep_pipelines.training.teachers.Teacher`) and ``data`` (an object with ``batch(rng)``)
    replace ``config.teacher`` and the data the config names; ``export=False`` writes no checkpoint and no student
    (the GPU benchmark's real-size runs of a few updates). torch's CPU thread count is the run's (``--cpu-threads``)
    while it runs, and the caller's again after."""
    threads = CpuThreads(config.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    previous = torch.get_num_threads()
    try:
        return _distill(config, teacher, data, export, threads)
    finally:
        torch.set_num_threads(previous)


@dataclasses.dataclass
class _Run:
    """What one run is on: its accelerator and engine, precision, CPU threads and the checkpoint it resumes."""

    accelerator: Accelerator
    engine: str  # "single", "ddp" or "fsdp" (sharding.engine)
    precision: str
    precision_why: str
    log_with: str | None
    threads: CpuThreads
    threads_why: str
    resume_from: tuple[str, dict] | None
    teacher_cached_only: bool  # the Hub is unreachable: a Hub teacher loads from the local cache

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    @property
    def fsdp(self) -> bool:
        return self.engine == "fsdp"


@dataclasses.dataclass
class _Placed:
    """The method with its networks placed on the processes, the student's optimizer, its trainable parameters and
    their EMA, and what export and checkpoints need of them."""

    method: object
    optimizer: torch.optim.Optimizer
    method_optimizers: dict
    params: list
    ema: EMAModel | None
    names: list[str]  # the student's trainable parameter names (checkpoint keys)
    template: torch.nn.Module | None  # FSDP2: the weightless skeleton the sharded student is exported into
    weight_bytes: int = 0  # parameters of the teacher, student and method networks, each tensor counted once


def _distill(config: DistillConfig, teacher, data, export: bool, threads: CpuThreads) -> dict:
    run = _start(config, threads, load_teacher_here=teacher is None)
    teacher = teacher or load_teacher(config.teacher, resolution=config.resolution, local_files_only=run.teacher_cached_only)
    method_cls = get_method(config.method)
    method_cls.check_teacher(teacher)
    student, scheduler, blocks = _make_student(run, config, teacher, method_cls)
    method = method_cls(teacher, student, scheduler, config, accelerator=run.accelerator, guard=FiniteGuard(run.device, run.accelerator.num_processes))
    placed = _place(run, config, method, blocks)
    data = method.prepare(data or make_data(teacher, config, run.device))
    start, parts = _resume(run, config, placed)
    part = _train(run, config, placed, data, export, start, parts)
    result = _summary(run, config, placed, start, parts + [part])
    if export:
        result.update(_export_run(run, config, teacher, placed, scheduler, result))
    _close(run, placed)
    return result


def _start(config: DistillConfig, threads: CpuThreads, load_teacher_here: bool) -> _Run:
    """Checks that need no model (paths, Hub ids, the launch), the accelerator, precision and CPU threads; prints the
    run's first line."""
    config.check_paths(teacher=load_teacher_here)
    cached_only = hub_checks.check_run(config, teacher=load_teacher_here)  # Hub ids and uploads: seconds, not a retry loop
    sharding.check_launch()  # DeepSpeed, FSDP1: refused before anything loads
    cpu = config.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU")  # (torchrun with CPU processes sets it)
    state = PartialState(cpu=cpu)
    precision, why = choose_precision(config, state.device)
    log_with = config.log_with
    if log_with == "auto":
        log_with = "tensorboard" if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX") else "none"
    log_with = None if log_with in ("", "none") else log_with
    accelerator = Accelerator(mixed_precision=precision, project_dir=config.output_dir, log_with=log_with, cpu=cpu)
    sharding.use_fsdp_on_cpu(accelerator)
    engine = sharding.engine(accelerator)  # (fp16 under FSDP refused)
    resume_from = _resume_point(config, accelerator.num_processes)  # a checkpoint of another run is refused here
    count, count_why = threads.start()
    torch.set_num_threads(count)
    if not resume_from:  # (a resumed run's own checkpoint holds what --init-from gave it)
        _check_init_from(config)
    run = _Run(accelerator, engine, precision, why, log_with, threads, count_why, resume_from, cached_only)
    accelerator.print(f"device: {describe_device(run.device)} x {accelerator.num_processes} process(es)"
                      f"{' (FSDP2: student, method networks and EMA sharded)' if run.fsdp else ''}, {count} CPU thread(s) ({count_why}); "
                      f"precision: {precision} ({why})")
    set_seed(config.seed)
    return run



def _make_student(run: _Run, config: DistillConfig, teacher, method_cls):
    """The student (a copy of the teacher, made what the method starts from: r-conditioning, LoRA, a policy head...),
    the scheduler it samples with, and the FSDP2 wrap classes. The teacher moves to the device in the compute
    precision."""
    teacher.to_device(run.device, text_encoders=not config.cache)  # (a cache run's prompts are encoded: its text encoders stay on the CPU)
    if run.weight_dtype == torch.bfloat16:  # the text encoders in bf16 too (a 7-24 B one in float32 would hold 30-90 GB for
        # previews); not in fp16, where T5 overflows, and the VAE stays float32 (SDXL's overflows in fp16)
        for encoder in teacher.text_encoders:
            cast(encoder, torch.bfloat16)
    # a LoRA student shares the teacher's frozen base (one copy of the weights) unless FSDP2 shards it, or the method
    # changes the copy's weights before training (reward loads a student's, pi-Flow widens the output layer)
    tie = config.lora_rank > 0 and not run.fsdp and method_cls.start_from.__func__ is Method.start_from.__func__
    if config.quantize_base != "none":  # the base in the compute precision, then quantized, before the networks share it
        if not tie:
            raise ValueError(f"--quantize-base {config.quantize_base}: a quantized base is shared by the LoRA networks; "
                             f"{'FSDP2 shards each network apart' if run.fsdp else f'--method {config.method} changes the base'}: leave it out.")
        cast(teacher.model, run.weight_dtype)
        layers = quantize_base(teacher.model, config.quantize_base, run.device)
        run.accelerator.print(f"base: {layers} linear layers in {config.quantize_base} (torchao, weight-only); the LoRA adapters train in float32")
    student = tied_copy(teacher.model, tie).train()
    scheduler = method_cls.start_from(teacher, student, config)  # reward: a student folder's weights and sampler; piflow: a policy head
    cast(teacher.model, run.weight_dtype)  # the frozen denoiser in the compute precision (as diffusers' training scripts do)
    if method_cls.uses_r:  # flow-map / MeanFlow students: the teacher plus a zero-initialised second-time embedding
        student = add_r_conditioning(student)
    blocks = sharding.wrap_class_names(student, run.accelerator.state.fsdp_plugin) if run.fsdp else None
    if config.gradient_checkpointing:
        if not student._supports_gradient_checkpointing:
            raise ValueError(f"--gradient-checkpointing: {type(student).__name__} does not support gradient checkpointing.")
        student.enable_gradient_checkpointing()
    if config.lora_rank > 0:
        add_lora(student, config.lora_rank, config.lora_alpha, config.lora_targets, teacher.architecture)
    else:
        student.requires_grad_(True)
    r_module = getattr(student, "r_embedder", None) or getattr(student, "r_embed", None)
    if r_module is not None:  # trained fully by r-methods; left alone by one-time methods (DDP wants no unused params)
        r_module.requires_grad_(method_cls.uses_r)
    # trainable weights in float32, frozen ones (a LoRA student's base) in the compute precision; under FSDP all in
    # float32 (one dtype per sharded unit; autocast computes in the run's precision)
    for p in student.parameters():
        if not is_quantized(p):
            p.data = p.data.float() if (p.requires_grad or run.fsdp) else p.data.to(run.weight_dtype)
    if scheduler is None:
        gamma, prediction = method_cls.sampler_gamma(config), method_cls.student_prediction(config, teacher)
        overrides = ({} if gamma is None else {"gamma": gamma}) | ({} if prediction is None else {"prediction_type": prediction})
        scheduler = getattr(schedulers, method_cls.scheduler_class).from_config(
            teacher.pipeline.scheduler.config, timestep_preset=method_cls.timestep_preset, **overrides
        )
    times = config.student_times()
    if times is not None:  # the run's own times: the roll-outs use them, the student's scheduler records them
        scheduler = type(scheduler).from_config(scheduler.config, trained_times=_trained_times(times, teacher, scheduler.config.num_train_timesteps))
    return student, scheduler, blocks


def _trained_times(times: tuple[str, list[float]], teacher, num_train_timesteps: int) -> list:
    """``--timesteps`` / ``--sigmas`` (``DistillConfig.student_times``) as the native times of the teacher's time type
    (VP timesteps, flow sigmas), with an error naming the option when they do not fit the teacher."""
    kind, values = times
    given = ",".join(f"{v:g}" for v in values)
    if teacher.time_type == "vp":
        if kind == "sigmas":
            raise ValueError("--sigmas applies to flow teachers; this teacher is VP (epsilon / v): pass --timesteps, integers such as 999,499.")
        if any(v != round(v) or v > num_train_timesteps - 1 for v in values):
            raise ValueError(f"--timesteps {given}: a VP teacher's timesteps are integers in [0, {num_train_timesteps - 1}].")
        return [int(v) for v in values]
    if kind == "timesteps" and values[0] > num_train_timesteps:
        raise ValueError(f"--timesteps {given}: a flow teacher's timesteps are sigma x {num_train_timesteps}, at most {num_train_timesteps}.")
    return values if kind == "sigmas" else [v / num_train_timesteps for v in values]


def _place(run: _Run, config: DistillConfig, method, blocks) -> _Placed:
    """The student and the method's networks on the processes (one process, DDP or FSDP2 shards), the optimizers and
    the EMA of the student's trainable parameters."""
    accelerator, student = run.accelerator, method.student
    names = list(method.student_trainable_names)
    template = sharding.meta_copy(student) if run.fsdp else None  # the skeleton the sharded student is exported into
    if run.fsdp:
        plugin = accelerator.state.fsdp_plugin
        student = sharding.shard(student, plugin, blocks)
        for attribute, module in method.trained_networks().items():  # fake scores (fake, Phased DMD's fake_k) share the student's blocks
            cast(module, torch.float32)  # (one dtype per FSDP unit, as for the student)
            setattr(method, attribute, sharding.shard(module, plugin, blocks if attribute.startswith("fake") else None))
        for attribute, module in method.target_networks().items():
            setattr(method, attribute, sharding.shard(module, plugin, blocks))
    else:
        student = accelerator.prepare(student)
        for attribute, module in method.trained_networks().items():
            setattr(method, attribute, accelerator.prepare(module))
    params = [p for n, p in accelerator.unwrap_model(student).named_parameters() if p.requires_grad]
    fused = {"fused": True} if run.device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=method.adam_betas, weight_decay=0.0, **fused)
    method.place(student, optimizer)  # (the method's own optimizers are built over its placed networks)
    method_optimizers = method.build_optimizers()
    if not run.fsdp:  # accelerate's optimizer wrapper (fp16 loss scaling); FSDP2 optimizers step their shards as they are
        optimizer = accelerator.prepare(optimizer)
        for attribute, value in method_optimizers.items():
            setattr(method, attribute, accelerator.prepare(value))
        method.place(student, optimizer)
    # (sharded like params under FSDP, where DTensors lack the fused _foreach_copy_ that EMAModel's foreach mode uses)
    ema = EMAModel(params, decay=config.ema_decay, foreach=not run.fsdp) if config.ema_decay > 0 else None
    total, trainable = _count(accelerator.unwrap_model(student))
    aux = sum(_count(accelerator.unwrap_model(m))[1] for m, _ in method.checkpoint_modules().values())
    networks = [method.teacher.model, student, *method.trained_networks().values(), *method.target_networks().values()]
    weights, shared = parameter_memory([accelerator.unwrap_model(m) for m in networks])
    accelerator.print(
        f"student: {total / 1e6:.2f} M parameters, {trainable / 1e6:.3f} M trained"
        f"{f'; method networks: {aux / 1e6:.2f} M' if aux else ''}; optimizer and EMA state about "
        f"{(trainable * (3 if ema else 2) + aux * 2) * 4 / 2**20 / (accelerator.num_processes if run.fsdp else 1):.0f} MB"
        f"{' per process' if run.fsdp else ''}; weights of the {len(networks)} networks {weights / 2**20:.1f} MB"
        f"{f' (the frozen base held once: {shared / 2**20:.1f} MB shared)' if shared else ''}"
    )
    return _Placed(method, optimizer, method_optimizers, params, ema, names, template, weights)


def _resume(run: _Run, config: DistillConfig, placed: _Placed) -> tuple[int, list]:
    """Load the checkpoint the run resumes from (if any) and write the run's files; returns the first update and the
    earlier parts of the run."""
    accelerator = run.accelerator
    os.makedirs(config.output_dir, exist_ok=True)
    start, parts = 0, []
    if run.resume_from:
        path, saved = run.resume_from
        _load_checkpoint(path, placed.method, accelerator, placed.optimizer, placed.ema, placed.names)
        start, parts = saved["update"], saved.get("parts", [])
        accelerator.print(f"resumed from {path} (update {start}; {sum(p['seconds'] for p in parts):.0f} s of training so far)")
    elif config.init_from:
        fresh = _load_weights(config.init_from, placed.method, accelerator, placed.ema, placed.names, init_params=placed.params)
        kept = ", ".join(n for n in placed.method.checkpoint_modules() if n not in fresh) or "no method networks"
        accelerator.print(f"started from {config.init_from}: its student, EMA and {kept}{'; new: ' + ', '.join(fresh) if fresh else ''}; "
                          "optimizers and update count afresh")
    if accelerator.is_main_process:
        write_atomically(os.path.join(config.output_dir, RUN_FILE), json.dumps(config.comparable(), indent=2) + "\n")
        write_atomically(os.path.join(config.output_dir, CONFIG_FILE), config_yaml(config))
    if run.log_with:
        accelerator.init_trackers("onestep-train", config=config.to_dict())
    return start, parts


def _train(run: _Run, config: DistillConfig, placed: _Placed, data, export: bool, start: int, parts: list) -> dict:
    """The loop, from update ``start``; returns this part of the run (updates, seconds and the loss means at each log
    point)."""
    accelerator, device, method, guard = run.accelerator, run.device, placed.method, placed.method.guard
    optimizer, ema, params = placed.optimizer, placed.ema, placed.params
    teacher, scheduler = method.teacher, method.scheduler
    ckpt_dir = os.path.join(config.output_dir, "checkpoints")
    for group in optimizer.param_groups:  # the schedule starts from this run's --learning-rate, on resume too
        group["initial_lr"] = config.learning_rate
    lr_schedule = get_scheduler(config.lr_scheduler, optimizer, step_rules=config.lr_step_rules or None, num_warmup_steps=config.lr_warmup_steps,
                                num_training_steps=config.max_train_steps, last_epoch=start - 1)  # (a pure function of the update)
    part = {"from": start, "to": start, "seconds": 0.0, "processes": accelerator.num_processes, "device": device.type, "precision": run.precision,
            "losses": []}  # the loss means at each log point: summary.json's loss curve (checkpoints keep it across resumes)

    def save_checkpoint(update: int) -> str:
        guard.check()  # never checkpoint diverged weights
        part.update(to=update, seconds=time.time() - started)
        return _save_checkpoint(ckpt_dir, update, method, accelerator, optimizer, ema, placed.names, config, parts + [part])

    progress = tqdm(range(start, config.max_train_steps), initial=start, total=config.max_train_steps,
                    disable=not accelerator.is_main_process, desc=config.method)
    started = time.time()
    sums: dict[str, torch.Tensor] = {}
    summed = 0
    stop = StopRequest(accelerator.print)  # Ctrl-C: finish the update under way, checkpoint, stop
    try:
        stop.install()
        for step in progress:
            # step
            for micro in range(config.gradient_accumulation_steps):
                rng = Draws(config.seed, step, micro, config.batch_size, device, accelerator.process_index, accelerator.num_processes)
                with accelerator.autocast():  # every forward (teacher, fake score, student) in the mixed precision
                    logs = method.step(data.batch(rng), rng)
            lr = lr_schedule.get_last_lr()[0]  # this update's
            lr_schedule.step()
            # EMA
            if ema is not None:
                ema.step(params)
            # logs: read from the device every log_every updates
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value
            summed += 1
            done = step + 1
            log_point = done % config.log_every == 0 or done == config.max_train_steps or done - start == 5
            if log_point:
                if run.threads.follow(done):  # other work came or went
                    torch.set_num_threads(run.threads.count)
                guard.check()
                means = {k: float(v) / summed for k, v in sums.items()}
                if config.lr_scheduler != "constant":
                    means["lr"] = lr
                sums, summed = {}, 0
                part["losses"].append({"update": done, **means})
                seconds = time.time() - started
                progress.set_postfix({k: f"{v:.3g}" if k == "lr" else f"{v:.4f}" for k, v in means.items()} | {"s/update": f"{seconds / (done - start):.3f}"})
                if run.log_with:
                    accelerator.log(means, step=done)
                if done - start == 5 and config.max_train_steps - done > 0:
                    left = seconds / 5 * (config.max_train_steps - done)
                    accelerator.print(f"\nestimate: {_duration(left)} for the remaining {config.max_train_steps - done} updates "
                                      f"({seconds / 5:.3f} s each); peak memory {peak_memory_mb(device):.0f} MB")
            # checkpoint, stop (Ctrl-C), validation, preview
            stopping = _stop_agreed(stop, accelerator, log_point)
            if export and (done % config.checkpoint_every == 0 or done == config.max_train_steps or stopping):
                saved = save_checkpoint(done)
            if stopping:
                accelerator.end_training()
                raise TrainingInterrupted(done, saved if export else None)
            validate = config.validation_every and done % config.validation_every == 0
            preview = config.preview_every and done % config.preview_every == 0
            if validate or preview:
                guard.check()
            if (validate or preview) and (run.fsdp or accelerator.is_main_process):  # a sharded student samples
                if validate:  # with every process taking part; the main one writes
                    _validate(teacher, accelerator, method.student, ema, params, scheduler, config, done, run.log_with)
                if preview:
                    _preview(teacher, accelerator, accelerator.unwrap_model(method.student), ema, params, scheduler, config, f"step-{done}")
        guard.check()
    except TrainingDiverged as error:
        last = checkpoint.list_checkpoints(ckpt_dir)
        raise TrainingDiverged(
            f"{error}. Last good checkpoint: {last[-1] if last else 'none'} (lower the learning rate and --resume latest)."
        ) from None
    finally:
        stop.uninstall()
    accelerator.wait_for_everyone()
    part.update(to=config.max_train_steps, seconds=time.time() - started)
    return part


def _summary(run: _Run, config: DistillConfig, placed: _Placed, start: int, runs: list) -> dict:
    """The run summary (summary.json): time, device, precision, memory and a checksum of the weights per process."""
    accelerator, part = run.accelerator, runs[-1]
    checksum = torch.stack([checkpoint.whole_tensor(p).double().sum() for p in placed.params]).sum().reshape(1).to(run.device)
    return {
        "steps": config.max_train_steps,
        "seconds": sum(p["seconds"] for p in runs),
        "seconds_per_step": sum(p["seconds"] for p in runs) / config.max_train_steps,
        "this_part": {"steps": config.max_train_steps - start, "seconds": part["seconds"], "resumed_from": start if run.resume_from else None},
        "parts": runs,
        "device": describe_device(run.device),
        "precision": run.precision,
        "engine": run.engine,
        "processes": accelerator.num_processes,
        "global_batch_size": config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
        "peak_memory_mb": peak_memory_mb(run.device),
        "weights_mb": placed.weight_bytes / 2**20,  # teacher, student and method networks, a shared frozen base counted once
        "cpu_threads": {"why": run.threads_why, "changes": run.threads.history},  # [update, count] at the start and at each change
        "rank_checksums": accelerator.gather(checksum).tolist(),  # identical on every process (DDP replicas, FSDP gathers)
    }


def _export_run(run: _Run, config: DistillConfig, teacher, placed: _Placed, scheduler, result: dict) -> dict:
    """Write the student (EMA weights), its report, summary.json and, last, the upload: a failed upload loses nothing.
    Returns what the export adds to the summary (on the main process)."""
    accelerator, student, added = run.accelerator, placed.method.student, {}
    if run.fsdp:  # whole tensors (EMA weights in place) into the weightless skeleton, on the main process
        model = _gathered_student(accelerator.unwrap_model(student), placed.template, placed.ema, placed.names, accelerator.is_main_process)
        if model is not None and teacher.architecture == "digits":
            model = model.to(run.device)  # (scored with the teacher's pipeline, which lives there)
        ema_export, params_export = None, None
    else:
        model, ema_export, params_export = accelerator.unwrap_model(student), placed.ema, placed.params
    if accelerator.is_main_process:
        added.update(_export(teacher, model, ema_export, params_export, scheduler, config, run.device))
        write_atomically(os.path.join(config.output_dir, "summary.json"), json.dumps(result | added, indent=2) + "\n")
        if config.push_to_hub:  # after every output is written: a failed upload loses nothing
            added.update(_push(result | added, config))
            write_atomically(os.path.join(config.output_dir, "summary.json"), json.dumps(result | added, indent=2) + "\n")
    return added


def _close(run: _Run, placed: _Placed) -> None:
    """Free the processes' wrappers and end the run (trackers, process group)."""
    accelerator, method = run.accelerator, placed.method
    if accelerator.num_processes > 1:  # free the DDP wrappers while every process and the process group are here:
        networks = ("student", *method.trained_networks(), *method.target_networks(), "optimizer", *placed.method_optimizers)
        for attribute in networks:  # a gloo group destroyed later, from a wrapper's destructor, can deadlock
            setattr(method, attribute, None)  # its own worker threads (torch 2.13)
        placed.optimizer = placed.method_optimizers = None
        accelerator.free_memory()
        gc.collect()
        accelerator.wait_for_everyone()
    accelerator.end_training()  # stops the trackers and destroys the process group


def _stop_agreed(stop: StopRequest, accelerator, log_point: bool) -> bool:
    """Whether the run stops after this update: a one-process run as soon as Ctrl-C came; the processes of a
    distributed run together, at a log point (one small all-reduce, where they already exchange the NaN flag)."""
    if accelerator.num_processes == 1:
        return stop.requested
    if not log_point:
        return False
    flag = torch.tensor(int(stop.requested), device=accelerator.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes} min {sec} s" if minutes else f"{sec} s"


# ------------------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(folder, update, method, accelerator, optimizer, ema, names, config, parts) -> str:
    student = accelerator.unwrap_model(method.student)
    files = {"student": (checkpoint.model_tensors(student, names), None)}
    files["optimizer"] = checkpoint.optimizer_files(optimizer, {"student": student})
    if ema is not None:
        files["ema"] = checkpoint.ema_files(ema, names)
    for name, (module, subset) in method.checkpoint_modules().items():
        files[name] = (checkpoint.model_tensors(accelerator.unwrap_model(module), subset), None)
    for name, (opt, modules) in method.checkpoint_optimizers().items():
        files[name] = checkpoint.optimizer_files(opt, {k: accelerator.unwrap_model(m) for k, m in modules.items()})
    if accelerator.scaler is not None:  # fp16 loss scaling
        files["grad_scaler"] = ({}, accelerator.scaler.state_dict())
    files["rng"] = (checkpoint.rng_tensors(), None)
    state = {"update": update, "method": config.method, "options": config.comparable(), "parts": parts,
             "processes": accelerator.num_processes}
    path = checkpoint.save(folder, update, files, state, config.checkpoints_to_keep, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    return path


def _load_weights(path, method, accelerator, ema, names, init_params=None) -> list[str]:
    """Load a checkpoint's student, EMA and method networks; returns the method networks it lacks. Only
    ``--init-from`` (``init_params``: the student's trained parameters) accepts those gaps (they keep their fresh
    weights) and a checkpoint without an EMA (this run's starts from its student)."""
    flag = "--resume" if init_params is None else "--init-from"
    student = accelerator.unwrap_model(method.student)
    tensors, _ = checkpoint.load_part(path, "student")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{flag} {path}: the checkpoint lacks trainable weights of this student ({missing[:4]}): another model or method.")
    checkpoint.load_model_tensors(student, tensors, "student")
    if ema is not None and init_params is not None and not os.path.isfile(os.path.join(path, "ema.safetensors")):
        for shadow, param in zip(ema.shadow_params, init_params):
            checkpoint.copy_into(shadow, checkpoint.whole_tensor(param))
    elif ema is not None:
        checkpoint.load_ema_files(ema, names, *checkpoint.load_part(path, "ema"))
    fresh = []
    for name, (module, _) in method.checkpoint_modules().items():
        if init_params is not None and not os.path.isfile(os.path.join(path, f"{name}.safetensors")):
            fresh.append(name)
        else:
            checkpoint.load_model_tensors(accelerator.unwrap_model(module), checkpoint.load_part(path, name)[0], name)
    return fresh


def _load_checkpoint(path, method, accelerator, optimizer, ema, names) -> None:
    """Load every part of a checkpoint (safetensors + JSON) into this run's objects, on any device and world size."""
    _load_weights(path, method, accelerator, ema, names)
    student = accelerator.unwrap_model(method.student)
    checkpoint.load_optimizer_files(optimizer, {"student": student}, *checkpoint.load_part(path, "optimizer"), "optimizer")
    for name, (opt, modules) in method.checkpoint_optimizers().items():
        checkpoint.load_optimizer_files(opt, {k: accelerator.unwrap_model(m) for k, m in modules.items()}, *checkpoint.load_part(path, name), name)
    if accelerator.scaler is not None and os.path.isfile(os.path.join(path, "grad_scaler.json")):
        accelerator.scaler.load_state_dict(checkpoint.load_part(path, "grad_scaler")[1])
    checkpoint.restore_rng(checkpoint.load_part(path, "rng")[0])


# ------------------------------------------------------------------------------------- sampling the student
class _EMAWeights:
    """A context that swaps the EMA weights in (and back out)."""

    def __init__(self, ema, params):
        self.ema, self.params = ema, params

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)


def _student_pipeline(teacher, model, scheduler, metadata=None):
    scheduler = type(scheduler).from_config(scheduler.config)
    pipe = pipelines.student_pipeline(teacher.pipeline, model.eval(), scheduler)  # (keeps requires_safety_checker & co.)
    pipe.set_progress_bar_config(disable=True)
    if metadata is not None:
        pipe.set_student(metadata, set_scheduler=False)
    return pipe


def _steps_to_score(config, any_step_count: bool) -> list[int]:
    """The student at the step count it was trained for; students trained at every time (flow maps, sCM) at 1, 2, 4
    and 8 steps too."""
    return sorted({config.num_steps, 1, 2, 4, 8}) if any_step_count else [config.num_steps]


def _validate(teacher, accelerator, student, ema, params, scheduler, config, update, log_with) -> None:
    """``validation/step-N.json`` (FD-digits and accuracy at the student's step counts, on the teacher's embedded
    benchmark: digits or text-to-image digits) and a sample grid, written by the main process; a teacher of no
    benchmark gets a sample grid only."""
    folder = os.path.join(config.output_dir, "validation")
    model = accelerator.unwrap_model(student)
    if teacher.benchmark is None:
        _preview(teacher, accelerator, model, ema, params, scheduler, config, f"step-{update}", folder=folder)
        return
    with _EMAWeights(ema, params), torch.no_grad(), accelerator.autocast():
        pipe = _student_pipeline(teacher, model, scheduler)
        rows, grid = _score(teacher, pipe, _steps_to_score(config, get_method(config.method).any_step_count), accelerator.device, "student", guidance=1.0)
    model.train()
    if not accelerator.is_main_process:
        return
    os.makedirs(folder, exist_ok=True)
    report = {"update": update, "rows": rows}
    write_atomically(os.path.join(folder, f"step-{update}.json"), json.dumps(report, indent=2) + "\n")
    save_grid(grid, os.path.join(folder, f"step-{update}.png"))
    main = next(r for r in rows if r["NFE"] == config.num_steps)
    accelerator.print(f"\nvalidation at update {update}: FD-digits {main['FD-digits']:.2f}, accuracy {main['accuracy']:.3f} ({config.num_steps} step(s))")
    if log_with:
        accelerator.log({f"validation/fd_{r['NFE']}step": r["FD-digits"] for r in rows} | {"validation/accuracy": main["accuracy"]}, step=update)


def _score(teacher, pipe, steps: list[int], device, name: str, grid_steps: int | None = None, guidance: float | None = None):
    """``(rows, grid)``: a student pipeline of ``teacher`` scored on the teacher's benchmark at ``steps``; ``guidance``
    (text-to-image: the CFG scale of the call; None: the student's own default)."""
    if teacher.benchmark == "digits":
        return score_digits(pipe, steps, DigitsMetric(device=device), name=name, grid_steps=grid_steps)
    kwargs = {} if guidance is None else pipe.guidance_kwargs(guidance)
    with teacher.text_encoders_on(device):
        return score_text_digits(pipe, steps, TextDigitsMetric(device=device), name=name, grid_steps=grid_steps, size=teacher.resolution, **kwargs)


def _preview(teacher, accelerator, model, ema, params, scheduler, config, name, folder=None):
    """A sample grid of the student (EMA weights) as ``previews/<name>.png``, written by the main process."""
    folder = folder or os.path.join(config.output_dir, "previews")
    with _EMAWeights(ema, params), torch.no_grad(), accelerator.autocast():  # (FSDP gathers weights in the compute dtype)
        pipe = _student_pipeline(teacher, model, scheduler)
        generator = torch.Generator().manual_seed(0)
        if teacher.architecture == "digits":
            images = pipe(class_labels=list(range(10)) * 4, num_inference_steps=config.num_steps, generator=generator, output_type="latent").images
            images, nrow, scale = images.float().clamp(-1, 1), None, None
        else:
            with teacher.text_encoders_on(accelerator.device):
                images = pipe(prompt=teacher.prompts[:4], num_inference_steps=config.num_steps, height=teacher.resolution, width=teacher.resolution,
                              generator=generator, output_type="pt", **pipe.guidance_kwargs(1.0)).images
            images, nrow, scale = images.float() * 2 - 1, len(images), 1
    model.train()
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
        save_grid(images, os.path.join(folder, f"{name}.png"), **({"nrow": nrow, "scale": scale} if nrow else {}))


def _gathered_student(model, template, ema, names, is_main: bool):
    """A sharded student as one ordinary module on the main process (None on the others): whole tensors gathered
    from the shards into the weightless ``template``, the EMA weights in place of the trained ones. Collective."""
    tensors = checkpoint.model_tensors(model)  # whole on the main process only
    if ema is not None:
        tensors.update(checkpoint.ema_files(ema, names)[0])
    if not is_main:
        return None
    template.load_state_dict(tensors, assign=True)
    return template


def _resume_point(config, processes: int) -> tuple[str, dict] | None:
    """``(checkpoint folder, its state)`` that ``--resume`` names, checked before anything loads: the same options,
    and the same global batch (a run resumes on another number of processes with the per-process batch that keeps
    it)."""
    if not config.resume:
        return None
    ckpt_dir = os.path.join(config.output_dir, "checkpoints")
    found = checkpoint.list_checkpoints(ckpt_dir) if config.resume == "latest" else [config.resume]
    if not found:
        raise ValueError(f"--resume {config.resume}: no checkpoint found in {ckpt_dir}.")
    path = found[-1]
    saved = checkpoint.read_state(path)
    theirs = saved.get("options") or {}
    their_batch, our_batch = theirs.get("batch_size"), config.batch_size
    differ = config.changed_options(theirs)
    if differ:
        listed = ", ".join(f"{flag(k)} {old!r} (now {new!r})" for k, (old, new) in sorted(differ.items()))
        raise ValueError(f"--resume {path}: that checkpoint was made with other options: {listed}.")
    their_processes = saved.get("processes", 1)
    their_global = (their_batch or 0) * their_processes
    if their_global != our_batch * processes:
        fix = (f"pass --batch-size {their_global // processes}" if their_global % processes == 0 else
               f"{their_global} samples do not split evenly over {processes} processes; use a number of processes that divides {their_global}")
        raise ValueError(f"--resume {path}: that run's global batch was {their_global} ({their_batch} per process x {their_processes} "
                         f"process(es)); this one's is {our_batch * processes} ({our_batch} x {processes}): {fix}.")
    return path, saved


def _check_init_from(config) -> None:
    """The checkpoint ``--init-from`` names, checked before anything loads: a checkpoint of this trainer and method."""
    if not config.init_from:
        return
    saved = checkpoint.read_state(config.init_from, "--init-from")
    if saved.get("method") != config.method:
        raise ValueError(f"--init-from {config.init_from}: a checkpoint of --method {saved.get('method')}; this run is --method {config.method} "
                         "(it starts from a run of its own method).")


def _merged_over_a_full_precision_base(teacher, lora_dir: str):
    """The student of a ``--quantize-base`` run as full weights: the teacher's denoiser reloaded from its source at full
    precision (that component alone) with the LoRA fused (``load_student_lora``); the teacher's quantized denoiser is
    replaced by the reloaded one too, so that the teacher is scored at full precision."""
    from onestep_pipelines.benchmark import teacher_folder
    from onestep_pipelines.students import load_student_lora

    if teacher.architecture == "digits":
        model = load_teacher(teacher.source).model
    else:
        model = type(teacher.model).from_pretrained(teacher_folder(teacher.source), subfolder=teacher.denoiser_name, use_safetensors=True)
    model = model.to(next(teacher.model.parameters()).device).eval().requires_grad_(False)
    setattr(teacher.pipeline, teacher.denoiser_name, model)
    merged = pipelines.student_pipeline(teacher.pipeline, copy.deepcopy(model))
    load_student_lora(merged, lora_dir, fuse=True, set_scheduler=False)
    return merged.denoiser


def _export(teacher, model, ema, params, scheduler, config, device) -> dict:
    """Write the student (full pipeline, or LoRA + merged pipeline), its model card, FD table and grid."""
    method_cls = get_method(config.method)
    uses_r = method_cls.uses_r
    guidance_scale, guidance_baked = method_cls.sampling_guidance(config)
    metadata = StudentMetadata.from_scheduler(
        scheduler, method=recorded_name(config), architecture=teacher.architecture, num_inference_steps=config.num_steps,
        recommended_steps=_steps_to_score(config, method_cls.any_step_count), guidance_scale=guidance_scale,
        guidance_baked=guidance_baked, base_model=base_model_name(teacher.source), r_conditioning=uses_r,
        guidance_embedding=teacher.guidance_embedding,
    )
    out = {}
    with _EMAWeights(ema, params), torch.no_grad():
        model = model.eval()
        if config.lora_rank > 0:
            save_student_lora(os.path.join(config.output_dir, "lora"), model, metadata)
            out["lora_dir"] = os.path.join(config.output_dir, "lora")
            if config.quantize_base != "none":  # the merged student: the base at full precision, reloaded, plus the LoRA
                model = _merged_over_a_full_precision_base(teacher, out["lora_dir"])
            else:
                model = copy.deepcopy(model)
                model.fuse_lora()
                model.unload_lora()
        if config.lora_rank > 0 or teacher.architecture == "digits":
            cast(model, torch.float32)  # (a LoRA student's merged copy: its base is the teacher in the training precision)
        cast(teacher.model, torch.float32)
        pipe = _student_pipeline(teacher, model, scheduler, metadata)
        student_dir = os.path.join(config.output_dir, "student")
        pipe.save_pretrained(student_dir)
        out["student_dir"] = student_dir
        rows, grid = [], None
        if config.evaluate and teacher.benchmark is not None:
            if teacher.benchmark == "digits":  # (a text-to-image teacher's rows are in README: 898 guided samples per setting)
                teacher.pipeline.set_progress_bar_config(disable=True)
                rows, _ = score_digits(teacher.pipeline, [1, 4, 32], DigitsMetric(device=device), name="teacher (Euler)", euler_grid=True)
            student_rows, grid = _score(teacher, pipe, _steps_to_score(config, method_cls.any_step_count), device, f"student ({metadata.method})",
                                        grid_steps=config.num_steps)
            rows += student_rows
            out["scores"] = rows
            if method_cls.reports_straightness and teacher.benchmark == "digits":  # reflow: how straight the ODE became (32 Euler steps, as the teacher's best)
                out["straightness"] = {"teacher": trajectory_straightness(teacher.pipeline, guidance_scale=config.guidance_scale),
                                       "student": trajectory_straightness(pipe)}
        if grid is not None:
            save_grid(grid, os.path.join(config.output_dir, "samples.png"))
        for folder, kind in ((student_dir, "full"), (out.get("lora_dir"), "lora")):
            if folder:
                write_model_card(folder, metadata, kind, numbers=rows, grid=os.path.join(config.output_dir, "samples.png") if grid is not None else None)
    return out


def _push(result: dict, config: DistillConfig) -> dict:
    """Upload the student (the LoRA folder of a LoRA run) to ``--push-to-hub``: ``{"hub_url"}``, or, when the upload
    fails, ``{"hub_error", "push_command"}`` (the command that retries it); the run's outputs stay as they are."""
    from onestep_pipelines.hub import push_student

    try:
        return {"hub_url": push_student(result.get("lora_dir") or result["student_dir"], config.push_to_hub)}
    except Exception as error:  # network, Hub, permission: every way an upload fails must keep the run
        return {"hub_error": hub_checks.error_reason(error), "push_command": hub_checks.push_command(config.output_dir, config.push_to_hub)}
