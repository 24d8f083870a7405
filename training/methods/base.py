"""What every distillation method shares: the teacher, the student, the student's sampling times, roll-outs and the
optimizer step with its NaN / inf guard."""

from __future__ import annotations

import copy

import torch

from onestep_pipelines.sampling import consistency_step

from . import METHODS, TrainingDiverged


class FiniteGuard:
    """Stops a run whose loss or gradient becomes NaN / inf, naming the first bad update.

    In a one-process CPU run a value is checked when it is watched, so the bad update is never applied. Otherwise the
    check stays on the device (one flag, no synchronisation per update) and :meth:`check` reads it (reduced over the
    processes, so they stop together): the trainer calls it with the logs (every ``--log-every`` updates), before
    every checkpoint, validation and preview and at the end, so nothing is ever written from diverged weights.
    """

    def __init__(self, device, processes: int = 1):
        self.immediate = torch.device(device).type == "cpu" and processes == 1
        self.processes, self._device = processes, torch.device(device)
        self._names: dict[str, int] = {}
        self._first = None  # device int64: update * 64 + name id of the first non-finite value, NONE if none

    NONE = 2**62

    def watch(self, value: torch.Tensor, what: str, update: int) -> None:
        if self.immediate:
            if not bool(torch.isfinite(value).all()):
                shown = f" ({value.item()})" if value.numel() == 1 else ""
                raise TrainingDiverged(f"update {update + 1}: the {what} is not finite{shown}; the update was not applied")
            return
        code = update * 64 + self._names.setdefault(what, len(self._names))
        if self._first is None:
            self._first = torch.full((), self.NONE, dtype=torch.long, device=value.device)
        bad = ~torch.isfinite(value).all()
        self._first = torch.where(bad, torch.minimum(self._first, torch.full_like(self._first, code)), self._first)

    def check(self) -> None:
        """Raise :class:`TrainingDiverged` if a watched value was not finite (reads the device flag once). With several
        processes every one calls it at the same points and all raise together (the flag's minimum over processes)."""
        if self.immediate:
            return
        flag = self._first
        if self.processes > 1:
            flag = torch.full((), self.NONE, dtype=torch.long, device=self._device) if flag is None else flag.clone()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag is None:
            return
        first = int(flag)
        if first < self.NONE:
            names = {i: n for n, i in self._names.items()}
            raise TrainingDiverged(f"update {first // 64 + 1}: the {names.get(first % 64, 'loss or gradient')} became non-finite")


_ATTENTION = "to_q,to_k,to_v,to_out.0"
_JOINT_ATTENTION = f"{_ATTENTION},add_q_proj,add_k_proj,add_v_proj,to_add_out"
LORA_TARGETS = {
    "digits": "qkv,proj",
    # the 2026 families: every linear layer of the transformer blocks, as their few-step LoRAs (Lightning, Turbo) train
    "qwen_image": f"{_JOINT_ATTENTION},img_mlp.net.0.proj,img_mlp.net.2,txt_mlp.net.0.proj,txt_mlp.net.2",
    # (a regular expression: a single block's attn.to_out is a Linear, a double block's a ModuleList)
    "flux2": r".*(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff(_context)?\.linear_(in|out))"
             r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))",
    "z_image": f"{_ATTENTION},feed_forward.w1,feed_forward.w2,feed_forward.w3",
}
"""Default LoRA target modules per architecture (``--lora-targets`` overrides); others: the attention projections."""


def tied_copy(module: torch.nn.Module, tie: bool = True) -> torch.nn.Module:
    """A copy of ``module`` whose frozen parameters *are* ``module``'s (the same tensors) and whose trainable ones are
    copied: the teacher, a LoRA student, a LoRA fake score and a target network then hold one frozen base between them
    and differ only in their adapters (pi-Flow ties its teacher, student and EMA bases the same way). ``tie=False``: a
    plain deep copy (FSDP2 shards each network's parameters in place, so sharded networks cannot share them)."""
    if not tie:
        return copy.deepcopy(module)
    return copy.deepcopy(module, {id(p): p for p in module.parameters() if not p.requires_grad})


def ties_bases(accelerator) -> bool:
    """Whether this run's networks share their frozen base (every run but FSDP2's)."""
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) != DistributedType.FSDP


