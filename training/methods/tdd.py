"""TDD: target-driven distillation (Wang et al. 2024, "TDD: Target-Driven Distillation: Consistency Distillation with
Target Timestep Selection and Decoupled Guidance").

Consistency distillation whose student maps ``x_t`` to a *chosen* earlier time ``s``, ``F(x_t, t -> s) = alpha_s
x0_hat + sigma_s eps_hat`` (a DDIM jump with its own predictions), instead of to 0 or a fixed phase edge:

- **Target timestep selection.** The targets are the times the student will actually jump to: the union ``M`` of the
  trailing schedules of ``K`` steps for every ``K`` in ``[--num-steps, 2 --num-steps]`` (4 to 8 for a 4-step
  student, as the paper's), plus 0. For a data point noised to a grid time ``t`` and the teacher's guided DDIM step to
  ``t' = t - 1 / --ode-steps``, ``tau`` is drawn uniformly among the members of ``M`` at most 0.26 below the largest one
  not above ``t'``, and ``s = (1 - 0.3 u) tau`` (``u`` uniform) so that TCD-style sampling (gamma up to 0.3) jumps to
  trained times. Loss: ``d(F_student(x_t, t -> s), sg F_target(x_t', t' -> s))``, the target network an EMA of the
  student (``--target-ema``; 0 = the student itself, as the official code), ``d`` pseudo-Huber (``--loss``).
- **Decoupled guidance.** A fraction ``--uncond-fraction`` (0.2) of the samples trains with the null condition, for
  which the guided teacher step is the unguided one (its conditional and unconditional halves agree): the student learns
  the conditional map with the teacher's guidance ``--guidance-scale`` *and* the unconditional map, so classifier-free
  guidance on the student (``guidance_scale`` of the pipeline, the ComfyUI sampler's cfg) still works at inference.
  Students record ``--student-guidance`` as the guidance they sample with by default (1 = none).

Students sample with ``ConsistencyScheduler`` at gamma 0.2 (the official TDD scheduler's eta) on the trailing grid.
"""

from __future__ import annotations

import torch

from onestep_pipelines.sampling import consistency_step
from .base import distance
from .consistency import ConsistencyDistillation, jump

TARGET_WINDOW = 0.26  # how far below the nearest target time the drawn one may lie (260 of 1000 timesteps)
TARGET_JITTER = 0.3  # s = (1 - 0.3 u) tau: the official eta of target selection


def target_set(num_steps: int) -> torch.Tensor:
    """``M``: the times (fractions of the noise range, increasing, 0 first, 1 left out) of the trailing schedules of
    ``num_steps`` to ``2 num_steps`` steps."""
    times = {round(1 - k / n, 6) for n in range(num_steps, 2 * num_steps + 1) for k in range(1, n)} | {0.0}
    return torch.tensor(sorted(times), dtype=torch.float64)


def select_targets(times: torch.Tensor, t_prev: torch.Tensor, u: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """Per sample: ``tau`` uniform (draw ``u``) among the members of ``times`` in ``[tau_max - 0.26, tau_max]``,
    ``tau_max`` the largest not above ``t_prev``, then ``s = (1 - 0.3 jitter) tau`` (fractions of the noise range)."""
    times = times.to(t_prev.device, torch.float64)
    below = times.view(1, -1) <= t_prev.double().view(-1, 1) + 1e-9
    top = torch.where(below, times.view(1, -1), -1.0).amax(dim=1, keepdim=True)
    allowed = below & (times.view(1, -1) >= top - TARGET_WINDOW - 1e-9)
    count = allowed.sum(dim=1)
    pick = (u.double() * count).floor().long().clamp(max=count - 1)  # the pick-th allowed member
    index = (allowed.cumsum(dim=1) > pick.view(-1, 1)).long().argmax(dim=1)
    return (times[index] * (1 - TARGET_JITTER * jitter.double())).float()


class TDD(ConsistencyDistillation):
    name = "tdd"

    def __init__(self, teacher, student, scheduler, config, **run):
        super().__init__(teacher, student, scheduler, config, **run)
        self.targets = target_set(config.num_steps)

    @staticmethod
    def sampler_gamma(config) -> float | None:
        return 0.2

    @staticmethod
    def sampling_guidance(config) -> tuple[float, bool]:
        return config.student_guidance, False  # decoupled: the student takes classifier-free guidance at inference

    def loss(self, batch, rng) -> torch.Tensor:
        """The TDD loss of one micro-batch (draws from ``rng``)."""
        x0, conditions = batch["images"], batch["conditions"]
        teacher, N = self.teacher, self.config.ode_steps
        drop = rng.uniform() < self.config.uncond_fraction
        null = teacher.null_conditions(conditions)
        conditions = {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), null[k], v) for k, v in conditions.items()}
        index = rng.integers(N) + 1
        t, t_prev = teacher.native_time(index / N), teacher.native_time((index - 1) / N)
        s_fraction = select_targets(self.targets, (index - 1) / N, rng.uniform(), rng.uniform())
        s = teacher.native_time(s_fraction)
        x_t = teacher.add_noise(x0, t, rng.normal_like(x0))
        with torch.no_grad():
            x0_teacher, eps_teacher = teacher.predict(teacher.model, x_t, t, conditions, guidance_scale=self.config.guidance_scale)
            x_prev = consistency_step(x0_teacher, eps_teacher, *teacher.coefficients(t_prev))
            there = s == t_prev  # s is t' itself (always where t' is the clean end): the target is x_t'
            t_model = torch.where(there, t, t_prev)  # (a valid time where the jump is unused)
            target = torch.where(there.view(-1, 1, 1, 1), x_prev, jump(teacher, self.target, x_prev, t_model, s, conditions))
        return distance(jump(teacher, self.student, x_t, t, s, conditions), target, self.config.loss).mean()

    def train_step(self, batch, rng) -> dict:
        loss = self.loss(batch, rng)
        self.update(loss, self.optimizer, "tdd")
        self.ema_(self.target, self.accelerator.unwrap_model(self.student), self.config.target_ema)
        return {"tdd": loss.detach()}
