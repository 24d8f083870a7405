"""Distillation methods, one file each, registered by name.

A method owns its losses and its auxiliary networks (fake score, discriminator) and their optimizers; the
trainer owns the student, its optimizer, EMA, checkpoints and logging. ``train_step`` does one update and
returns the losses it logged. Student roll-outs use the sampling core through :meth:`Method.rollout`, with the
times of the scheduler the student will be sampled with, so the student trains the way it samples.
"""

from __future__ import annotations

import torch

from ...sampling import consistency_step

METHODS: dict[str, type] = {}


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the run stops before the bad update is applied."""


def register_method(cls):
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"method {name!r} is unknown; choose one of {sorted(METHODS)}.")
    return METHODS[name]


def check_finite(loss: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(loss).all():
        raise TrainingDiverged(f"the {name} loss is {loss.item() if loss.numel() == 1 else 'not finite'}")
    return loss


class Method:
    """Base class: holds the teacher, the student, the student's sampling times and the run config."""

    name = ""
    needs_data = False
    scheduler_class = "ConsistencyScheduler"  # how students of this method sample (a class of onestep_pipelines.schedulers)
    timestep_preset = "trailing"
    adam_betas = (0.0, 0.99)  # the student's AdamW betas (DMD2's choice; regression objectives use momentum)

    @classmethod
    def check_teacher(cls, teacher) -> None:
        """Raise a clear error when the method cannot distil this teacher (before anything is built)."""

    @staticmethod
    def sampler_gamma(config) -> float | None:
        """The sampler's gamma (None for schedulers without one): 1 = re-noise fully between steps."""
        return 1.0

    def __init__(self, teacher, student, scheduler, config):
        self.teacher, self.student, self.config = teacher, student, config
        self.scheduler = scheduler  # the student's sampler; its times drive the roll-outs
        scheduler.set_timesteps(config.num_steps, mu=teacher.shift_mu())
        self.times = scheduler.native_times(scheduler.timesteps)

    def auxiliary(self) -> dict:
        """``{attribute: module or optimizer}`` of the method's trainable auxiliary networks and their optimizers;
        the trainer prepares each with accelerate (devices, DDP, checkpoints) and sets it back on the method."""
        return {}

    def rollout(self, noise: torch.Tensor, conditions: dict, steps: int, generator: torch.Generator) -> torch.Tensor:
        """Sample the student for ``steps`` of its own schedule without gradients (backward simulation, DMD2 / TDM)
        and return ``x_t`` at step ``steps``. Each step is the consistency rule of the sampling core: predict
        ``(x0, eps)``, then move to the next time with fresh noise (gamma 1) or with ``eps`` itself (gamma 0, the
        deterministic DDIM / Euler move of TDM students)."""
        x = noise
        deterministic = self.sampler_gamma(self.config) in (0.0, None)
        with torch.no_grad():
            for i in range(steps):
                t = self.times[i].expand(len(x))
                x0, eps = self.teacher.predict(self.student, x, t, conditions)
                alpha, sigma = self.teacher.coefficients(self.times[i + 1].expand(len(x)))
                fresh = eps if deterministic else torch.randn(x.shape, generator=generator).to(x.device)
                x = consistency_step(x0, fresh, alpha, sigma)
        return x

    accumulation_steps = 1  # set by the trainer: micro-batches per optimizer step
    last_micro_step = True

    def update(self, loss: torch.Tensor, optimizer, name: str) -> None:
        """Backward ``loss`` and, on the last micro-batch of an update, step ``optimizer`` (gradient accumulation).
        A non-finite loss or gradient stops the run before the step."""
        check_finite(loss, name)
        self.accelerator.backward(loss / self.accumulation_steps)
        if not self.last_micro_step:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            raise TrainingDiverged(f"the {name} gradient is not finite")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def train_step(self, step: int, batch: dict, generator: torch.Generator, optimizer) -> dict[str, float]:
        """One update of the student (and of the method's auxiliary networks); returns the losses to log."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


from . import consistency, dmd2, flowmap, meanflow, tdm  # noqa: E402,F401  (registers the methods)
