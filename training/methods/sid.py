"""SiD: Score identity Distillation (Zhou et al. 2024, "Score identity Distillation: Exponentially Fast Distillation
of Pretrained Diffusion Models for One-Step Generation"; few-step students: Zhou et al. 2025, "Few-Step Diffusion
via Score identity Distillation"; LSG: Zhou et al. 2024, "Long and Short Guidance in Score identity Distillation").

Data-free. The student sample ``x_g`` (one step from noise, or step ``k`` of its own roll-out as in DMD2) is noised
to ``x_t = alpha_t x_g + sigma_t eps``; the frozen teacher gives ``f_phi(x_t)`` and the fake score, trained on student
samples exactly as DMD2's (same update, same optional GAN head), gives ``f_psi(x_t)``, both x0 predictions. The
generator loss (SiD eq. 23, the score identity with the fake score standing in for the generator's own score) is

    L = w [ (1 - alpha) ||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g) ],   w = 1 / sg(mean |x_g - f_phi|)

per sample, with ``alpha`` = ``--sid-alpha`` (1.2 in the paper) and DMD's normalisation as the time weight. Unlike
DMD, the gradient also goes through ``x_t`` into both denoisers (their weights stay fixed in this update), so the
student follows the score difference *and* how it changes with its samples. ``--lsg-scale`` (LSG) applies
classifier-free guidance to the fake score, in its own denoising loss and in the generator loss.
"""

from __future__ import annotations

import torch

from .dmd2 import DMD2


def sid_generator_loss(x_g, x0_real, x0_fake, alpha: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """SiD's generator loss, summed over pixels and averaged over the batch (``weights``: per-sample f-divergence
    weights, 1 by default). Every input keeps its graph: ``x0_real`` and ``x0_fake`` depend on ``x_g`` through
    ``x_t``. The pixel sum matches DMD's scale: the direct gradient in ``x_g`` is DMD's ``(f_psi - f_phi) w``."""
    w = 1.0 / (x_g - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5).detach()
    diff = x0_real - x0_fake
    per_sample = (w * ((1 - alpha) * diff**2 + diff * (x0_fake - x_g))).sum(dim=(1, 2, 3))
    return (per_sample if weights is None else weights * per_sample).mean()


class SiD(DMD2):
    name = "sid"
    fake_in_generator_graph = True

    def fake_prediction(self, x_t, t, conditions):
        """The fake score's x0, guided with ``--lsg-scale`` (LSG; 1 = plain)."""
        return self.teacher.predict(self.fake, x_t, t, conditions, guidance_scale=self.config.lsg_scale)[0]

    def generator_losses(self, x, x_t, t, conditions, rng):
        x0_real, _ = self.teacher.predict(self.teacher.model, x_t, t, conditions, guidance_scale=self.config.guidance_scale)
        if self.head is None:
            x0_fake, weights, losses = self.fake_prediction(x_t, t, conditions), None, {}
        else:  # SiDA: the GAN head on the same forward of the fake score
            x0_fake, weights, losses = self.adversarial(x_t, t, conditions)
        losses = {"generator": sid_generator_loss(x, x0_real, x0_fake, self.config.sid_alpha, weights)} | losses
        return losses["generator"] + self.config.gan_weight * losses.get("gan", 0.0), losses
