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
    needs_data = True

    def __init__(self, teacher, student, scheduler, config, **run):
        super().__init__(teacher, student, scheduler, config, **run)
        self.phases = config.phases or 1
        self.target = tied_copy(student, ties_bases(self.accelerator)).eval().requires_grad_(False)  # (a LoRA student's frozen base shared)

    @staticmethod
    def sampler_gamma(config) -> float | None:
        """How students of this method sample: PCM jumps between phase edges (0), LCM re-noises fully (1)."""
        return 0.0 if (config.phases or 1) > 1 else 1.0

    def _to_edge(self, model, x, t, edge, conditions):
        x0, eps = self.teacher.predict(model, x, t, conditions)
        alpha, sigma = self.teacher.coefficients(edge)
        return consistency_step(x0, eps, alpha, sigma)

    def target_networks(self) -> dict:
        return {"target": self.target}

    def checkpoint_modules(self) -> dict:
        return {"target": (self.target, self.student_trainable_names)}

    def train_step(self, batch, rng) -> dict:
        x0 = batch["images"]
        conditions = batch["conditions"]
        N = self.config.ode_steps
        index = rng.integers(N) + 1  # t at grid fraction index / N
        per_phase = N // self.phases
        edge_index = torch.div(index - 1, per_phase, rounding_mode="floor") * per_phase
        t, s, edge = (self.teacher.native_time(i / N) for i in (index, index - 1, edge_index))
        noise = rng.normal_like(x0)
        x_t = self.teacher.add_noise(x0, t, noise)
        with torch.no_grad():
            x0_teacher, eps_teacher = self.teacher.predict(self.teacher.model, x_t, t, conditions, guidance_scale=self.config.guidance_scale)
            alpha_s, sigma_s = self.teacher.coefficients(s)
            x_s = consistency_step(x0_teacher, eps_teacher, alpha_s, sigma_s)  # one Euler / DDIM step of the teacher
            at_edge = (index - 1 == edge_index).view(-1, 1, 1, 1)  # s is the phase edge: the target is x_s
            s_model = torch.where(index - 1 == edge_index, index, index - 1)  # (a valid time where the target is unused)
            mapped = self._to_edge(self.target, x_s, self.teacher.native_time(s_model / N), edge, conditions)
            target = torch.where(at_edge, x_s, mapped)
        pred = self._to_edge(self.student, x_t, t, edge, conditions)
        loss = distance(pred, target, self.config.loss).mean()
        self.update(loss, self.optimizer, "consistency")
        self.ema_(self.target, self.accelerator.unwrap_model(self.student), self.config.target_ema)  # LCM's EMA target
        return {"consistency": loss.detach()}
