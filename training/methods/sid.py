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

``--uni-instruct`` replaces the loss with Uni-Instruct's (Wang et al. 2025, "Uni-Instruct: One-step Diffusion Model
through Unified Diffusion Divergence Instruction"): the expanded f-divergence ``int w(t) E[h(r_t) ||s_fake -
s_real||^2] dt``, ``h(r) = f''(r) r^2`` of ``--divergence`` with the density ratio ``r = q_t / p_t`` from the GAN head
(``--gan-weight``), has the gradient of ``L = w [h(r) A - r h'(r) B] + sum sg(c a) x_t`` with ``a = f_phi - f_psi``,
``A = ||a||^2 + 2 a^T (f_psi - x_g)``, ``B = ||a||^2`` and ``c = w r (h'(r) A - (r h''(r) + h'(r)) B) alpha_t /
sigma_t^2`` (the second term carries ``grad_x log r = alpha_t a / sigma_t^2``). Reverse KL (``h = 1``) is SiD at alpha
0.5 (times 2, no head needed), forward KL (``h = r``) ``r`` times SiD at alpha 1 plus its ratio term. ``r`` is
``exp`` of the head's logit, clipped to [1/10, 10] and normalised to mean 1 over the batch (the official code
normalises it over the batch too).
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


# h(r) = f''(r) r^2 of each f-divergence and its first two derivatives (Uni-Instruct's weighting, f-distill's h)
F_WEIGHTS = {
    "reverse-kl": lambda r: (torch.ones_like(r), torch.zeros_like(r), torch.zeros_like(r)),
    "forward-kl": lambda r: (r, torch.ones_like(r), torch.zeros_like(r)),
    "js": lambda r: (r / (1 + r), 1 / (1 + r) ** 2, -2 / (1 + r) ** 3),
}


def uni_instruct_loss(x_g, x_t, x0_real, x0_fake, r, divergence: str, alpha_t, sigma_t, w=None) -> torch.Tensor:
    """Uni-Instruct's generator loss for ``divergence`` (see the module's docstring), averaged over the batch. ``x_t``
    is ``x_g`` noised (in the graph), ``x0_real`` / ``x0_fake`` depend on it, ``r`` is the density ratio per sample
    (no gradient), ``alpha_t`` / ``sigma_t`` the coefficients of ``x_t``; ``w`` the per-sample weight of its time (default
    DMD's ``1 / sg(mean|x_g - x0_real|)`` times ``min(1, sigma_t^2 / alpha_t)``: the ratio term's ``alpha_t /
    sigma_t^2`` would otherwise let the low-noise times dominate; any positive weight of a time keeps the gradient of
    the expansion at that time)."""
    if w is None:
        time_weight = (sigma_t**2 / alpha_t.clamp_min(1e-6)).clamp(max=1.0).flatten()
        w = time_weight / (x_g - x0_real).abs().mean(dim=(1, 2, 3)).clamp_min(1e-5).detach()
    a = x0_real - x0_fake
    B = (a**2).sum(dim=(1, 2, 3))
    A = B + 2 * (a * (x0_fake - x_g)).sum(dim=(1, 2, 3))
    h, dh, ddh = F_WEIGHTS[divergence](r)
    score_identity = w * (h * A - r * dh * B)
    c = (w * r * (dh * A - (r * ddh + dh) * B)).view(-1, 1, 1, 1) * alpha_t / sigma_t**2
    ratio = ((c * a).detach() * x_t).sum(dim=(1, 2, 3))
    return (score_identity + ratio).mean()


def density_ratio(logits: torch.Tensor, clip: float = 10.0) -> torch.Tensor:
    """``r = exp(logit)`` of the discriminator, clipped to ``[1 / clip, clip]`` and normalised to mean 1."""
    r = logits.detach().float().exp().clamp(1 / clip, clip)
    return r / r.mean()


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
            x0_fake, weights, losses = self.adversarial(x, x_t, t, conditions, rng)
        if self.config.uni_instruct:
            r = torch.ones(len(x), device=x.device) if self.head is None else density_ratio(self._logits)
            generator = uni_instruct_loss(x, x_t, x0_real, x0_fake, r, self.config.divergence, *self.teacher.coefficients(t))
        else:
            generator = sid_generator_loss(x, x0_real, x0_fake, self.config.sid_alpha, weights)
        losses = {"generator": generator} | losses
        return losses["generator"] + self.config.gan_weight * losses.get("gan", 0.0), losses
