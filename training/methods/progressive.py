"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"),
the classic baseline: halve the sampler's steps stage by stage.

Stage ``k`` trains a student of ``N_k = N_0 / 2^(k+1)`` deterministic (DDIM / Euler) steps to do in one step what
the stage's teacher does in two (Algorithm 2). On the grid ``t = i / N_k``, ``t' = t - 1 / (2 N_k)``,
``t'' = t - 1 / N_k``, with the stage teacher's DDIM step ``z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t``:

    z_t' = DDIM(z_t -> t'),  z_t'' = DDIM(z_t' -> t''),
    x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

the x0 that takes ``z_t`` to ``z_t''`` in one DDIM step, and the loss is
``max(alpha_t^2 / sigma_t^2, 1) ||x_hat_student(z_t) - x_tilde||^2`` ("truncated SNR" weighting, eq. 9), from data
noised to ``t``. Stage 0's teacher is the frozen teacher with CFG (``--guidance-scale``, baked in); stage ``k + 1``'s
is the student as stage ``k`` leaves it (a frozen copy). ``--ode-steps`` is ``N_0`` (a power of 2 times
``--num-steps``); the ``--max-train-steps`` updates are split evenly over the ``log2(N_0 / num_steps)`` stages.

The paper trains in v-prediction, ``v = alpha_t eps - sigma_t x0`` (section 4), so that ``x_hat = alpha_t z_t -
sigma_t v_hat`` stays defined at zero SNR, where an epsilon model's ``x_hat = (z_t - sigma_t eps_hat) / alpha_t``
divides by ``alpha_t -> 0``. With ``--student-prediction v_prediction`` a student of a VP teacher outputs v (its
scheduler records ``prediction_type="v_prediction"``) and its first stage learns the switch; the default keeps the
teacher's output, measured better for LoRA students of an epsilon SD teacher, whose noisiest step still has
``alpha_t`` = 0.068 (docs/methods.md). A flow teacher's velocity ``eps - x0`` is already such a parameterisation for
the rectified-flow path and is kept. The student samples with the deterministic move (gamma 0)
on the trailing grid of its last stage.
"""

from __future__ import annotations

import math

import torch

from onestep_pipelines.sampling import consistency_step
from .base import Method, tied_copy, ties_bases


def stage_count(ode_steps: int, num_steps: int) -> int:
    """Stages that halve ``ode_steps`` teacher steps down to ``num_steps`` (a power of 2 apart: the config checks it)."""
    return int(math.log2(ode_steps // num_steps))


def stage_at(update: int, stages: int, total: int) -> int:
    """The stage that update ``update`` (0-based) of ``total`` belongs to, with ``total`` split evenly over ``stages``."""
    return min(update * stages // total, stages - 1)


def one_step_x0(z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s):
    """The x0 whose DDIM step takes ``z_t`` at time t to ``z_s`` at an earlier time s (Salimans & Ho 2022, Algorithm 2)."""
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


class ProgressiveDistillation(Method):
    name = "progressive"
    adam_betas = (0.9, 0.999)

    def __init__(self, teacher, student, scheduler, config, **run):
        super().__init__(teacher, student, scheduler, config, **run)
        self.stages = stage_count(config.ode_steps, config.num_steps)
        # the stage teacher: the student as the last stage left it (a LoRA student's frozen base shared)
        self.stage_teacher = tied_copy(student, ties_bases(self.accelerator)).eval().requires_grad_(False)

    @staticmethod
    def sampler_gamma(config) -> float | None:
        return 0.0  # deterministic DDIM / Euler moves, as the stages were distilled

    @staticmethod
    def student_prediction(config, teacher) -> str | None:
        return "v_prediction" if teacher.time_type == "vp" and config.student_prediction == "v_prediction" else None

    def target_networks(self) -> dict:
        return {"stage_teacher": self.stage_teacher}

    def checkpoint_modules(self) -> dict:
        return {"stage_teacher": (self.stage_teacher, self.student_trainable_names)}

    def stage(self) -> int:
        return stage_at(self.update_index, self.stages, self.config.max_train_steps)

    def target(self, z_t, i, n, conditions, stage: int):
        """``x_tilde``: the x0 of two DDIM steps of ``stage``'s teacher from grid index ``i`` on an ``n``-step grid."""
        t, mid, s = (self.teacher.native_time(f) for f in (i / n, (2 * i - 1) / (2 * n), (i - 1) / n))
        z = z_t
        for a, b in ((t, mid), (mid, s)):
            if stage == 0:
                x0, eps = self.teacher.predict(self.teacher.model, z, a, conditions, guidance_scale=self.config.guidance_scale)
            else:
                x0, eps = self.predict_student(z, a, conditions, model=self.stage_teacher)
            z = consistency_step(x0, eps, *self.teacher.coefficients(b))
        return one_step_x0(z_t, z, *self.teacher.coefficients(t), *self.teacher.coefficients(s))

    def train_step(self, batch, rng) -> dict:
        x0, conditions = batch["images"], batch["conditions"]
        stage = self.stage()
        n = self.config.ode_steps // 2 ** (stage + 1)  # this stage's student steps
        i = rng.integers(n) + 1
        t = self.teacher.native_time(i / n)
        z_t = self.teacher.add_noise(x0, t, rng.normal_like(x0))
        with torch.no_grad():
            target = self.target(z_t, i, n, conditions, stage)
        alpha, sigma = self.teacher.coefficients(t)
        weight = (alpha**2 / sigma**2).clamp(min=1.0)  # truncated SNR weighting
        pred = self.predict_student(z_t, t, conditions)[0]
        loss = (weight * (pred - target) ** 2).mean()
        self.update(loss, self.optimizer, "progressive")
        if self.last_micro_step and stage_at(self.update_index + 1, self.stages, self.config.max_train_steps) > stage:
            # the stage ends with this update: its student becomes the next stage's teacher (before any checkpoint)
            self.ema_(self.stage_teacher, self.accelerator.unwrap_model(self.student), 0.0)
        return {"progressive": loss.detach(), "stage": torch.tensor(float(stage))}
