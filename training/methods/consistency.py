"""Consistency distillation through the teacher's ODE solver (Song et al. 2023, "Consistency Models"; Luo et al.
2023, LCM), with the multi-phase option of phased consistency models (Wang et al. 2024, PCM).

Time ``[0, 1]`` is cut into a grid of ``ode_steps`` intervals and into ``phases`` phases with edges
``e_j = j / phases`` on that grid. For a data point noised to a grid time ``t`` in phase ``j`` and the previous
grid time ``s = t - 1 / ode_steps``, the teacher takes one Euler (DDIM) step with CFG from ``x_t`` to ``x_s``.
The consistency function maps a point to the lower edge of its phase with the predicted ``(x0, eps)``:
``f(x, t) = alpha_e x0_hat + sigma_e eps_hat``. The loss is ``d(f_student(x_t, t), sg f_target(x_s, s))`` with
``d`` pseudo-Huber (``sqrt(|a - b|^2 + c^2) - c``, Song & Dhariwal 2023) or squared L2, and the target network an
EMA of the student. One phase is LCM (sample with full re-noising, gamma 1); ``phases = num_steps`` is PCM
(sample by deterministic jumps between the edges, gamma 0).
"""

from __future__ import annotations

import torch

from onestep_pipelines.sampling import consistency_step
from .base import Method, distance, tied_copy, ties_bases


class ConsistencyDistillation(Method):
    name = "consistency"

    def __init__(self, teacher, student, scheduler, config, **run):
        super().__init__(teacher, student, scheduler, config, **run)
        self.phases = config.phases or 1
        self.target = tied_copy(student, ties_bases(self.accelerator)).eval().requires_grad_(False)  # (a LoRA student's frozen base shared)

    @staticmethod
    def sampler_gamma(config) -> float | None:
        """How students of this method sample: PCM jumps between phase edges (0), LCM re-noises fully (1)."""
        return 0.0 if (config.phases or 1) > 1 else 1.0

    def target_networks(self) -> dict:
        return {"target": self.target}

    def checkpoint_modules(self) -> dict:
        return {"target": (self.target, self.student_trainable_names)}

    def train_step(self, batch, rng) -> dict:
        loss = phased_consistency_loss(self, batch["images"], batch["conditions"], rng, self.phases)
        self.update(loss, self.optimizer, "consistency")
        self.ema_(self.target, self.accelerator.unwrap_model(self.student), self.config.target_ema)  # LCM's EMA target
        return {"consistency": loss.detach()}


def jump(teacher, model, x, t, s, conditions):
    """``F(x, t -> s) = alpha_s x0_hat + sigma_s eps_hat``: ``model``'s DDIM jump from ``t`` to ``s``."""
    x0, eps = teacher.predict(model, x, t, conditions)
    return consistency_step(x0, eps, *teacher.coefficients(s))


def phased_consistency_loss(method, x0, conditions, rng, phases: int) -> torch.Tensor:
    """The (phased) consistency loss of ``method``'s student against its ``target`` network on data ``x0``: a grid time
    ``t``, one guided teacher DDIM step to ``s``, both mapped to the lower edge of ``t``'s phase (``phases`` of them)."""
    teacher, config = method.teacher, method.config
    N = config.ode_steps
    index = rng.integers(N) + 1  # t at grid fraction index / N
    per_phase = N // phases
    edge_index = torch.div(index - 1, per_phase, rounding_mode="floor") * per_phase
    t, s, edge = (teacher.native_time(i / N) for i in (index, index - 1, edge_index))
    x_t = teacher.add_noise(x0, t, rng.normal_like(x0))
    with torch.no_grad():
        x0_teacher, eps_teacher = teacher.predict(teacher.model, x_t, t, conditions, guidance_scale=config.guidance_scale)
        x_s = consistency_step(x0_teacher, eps_teacher, *teacher.coefficients(s))  # one Euler / DDIM step of the teacher
        at_edge = (index - 1 == edge_index).view(-1, 1, 1, 1)  # s is the phase edge: the target is x_s
        s_model = torch.where(index - 1 == edge_index, index, index - 1)  # (a valid time where the target is unused)
        target = torch.where(at_edge, x_s, jump(teacher, method.target, x_s, teacher.native_time(s_model / N), edge, conditions))
    pred = jump(teacher, method.student, x_t, t, edge, conditions)
    return distance(pred, target, config.loss).mean()