def add_lora(model, rank: int, alpha: float = 0.0, targets: str = "", architecture: str = "") -> None:
    """A peft LoRA adapter on ``model`` (diffusers' ``add_adapter``): ``targets`` comma-separated module names, by
    default :data:`LORA_TARGETS` of the architecture (the attention projections where it names none)."""
    from peft import LoraConfig

    default = LORA_TARGETS.get(architecture, _ATTENTION)
    if not targets and default.startswith(".*"):
        modules = default  # peft matches a string as a regular expression over the full module name
    else:
        modules = [t.strip() for t in (targets or default).split(",") if t.strip()]
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=modules))


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample distance: squared L2 (``"l2"``) or pseudo-Huber ``sqrt(|a - b|^2 + c^2) - c`` with
    ``c = 0.00054 sqrt(d)`` (``"huber"``; Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models")."""
    diff = ((pred - target) ** 2).flatten(1).sum(dim=1)
    if kind == "l2":
        return diff
    c = 0.00054 * (pred[0].numel() ** 0.5)
    return (diff + c**2).sqrt() - c


class Method:
    """Base class: holds the teacher, the student, the student's sampling times and the run config.

    Subclasses set ``name`` (their key in :data:`METHODS`) and implement :meth:`train_step`. ``trained_networks``,
    ``target_networks`` and ``build_optimizers`` tell the trainer what to place on the processes (DDP / FSDP) and
    ``checkpoint_modules`` / ``checkpoint_optimizers`` what to checkpoint. The trainer builds a method with the run's
    ``accelerator`` and NaN / inf ``guard``, hands it the placed student and its optimizer with :meth:`place`, and
    calls :meth:`step` once per micro-batch.
    """

    name = ""
    uses_r = False  # the student takes a second time r (flow maps)
    any_step_count = False  # trained at every time (flow maps, sCM): scored and recommended at 1, 2, 4 and 8 steps
    reports_straightness = False  # the run's report measures the ODE's straightness of teacher and student (reflow)
    scheduler_class = "ConsistencyScheduler"  # how students of this method sample (a class of onestep_pipelines.schedulers)
    timestep_preset = "trailing"
    adam_betas = (0.0, 0.99)  # the student's AdamW betas (DMD2's choice; regression objectives use momentum)

    @classmethod
    def check_teacher(cls, teacher) -> None:
        """Raise a clear error when the method cannot distil this teacher (before anything is built)."""
        if METHODS[cls.name].flow_teacher and teacher.time_type != "flow":
            raise ValueError(f"--method {cls.name} needs a flow teacher (time 1 = noise, velocity prediction); this one is {teacher.time_type}.")

    @staticmethod
    def sampler_gamma(config) -> float | None:
        """The sampler's gamma (None for schedulers without one): 1 = re-noise fully between steps."""
        return 1.0

    @staticmethod
    def student_prediction(config, teacher) -> str | None:
        """What the student's output is, when not the teacher's parameterisation (recorded in its scheduler); None =
        the teacher's."""
        return None

    @staticmethod
    def sampling_guidance(config) -> tuple[float, bool]:
        """``(guidance_scale, baked)`` the student records: the teacher's guidance, baked in unless it is 1."""
        return config.guidance_scale, config.guidance_scale != 1.0

    def __init__(self, teacher, student, scheduler, config, accelerator=None, guard: FiniteGuard | None = None):
        """``accelerator`` (accelerate's, or any object with its ``backward`` / ``unwrap_model``) and ``guard`` are the
        run's; a method built without them (a test of its targets) cannot :meth:`update`."""
        self.teacher, self.student, self.config = teacher, student, config
        self.accelerator, self.guard = accelerator, guard
        self.accumulation_steps = config.gradient_accumulation_steps  # micro-batches per optimizer step
        self.optimizer = None  # the student's, from :meth:`place`
        self.update_index, self.last_micro_step = 0, True  # the update being computed (from :meth:`step`)
        self.scheduler = scheduler  # the student's sampler; its times drive the roll-outs
        scheduler.set_timesteps(config.num_steps, mu=teacher.shift_mu(config.num_steps))
        self.times = scheduler.native_times(scheduler.timesteps).cpu()  # native times (host), one per student step
        self.prediction_type = scheduler.config.get("prediction_type") or teacher.prediction_type  # the student's output
        self.student_trainable_names = [n for n, p in student.named_parameters() if p.requires_grad]

    @classmethod
    def start_from(cls, teacher, student, config):
        """Make the student (a copy of the teacher, changed in place) what the method starts from, and return the
        scheduler it samples with: reward post-training loads a ``--student`` folder's weights and keeps its sampler,
        pi-Flow widens the output layer to a policy head. None: the student is the teacher, sampled as
        :attr:`scheduler_class` says."""
        return None

    def place(self, student, optimizer) -> None:
        """The student as placed on the processes (DDP wrapper or FSDP2 shards) and its optimizer."""
        self.student, self.optimizer = student, optimizer

    def step(self, batch: dict, rng) -> dict[str, torch.Tensor]:
        """:meth:`train_step` on one micro-batch; which update it belongs to, and whether it is the update's last
        micro-batch (the one that steps the optimizers), come from ``rng``."""
        self.update_index = rng.update
        self.last_micro_step = rng.micro == self.accumulation_steps - 1
        return self.train_step(batch, rng)

    def prepare(self, data):
        """The batches the method trains on, given the run's data (called once, after placement; reflow returns its
        teacher couplings)."""
        return data

    def trained_networks(self) -> dict[str, torch.nn.Module]:
        """``{attribute: module}`` of the networks the method trains besides the student (fake score, discriminator
        head). The trainer places each on the processes (DDP wrapper or FSDP2 shards) and sets it back."""
        return {}

    def target_networks(self) -> dict[str, torch.nn.Module]:
        """``{attribute: module}`` of frozen copies of the student that follow it by EMA (consistency / MeanFlow
        targets); sharded like the student under FSDP, so ``ema_`` stays local to each process."""
        return {}

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Create the optimizers of :meth:`trained_networks` over their parameters as placed by the trainer (FSDP2
        replaces parameters with shards); ``{attribute: optimizer}``."""
        return {}

    def checkpoint_modules(self) -> dict[str, tuple[torch.nn.Module, list[str] | None]]:
        """Networks whose state a checkpoint must hold besides the student's: ``{name: (module, parameter names or
        None for all)}`` (target networks of LoRA students hold only the student's trainable names)."""
        return {}

    def checkpoint_optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, dict[str, torch.nn.Module]]]:
        """The method's optimizers and the modules they train: ``{name: (optimizer, {prefix: module})}``."""
        return {}

    def time_at(self, i: int, n: int, device) -> torch.Tensor:
        """Student step ``i``'s native time for a batch of ``n``, on ``device`` (the table is copied there once)."""
        if getattr(self, "_device_times", None) is None or self._device_times.device != torch.device(device):
            self._device_times = self.times.to(device)
        return self._device_times[i].expand(n)

    def rollout(self, noise: torch.Tensor, conditions: dict, steps: int, rng, model=None, times=None, guidance_scale: float = 1.0) -> torch.Tensor:
        """Sample the student for ``steps`` of its own schedule without gradients (backward simulation, DMD2 / TDM)
        and return ``x_t`` at step ``steps``. Each step is the consistency rule of the sampling core: predict
        ``(x0, eps)``, then move to the next time with fresh noise (gamma 1) or with ``eps`` itself (gamma 0, the
        deterministic DDIM / Euler move of TDM students). ``model``, ``times`` (native times on the device, the end
        time last) and ``guidance_scale`` replace the student, its times and its gamma: the teacher's Euler ODE."""
        x = noise
        deterministic = model is not None or self.scheduler.config.get("gamma") in (0.0, None)  # (TDMScheduler has none)
        prediction = self.prediction_type if model is None else None
        model = self.student if model is None else model
        time_at = self.time_at if times is None else (lambda i, n, device: times[i].expand(n))
        with torch.no_grad():
            for i in range(steps):
                x0, eps = self.teacher.predict(model, x, time_at(i, len(x), x.device), conditions, guidance_scale, prediction)
                alpha, sigma = self.teacher.coefficients(time_at(i + 1, len(x), x.device))
                x = consistency_step(x0, eps if deterministic else rng.normal_like(x), alpha, sigma)
        return x

    def predict_student(self, x_t: torch.Tensor, t: torch.Tensor, conditions: dict, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` of the student (or ``model``, a copy of it) in the parameterisation its scheduler
        records."""
        return self.teacher.predict(self.student if model is None else model, x_t, t, conditions, prediction_type=self.prediction_type)

    def update(self, loss: torch.Tensor, optimizer, name: str) -> None:
        """Backward ``loss`` and, on the last micro-batch of an update, step ``optimizer`` (gradient accumulation).
        The loss and the gradient norm are watched by the NaN / inf guard."""
        self.guard.watch(loss.detach(), f"{name} loss", self.update_index)
        with torch.autocast(loss.device.type, enabled=False):  # the backward pass runs outside autocast
            self.accelerator.backward(loss / self.accumulation_steps)
        if not self.last_micro_step:
            return
        if self.accelerator.scaler is None:  # (fp16 loss scaling skips steps with inf gradients by itself)
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            self.guard.watch(norm.full_tensor() if hasattr(norm, "full_tensor") else norm, f"{name} gradient", self.update_index)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def train_step(self, batch: dict, rng) -> dict[str, torch.Tensor]:
        """One update of the student (and of the method's auxiliary networks) from ``batch`` with the random numbers
        of ``rng`` (:class:`~onestep_pipelines.training.draws.Draws`); returns the losses to log (detached tensors)."""
        raise NotImplementedError

    @staticmethod
    def ema_(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
        """``target <- decay * target + (1 - decay) * source`` over matching parameters (a target network)."""
        with torch.no_grad():
            targets = list(target.parameters())
            torch._foreach_lerp_(targets, [p.detach() for p in source.parameters()], 1.0 - decay)
