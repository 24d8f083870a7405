"""Phased DMD: distribution matching per subinterval of the noise range (Fan et al. 2025, "Phased DMD: Few-step
Distribution Matching Distillation via Score Matching within Subintervals").

The student's ``--num-steps`` deterministic steps (DDIM / Euler moves, as it samples) are cut into ``--phases``
phases with edges ``1 = t_0 > s_1 > ... > s_P = 0`` at its own step times. Phase ``k``'s output is the noisy sample
``x_s`` at its lower edge ``s`` (x0 only in the last phase): the student rolls out the earlier steps without
gradients and takes the phase's last step with them. Its distribution is matched to the teacher's at times
``t in (s, 1]`` reached from ``x_s`` by the forward kernel ``q(x_t | x_s) = N(a x_s, b^2)``, ``a = alpha_t / alpha_s``,
``b^2 = sigma_t^2 - a^2 sigma_s^2``:

- **Score matching within the subinterval.** Each phase has its own fake score, trained on its phase's ``x_s``:
  with no clean sample, its x0 regresses onto ``x0* = (x_s - A x_t) / B``, ``A = a sigma_s^2 / sigma_t^2``,
  ``B = alpha_s b^2 / sigma_t^2`` (the x0 whose posterior mean ``E[x_s | x_t, x0]`` is ``x_s``), an unbiased target
  of ``E[x0 | x_t]`` under the student's phase distribution. Its noise grows as ``t -> s``; the weight
  ``min(1, 10 b^2)`` of the model's output error caps it (the paper's ``clamp(1 / sigma_{t|s}^2, 10)``).
- **Generator.** DMD's gradient carried to ``x_s`` (``dx_t / dx_s = a``): ``g = (x0_fake - x0_real) / (alpha_s
  mean|x0_hat - x0_real|)``, loss ``0.5 ||x_s - sg(x_s - g)||^2``, where ``x0_hat`` is the student's prediction of the
  step that made ``x_s``; the last phase (``s = 0``) is DMD2 exactly.

The phases are trained jointly, a random phase per sample draw (the paper trains them one after another and gives
each phase its own weights, an expert; here one student network serves every phase, conditioned on its time, so that
it stays one diffusers denoiser). The fake scores' updates, learning rate and LoRA are DMD2's (``--fake-*``).
"""

from __future__ import annotations

import torch

from onestep_pipelines.sampling import consistency_step
from .dmd2 import DMD2

EDGE_GAP = 0.02  # the DMD and fake-score times start this fraction of the noise range above the phase edge


def subinterval_x0_target(x_s, x_t, a, b, alpha_s, sigma_s, sigma_t):
    """``x0*``: the x0 whose posterior mean ``E[x_s | x_t, x0] = A x_t + B x0`` is the observed ``x_s``, with
    ``A = a sigma_s^2 / sigma_t^2``, ``B = alpha_s b^2 / sigma_t^2`` for ``x_t = a x_s + b eps`` (DDPM's posterior of an
    earlier time). ``E[x0* | x_t] = E[x0 | x_t]``: regressing onto it is denoising score matching from noisy data."""
    return (x_s - a * sigma_s**2 / sigma_t**2 * x_t) / (alpha_s * b**2 / sigma_t**2)


