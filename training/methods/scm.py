"""sCM: continuous-time consistency distillation in TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models"; on flow teachers as in rCM, Zheng et al. 2025, and SANA-Sprint).

TrigFlow with unit data scale: ``x_t = cos(t) x0 + sin(t) z``, ``t`` in ``[0, pi/2]``, PF-ODE velocity
``dx_t/dt = cos(t) z - sin(t) x0``. A flow network is a TrigFlow model exactly, at equal signal-to-noise ratio
(:func:`~onestep_pipelines.sampling.flow_sigma_from_coefficients`): it sees ``x_t / (cos t + sin t)`` at flow time
``sigma = sin t / (sin t + cos t)``, and its ``(x0, z)`` prediction gives ``F(x_t, t) = cos(t) z_hat - sin(t) x0_hat``.
The consistency function is ``f(x_t, t) = cos(t) x_t - sin(t) F = x0_hat``, so the student keeps the teacher's
parametrisation and samples with :class:`ConsistencyScheduler` on the ``scm`` preset (sCM's TrigFlow times mapped to
flow sigmas by SNR; gamma 1: predict x0, re-noise).

The loss (sCM eq. 8 with its stabilisers): for a data point noised to ``x_t`` (``tan t`` log-normal: the flow
``sigma`` logit-normal with ``--logit-mean`` / ``--logit-std``) and the teacher's guided ``dx_t/dt``,

    g = -cos^2(t) (F_sg - dx_t/dt) - r cos(t) sin(t) (x_t + dF_sg/dt),     g <- g / (||g|| + 0.1)
    L = ||F_theta - F_sg - g||^2 / (D exp(w(t))) + w(t)

where ``dF_sg/dt`` is the total derivative along the teacher's ODE of the student with its weights detached, in the
direction ``(dx_t/dt, 1)``: a forward-mode JVP (``torch.func.jvp``) in ``x_t``, and in ``t`` either the JVP too
(``--tangent-time-step 0``, the paper's) or a central difference over ``--tangent-time-step`` (default 0.01 rad): the
stabiliser that takes the place of sCM's smooth time conditioning for teachers whose time enters as ``1000 t``
through sinusoidal embeddings (every diffusers flow model), whose exact time derivative is dominated by the
embedding's high frequencies; ``r`` rises from 0 to 1 over
``--tangent-warmup`` updates (tangent warm-up), ``g`` is normalised per sample (tangent normalisation) and ``w(t)``
is a small learned network (adaptive weighting: the loss of each time is divided by its own running scale).

rCM (``--dmd-weight``): the student's own few-step samples also get DMD's reverse-KL gradient, with DMD2's fake score
(the same update, LoRA option and f-divergence-free DMD loss), weighted by ``--dmd-weight``: the mode-seeking score
regulariser that fixes sCM's fine-detail errors at scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from onestep_pipelines.sampling import flow_sigma_from_coefficients, trigflow_t_from_coefficients

from .base import Method
from .dmd2 import DMD2

TANGENT_NORM_CONST = 0.1  # c in g / (||g|| + c) (sCM sec. 4.2)


def scm_tangent(F_sg, velocity, dF, x_t, t, warmup: float = 1.0) -> torch.Tensor:
    """sCM's normalised tangent ``g`` (eq. 8 rearranged): ``F_sg`` the student's output (detached), ``velocity`` the
    teacher's ``dx_t/dt``, ``dF`` the JVP ``cos(t) sin(t) dF_sg/dt``, ``warmup`` the tangent warm-up weight ``r``."""
    cos, sin = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    g = -cos**2 * (F_sg - velocity) - warmup * (cos * sin * x_t + dF)
    return g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + TANGENT_NORM_CONST)


