"""MeanFlow: average-velocity training (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"), with
the JVP-free interval-splitting target of SplitMeanFlow (Guo et al. 2025).

The student ``u(z_t, r, t)`` predicts the average velocity over ``[r, t]`` (time 1 = noise), so one step is
``z_r = z_t - (t - r) u``. On the flow path ``z_t = (1 - t) x + t e`` the instantaneous velocity is
``v = e - x`` (from data) or the teacher's velocity at ``z_t`` (distillation); with guidance ``w`` it is
``v_w = w v + (1 - w) v_uncond`` (the unconditional velocity of the same source), baked into the student.

- ``--target jvp`` (MeanFlow eq. 8): ``u_tgt = v - (t - r) du/dt`` with ``du/dt`` the total derivative along the
  path: a forward-mode JVP of ``u`` in ``z`` (direction ``v``; ``torch.func.jvp``, under the math SDPA kernel) and, in
  ``t``, a central difference over ``--tangent-time-step`` (0 = the JVP in ``(v, 0, 1)``, exact but dominated by the
  wiggles of the ``1000 t`` time embedding; see :mod:`.scm`).
- ``--target shortcut`` (Frans et al. 2024, "One Step Diffusion via Shortcut Models"): the split target below on
  dyadic pairs (``t - r = 2^-k`` on the grid of its multiples): two half jumps of the EMA student make one full jump,
  and ``r = t`` is flow matching; from the teacher's velocity or, with ``--source data``, from data alone. The
  smallest jump's halves are Euler steps of the instantaneous velocity (the teacher's, or the EMA student's at
  ``r = t``), as the paper's finest level is flow matching: the chain of bootstrapped targets is anchored there.
  A further fraction ``--endpoint-fraction`` of the jumps is the whole interval (1 to 0), the one 1-step sampling makes.
- ``--target split`` (SplitMeanFlow): with ``s = (t + r) / 2`` and ``z_s = z_t - (t - s) u(z_t, s, t)``,
  ``u_tgt = ((t - s) u(z_t, s, t) + (s - r) u(z_s, r, s)) / (t - r)``, both from the EMA network (no JVP).

Pairs with ``r = t`` (a fraction ``--equal-fraction``) learn ``u(z, t, t) = v``. The loss is the adaptive weighted
``||u - sg(u_tgt)||^2 / sg(||u - u_tgt||^2 + 1e-3)^p`` (MeanFlow sec. 4.3, p = 0.5 here); ``t`` is logit-normal, and a fraction ``--endpoint-fraction`` of ``t`` (and,
independently, of ``r``) is set to the end points 1 (noise) and 0 (data), the jumps few-step sampling makes.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from onestep_pipelines.models.r_conditioning import takes_r_timestep

from . import METHODS
from .base import Method, tied_copy, ties_bases


def adaptive(error: torch.Tensor) -> torch.Tensor:
    """MeanFlow's adaptively weighted loss of a squared error: per sample ``err / sg(err + 1e-3)^0.5`` (sec. 4.3, p =
    0.5), averaged."""
    error = error.flatten(1).mean(dim=1)
    return (error / (error.detach() + 1e-3) ** 0.5).mean()


class MeanFlow(Method):
    name = "meanflow"
    uses_r = True
    any_step_count = True
    scheduler_class = "FlowMapScheduler"
    adam_betas = (0.9, 0.99)

    @staticmethod
    def sampler_gamma(config) -> float:
        return 0.0

    def __init__(self, teacher, student, scheduler, config, **run):
        super().__init__(teacher, student, scheduler, config, **run)
        self.target = config.target or METHODS[self.name].targets[0]  # the first target needs no JVP and is the default
        if not takes_r_timestep(student):
            raise ValueError(f"{self.name} trains a flow map u(x, r, t): the student must take a second time r (add_r_conditioning); "
                             f"{type(student).__name__} does not.")
        self.target_net = tied_copy(student, ties_bases(self.accelerator)).eval().requires_grad_(False)  # (a LoRA student's frozen base shared)

    def u(self, model, z, r, t, conditions):
        """Average velocity over ``[r, t]`` (native flow times)."""
        return self.teacher.call(model, z, t, conditions, r=r).float()

    def jvp(self, model, primals, tangents, conditions):
        """``(u, du)``: ``u(z, r, t)`` and its forward-mode derivative in the direction ``tangents`` of ``(z, r, t)``
        (``(v, 0, 1)``: the total derivative along the path). Attention runs on the math kernel (the fused CPU
        kernels have no forward-mode derivative)."""
        fn = lambda z_, r_, t_: self.u(model, z_, r_, t_, conditions)  # noqa: E731
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(fn, primals, tangents)
        except (RuntimeError, NotImplementedError) as error:
            raise ValueError(
                f"--target jvp: {type(self.accelerator.unwrap_model(model)).__name__} cannot do forward-mode AD here ({error}); "
                f"use --target {METHODS[self.name].targets[0]} (no JVP)."
            ) from None

    def time_difference(self, z, r, t, h, conditions) -> torch.Tensor:
        """``du/dt`` of the student as a central difference over ``h`` (kept inside ``[r, 1]``): the time part of the
        JVP target when ``--tangent-time-step`` is set, which averages out the wiggles of a ``1000 t`` time embedding
        (sCM's lesson; see :mod:`.scm`)."""
        with torch.no_grad():
            hi, lo = (t + h).clamp(max=1.0), torch.maximum(t - h, r)
            step = (hi - lo).clamp_min(1e-6).view(-1, 1, 1, 1)
            return (self.u(self.student, z, r, hi, conditions) - self.u(self.student, z, r, lo, conditions)) / step

    def sample_pairs(self, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """Times ``t`` (logit-normal, a fraction at 1) and ``r`` (uniform in ``[0, t]``, a fraction at 0, a fraction
        equal to ``t``), one pair per sample; shortcut models' dyadic pairs with ``--target shortcut``."""
        cfg = self.config
        if self.target == "shortcut":
            return self.shortcut_pairs(rng)
        t = self.logit_normal_times(rng)
        t = torch.where(rng.uniform() < cfg.endpoint_fraction, 1.0, t)  # start at pure noise
        r = t * rng.uniform()
        r = torch.where(rng.uniform() < cfg.endpoint_fraction, 0.0, r)  # jump to data
        r = torch.where(rng.uniform() < cfg.equal_fraction, t, r)
        return t, r

    def logit_normal_times(self, rng) -> torch.Tensor:
        """``sigmoid(N(--logit-mean, --logit-std))`` per sample, kept in ``[0.02, 1]``."""
        return torch.sigmoid(rng.normal() * self.config.logit_std + self.config.logit_mean).clamp(0.02, 1.0)

    def shortcut_levels(self) -> int:
        """Shortcut's step sizes ``d = 2^-k``, ``k = 0 .. floor(log2 ode_steps)``: how many."""
        return max(1, self.config.ode_steps).bit_length()

    def shortcut_pairs(self, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """Shortcut models' pairs (Frans et al. 2024): a step ``d = 2^-k`` (``k`` uniform in ``0 .. log2 ode_steps``,
        and ``d = 1``, the 1-step jump, for a further fraction ``--endpoint-fraction``), ``t`` uniform on the grid of
        multiples of ``d`` and ``r = t - d``, so the split target is two half jumps; a fraction ``--equal-fraction``
        has ``d = 0`` (flow matching at a logit-normal ``t``)."""
        cfg = self.config
        cells = 2.0 ** rng.integers(self.shortcut_levels()).float()  # 1 / d
        cells = torch.where(rng.uniform() < cfg.endpoint_fraction, 1.0, cells)  # the whole interval: the 1-step jump
        t = (torch.floor(rng.uniform() * cells) + 1) / cells
        r = t - 1 / cells
        matching = rng.uniform() < cfg.equal_fraction
        t_fm = self.logit_normal_times(rng)
        return torch.where(matching, t_fm, t), torch.where(matching, t_fm, r)

    def prediction_and_target(self, z, r, t, x, e, conditions):
        """The student's ``u(z_t, r, t)`` (with gradient) and its regression target (without) at ``z_t = (1 - t) x + t e``."""
        tt, rr = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
        with torch.no_grad():
            v = self._velocity(z, t, x, e, conditions)
        if self.target == "jvp":
            h = self.config.tangent_time_step
            pred, dudt = self.jvp(self.student, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t) if h == 0 else torch.zeros_like(t)), conditions)
            if h > 0:
                dudt = dudt + self.time_difference(z, r, t, h, conditions)
            return pred, (v - (tt - rr) * dudt).detach()
        with torch.no_grad():
            s = (t + r) / 2
            ss = s.view(-1, 1, 1, 1)
            u_ts = self.half_jump(z, s, t, conditions, velocity=v)
            z_s = z - (tt - ss) * u_ts
            split = ((tt - ss) * u_ts + (ss - rr) * self.half_jump(z_s, r, s, conditions)) / (tt - rr).clamp_min(1e-6)
            target = torch.where((t == r).view(-1, 1, 1, 1), v, split)
        return self.u(self.student, z, r, t, conditions), target

    def half_jump(self, z, r, t, conditions, velocity=None):
        """The EMA network's average velocity over ``[r, t]`` (half of a split jump). Shortcut's smallest jumps take the
        velocity at ``t`` instead (flow matching's level): from data, the EMA network's at ``r = t``; else the
        teacher's (``velocity`` where already computed at these points), called for those samples only (one host sync
        for their number, rather than a teacher forward over the whole batch)."""
        if self.target != "shortcut":
            return self.u(self.target_net, z, r, t, conditions)
        finest = (2 * (t - r) - 2.0 ** (1 - self.shortcut_levels())).abs() < 1e-6  # halves of the smallest step
        if self.config.source == "data":
            return self.u(self.target_net, z, torch.where(finest, t, r), t, conditions)
        u = self.u(self.target_net, z, r, t, conditions)
        i = finest.nonzero()[:, 0]
        if len(i):
            u[i] = (velocity[i] if velocity is not None else self.teacher_velocity(z[i], t[i], {k: c[i] for k, c in conditions.items()})).to(u.dtype)
        return u

    def checkpoint_modules(self) -> dict:
        return {"target": (self.target_net, self.student_trainable_names)}

    def target_networks(self) -> dict:
        return {"target_net": self.target_net}

    def train_step(self, batch, rng) -> dict:
        x = batch["images"]
        conditions = batch["conditions"]
        t, r = self.sample_pairs(rng)
        e = rng.normal_like(x)
        tt = t.view(-1, 1, 1, 1)
        z = (1 - tt) * x + tt * e
        pred, target = self.prediction_and_target(z, r, t, x, e, conditions)
        loss = adaptive((pred - target) ** 2)
        self.update(loss, self.optimizer, self.name)
        self.ema_(self.target_net, self.accelerator.unwrap_model(self.student), self.config.target_ema)
        return {self.name: loss.detach()}

    def teacher_velocity(self, z, t, conditions):
        """The teacher's guided velocity ``eps - x0`` (flow time, 1 = noise; defined at ``t = 0`` too)."""
        x0, eps = self.teacher.predict(self.teacher.model, z, t, conditions, guidance_scale=self.config.guidance_scale)
        return eps - x0

    def _velocity(self, z, t, x, e, conditions):
        """Instantaneous (guided) velocity at ``z_t``: the teacher's, or ``e - x`` from data."""
        w = self.config.guidance_scale
        if self.config.source == "teacher":
            return self.teacher_velocity(z, t, conditions)
        v = e - x
        if w == 1.0:
            return v
        uncond = self.u(self.target_net, z, t, t, self.teacher.null_conditions(conditions))
        return w * v + (1 - w) * uncond