class PhasedDMD(DMD2):
    name = "phased-dmd"

    def __init__(self, teacher, student, scheduler, config, **run):
        super().__init__(teacher, student, scheduler, config, **run)  # builds phase 0's fake score
        self.phases = config.phases or config.num_steps
        self.fake_0 = self.fake
        for k in range(1, self.phases):
            self.build_fake_score()
            setattr(self, f"fake_{k}", self.fake)
        self.fake_optimizers = [None] * self.phases
        self._use_phase(0)

    @staticmethod
    def sampler_gamma(config) -> float | None:
        return 0.0  # deterministic moves between the step times, as the phases were rolled out

    def _use_phase(self, k: int) -> None:
        """Make phase ``k``'s fake score (and its optimizer) the one DMD2's updates use."""
        self.phase = k
        self.fake, self.fake_optimizer = getattr(self, f"fake_{k}"), self.fake_optimizers[k]

    def trained_networks(self) -> dict:
        return {f"fake_{k}": getattr(self, f"fake_{k}") for k in range(self.phases)}

    def build_optimizers(self) -> dict:
        for k in range(self.phases):
            self._use_phase(k)
            self.fake_optimizers[k] = super().build_optimizers()["fake_optimizer"]
        self._use_phase(0)
        return {f"fake_optimizer_{k}": opt for k, opt in enumerate(self.fake_optimizers)}

    def place(self, student, optimizer) -> None:
        super().place(student, optimizer)
        self.fake_optimizers = [getattr(self, f"fake_optimizer_{k}", opt) for k, opt in enumerate(self.fake_optimizers)]
        self._use_phase(self.phase)

    def checkpoint_modules(self) -> dict:
        return {f"fake_{k}": (getattr(self, f"fake_{k}"), self._fake_names) for k in range(self.phases)}

    def checkpoint_optimizers(self) -> dict:
        return {f"fake_optimizer_{k}": (opt, {"fake": getattr(self, f"fake_{k}")}) for k, opt in enumerate(self.fake_optimizers)}

    def phase_end(self, k: int) -> int:
        """The index of the student step that follows phase ``k`` (``len(self.times)``: the clean end)."""
        return (k + 1) * len(self.times) // self.phases

    def edge(self, k: int, n: int, device) -> torch.Tensor:
        """Phase ``k``'s lower edge (a student step time, or the clean end) for a batch of ``n``."""
        end = self.phase_end(k)
        if end < len(self.times):
            return self.time_at(end, n, device)
        return self.teacher.native_time(torch.zeros(n, device=device))

    def _generate(self, conditions, rng):
        """Phase ``k``'s output ``x_s`` (random ``k``), the last step with gradients; sets the phase's fake score."""
        noise = rng.normal(*self.teacher.sample_shape)
        self._use_phase(rng.host_integer(0, self.phases))
        last = self.phase_end(self.phase) - 1  # the phase's last student step
        x = self.rollout(noise, conditions, last, rng)
        x0, eps = self.predict_student(x, self.time_at(last, len(x), x.device), conditions)
        self._edge = self.edge(self.phase, len(x), x.device)
        self._x0_student = x0.detach()
        return consistency_step(x0, eps, *self.teacher.coefficients(self._edge))  # x0 itself at the clean end

    def _kernel(self, t):
        """``(a, b)`` of ``q(x_t | x_s)`` from the current edge ``s`` and ``(alpha_s, sigma_s, alpha_t, sigma_t)``."""
        alpha_s, sigma_s = self.teacher.coefficients(self._edge)
        alpha_t, sigma_t = self.teacher.coefficients(t)
        a = alpha_t / alpha_s
        b = (sigma_t**2 - a**2 * sigma_s**2).clamp_min(1e-12).sqrt()
        return a, b, alpha_s, sigma_s, sigma_t

    def _noised(self, x, rng):
        low = self.teacher.fraction(self._edge[0]) + EDGE_GAP
        t = self.teacher.native_time(low + (0.98 - low) * rng.uniform())
        noise = rng.normal_like(x)
        a, b, *_ = self._kernel(t)
        return a * x + b * noise, t, noise

    def fake_target(self, x, x_t, t, noise):
        a, b, alpha_s, sigma_s, sigma_t = self._kernel(t)
        return subinterval_x0_target(x, x_t, a, b, alpha_s, sigma_s, sigma_t), self.fake_loss_weight(t) * (10 * b**2).clamp(max=1.0).sqrt()

    def generator_losses(self, x, x_t, t, conditions, rng):
        with torch.no_grad():
            x0_real, _ = self.teacher.predict(self.teacher.model, x_t, t, conditions, guidance_scale=self.config.guidance_scale)
            x0_fake = self.fake_prediction(x_t, t, conditions)
        alpha_s, _ = self.teacher.coefficients(self._edge)
        grad = (x0_fake - x0_real) / (alpha_s * (self._x0_student - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5))
        loss = self.generator_loss(x, grad, torch.ones(len(x), device=x.device))
        return loss, {"generator": loss}