class AdaptiveWeight(nn.Module):
    """``w(t)``: a linear map of Fourier features of the TrigFlow time (sCM's learned weighting), zero at start."""

    def __init__(self, frequencies: int = 16):
        super().__init__()
        self.register_buffer("k", torch.arange(1, frequencies + 1, dtype=torch.float32), persistent=False)
        self.linear = nn.Linear(2 * frequencies, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.k[None]
        return self.linear(torch.cat([angles.cos(), angles.sin()], dim=1)).squeeze(1)


class SCM(DMD2):
    """sCM; with ``--dmd-weight`` rCM. It is a :class:`DMD2` only for the fake score of that regulariser: without it
    no fake score is built."""

    name = "scm"
    timestep_preset = "scm"
    any_step_count = True
    adam_betas = (0.9, 0.99)

    def __init__(self, teacher, student, scheduler, config, **run):
        Method.__init__(self, teacher, student, scheduler, config, **run)
        self.weighting = AdaptiveWeight()
        self.weighting_optimizer = None
        self.fake = self.head = None
        if config.dmd_weight > 0:
            self.build_fake_score()

    def trained_networks(self) -> dict:
        return {"weighting": self.weighting} | (super().trained_networks() if self.fake is not None else {})

    def build_optimizers(self) -> dict:
        params = list(self.weighting.parameters())
        self.weighting_optimizer = torch.optim.AdamW(params, lr=self.config.learning_rate * 10, betas=(0.9, 0.99), weight_decay=0.0)
        return {"weighting_optimizer": self.weighting_optimizer} | (super().build_optimizers() if self.fake is not None else {})

    def checkpoint_modules(self) -> dict:
        return {"weighting": (self.weighting, None)} | (super().checkpoint_modules() if self.fake is not None else {})

    def checkpoint_optimizers(self) -> dict:
        mine = {"weighting_optimizer": (self.weighting_optimizer, {"weighting": self.weighting})}
        return mine | (super().checkpoint_optimizers() if self.fake is not None else {})

    # ------------------------------------------------------------------------------------------ TrigFlow view
    def trigflow(self, model, x_t, t, conditions, guidance_scale: float = 1.0) -> torch.Tensor:
        """``F(x_t, t)`` of a flow network seen as a TrigFlow model (unit data scale), differentiable in ``x_t`` and ``t``."""
        cos, sin = torch.cos(t), torch.sin(t)
        sigma, scale = flow_sigma_from_coefficients(cos, sin)  # x_flow = x_t / (cos t + sin t) at equal SNR
        x0, z = self.teacher.predict(model, x_t * scale.view(-1, 1, 1, 1), sigma, conditions, guidance_scale=guidance_scale)
        return cos.view(-1, 1, 1, 1) * z - sin.view(-1, 1, 1, 1) * x0

    def tangent(self, x_t, t, velocity, conditions) -> torch.Tensor:
        """``cos(t) sin(t) dF/dt`` of the student (weights detached) along the ODE ``(dx_t/dt, 1)``: the part in
        ``x_t`` is one forward-mode JVP; the part in ``t`` too when ``--tangent-time-step`` is 0, else a central
        difference over that step (radians), which averages out the wiggles a ``1000 t`` sinusoidal time embedding
        puts into the exact time derivative (several times its smooth part on the digits teacher). Attention runs
        on the math kernel (the fused CPU kernels have no forward-mode derivative)."""
        cs = torch.cos(t) * torch.sin(t)
        h = self.config.tangent_time_step
        fn = lambda x_, t_: self.trigflow(self.student, x_, t_, conditions)  # noqa: E731
        try:
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                dF = torch.func.jvp(fn, (x_t, t), (cs.view(-1, 1, 1, 1) * velocity, cs if h == 0 else torch.zeros_like(t)))[1]
        except (RuntimeError, NotImplementedError) as error:
            raise ValueError(f"--method scm: {type(self.accelerator.unwrap_model(self.student)).__name__} cannot do forward-mode AD "
                             f"here ({error}); sCM needs a JVP of the student.") from None
        if h == 0:
            return dF
        lo, hi = (t - h).clamp(min=0.0), (t + h).clamp(max=math.pi / 2)
        with torch.no_grad():
            difference = fn(x_t, hi) - fn(x_t, lo)
        return dF + (cs / (hi - lo)).view(-1, 1, 1, 1) * difference

    def sample_times(self, rng) -> torch.Tensor:
        """TrigFlow times with ``tan t`` log-normal (sCM's proposal): the flow sigma is logit-normal."""
        sigma = torch.sigmoid(rng.normal() * self.config.logit_std + self.config.logit_mean).clamp(1e-4, 1 - 1e-4)
        return trigflow_t_from_coefficients(1 - sigma, sigma, sigma_data=1.0)[0]

    def warmup(self) -> float:
        """``r``: the tangent term's weight, linear from 0 to 1 over ``--tangent-warmup`` updates."""
        steps = self.config.tangent_warmup
        return 1.0 if steps == 0 else min(1.0, self.update_index / steps)

    def scm_loss(self, x0, conditions, rng) -> torch.Tensor:
        """The sCM loss of data ``x0`` (see the module docstring)."""
        t = self.sample_times(rng)
        cos, sin = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
        x_t = cos * x0 + sin * rng.normal_like(x0)
        with torch.no_grad():
            velocity = self.trigflow(self.teacher.model, x_t, t, conditions, self.config.guidance_scale)  # dx_t/dt
        dF = self.tangent(x_t, t, velocity, conditions)
        F = self.trigflow(self.student, x_t, t, conditions)
        g = scm_tangent(F.detach(), velocity, dF, x_t, t, self.warmup())
        w = self.weighting(t)
        error = ((F - F.detach() - g) ** 2).flatten(1).mean(dim=1)
        return (error * torch.exp(-w) + w).mean()

    def train_step(self, batch, rng) -> dict:
        conditions = batch["conditions"]
        logs = {}
        if self.fake is not None:  # rCM: DMD2's fake-score update on the student's samples
            self.fake.train()
            for _ in range(self.config.fake_updates):
                logs = self._fake_update(conditions, batch, rng)
        losses = {self.name: self.scm_loss(batch["images"], conditions, rng)}
        total = losses[self.name]
        if self.fake is not None:
            x = self._generate(conditions, rng)
            x_t, t, _ = self._noised(x, rng)
            dmd, _ = self.generator_losses(x, x_t, t, conditions, rng)  # DMD2's (no GAN head here)
            losses["dmd"] = dmd
            total = total + self.config.dmd_weight * dmd
        self.update(total, self.optimizer, self.name)
        if self.last_micro_step:
            self.weighting_optimizer.step()
            self.weighting_optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in losses.items()} | logs
