"""TDM: trajectory distribution matching (Luo et al. 2025, "Learning Few-Step Diffusion Models by Trajectory
Distribution Matching").

Data-free. The student rolls out its own few-step trajectory deterministically (the DDIM / Euler move of
:class:`TDMScheduler`, no fresh noise) without gradients; at a random segment ``k`` its x0 prediction is noised
to a time *inside that segment's interval* ``(t_{k+1}, t_k]`` ("sampling-steps aware"), and the distribution
of those samples is matched to the teacher's with a trainable fake score, as in DMD: the generator loss is a
pseudo-Huber distance to ``sg(x0_hat - g)``, ``g = (x0_fake - x0_teacher) / mean|x0_hat - x0_teacher|``. The
fake score learns by x0 regression on the student's samples with ``min(SNR, 5)`` weighting.
Everything else (two time-scale updates, optional GAN head and f-divergence weights) is :class:`DMD2`'s.
"""

from __future__ import annotations

from .dmd2 import DMD2


class TDM(DMD2):
    name = "tdm"
    scheduler_class = "TDMScheduler"
    timestep_preset = "tdm"

    @staticmethod
    def sampler_gamma(config) -> None:
        return None  # TDMScheduler: deterministic moves, no gamma

    def _noised(self, x, rng):
        """Noise the student's x0 to a uniform time inside the current segment ``(t_{k+1}, t_k]``."""
        k = self.segment
        high = self.teacher.fraction(self.times[k])
        low = self.teacher.fraction(self.times[k + 1]) if k + 1 < len(self.times) else 0.0
        u = low + (high - low) * (1 - rng.uniform())  # in (low, high]
        t = self.teacher.native_time(u.clamp(min=0.02, max=0.98))
        noise = rng.normal_like(x)
        return self.teacher.add_noise(x, t, noise), t, noise

    def fake_loss_weight(self, t):
        alpha, sigma = self.teacher.coefficients(t)
        return (alpha**2 / sigma**2).clamp(max=5.0).sqrt()  # x0 regression with min(SNR, 5) weighting

    def generator_loss(self, x, grad, weights):
        c = 0.00054 * (x[0].numel() ** 0.5)
        distance = ((x - (x - grad).detach()) ** 2).flatten(1).sum(dim=1)
        return (weights * ((distance + c**2).sqrt() - c)).mean()
