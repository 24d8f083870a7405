"""TwinFlow: one-step generation with self-adversarial flows, without a discriminator and without a separate fake
score (Cheng et al. 2025, "TwinFlow: Realizing One-step Generation on Large Models with Self-adversarial Flows").

One network ``u(z, r, t)`` (an average velocity, as MeanFlow's; time 1 = noise) serves two trajectories. For
``t > 0`` it is the flow to the real data; its *twin* at negative time, ``u(z, -t, -t)``, is the flow to the
network's own one-step samples ``x_fake = z - u(z, 0, 1)``. Three losses, summed:

- ``L_base``: the any-step objective on the real branch, here MeanFlow's (``--target``; velocity from data, or from
  the teacher with ``--source teacher``), which also keeps ``u(z, t, t)`` the real velocity ``v_real``;
- ``L_adv``: flow matching of the twin on the fake samples, ``||u(z_t, -t, -t) - (e - sg(x_fake))||^2`` at
  ``z_t = (1 - t) sg(x_fake) + t e``: the twin learns the fake distribution's velocity (DMD's fake score, in the
  same weights);
- ``L_rectify``: the velocity difference ``dv = u(z_t', -t', -t') - v_real(z_t', t')`` at fresh noisy fake samples
  (no gradient) moves the one-step output along ``+dv`` (``x0_real - x0_fake = t' dv``: DMD's direction):
  ``||F - sg(F - clip(dv, -1, 1))||^2`` with ``F = u(z, 0, 1)``, weighted by ``--rectify-weight`` (0.5 as in the
  official configurations). ``v_real`` is the network's own real branch (from data: no teacher at all) or the
  teacher's guided velocity (``--source teacher``).

Every loss is MeanFlow's adaptively weighted error (per-sample ``err / sg(err + 1e-3)^0.5``, close to the official
per-sample Barron loss). Students sample with the flow-map scheduler at any step count, by deterministic jumps between
the step times (gamma 0): on the digits teacher they beat the official sampler's full re-noising (its
``stochast_ratio`` 1 = gamma 1) at 2 to 8 steps (teacher-distilled student, 600 updates, 2 / 4 steps: 6.57 / 6.00
against 7.02 / 8.00 FD-digits).
"""

from __future__ import annotations

import torch

from .meanflow import MeanFlow, adaptive


class TwinFlow(MeanFlow):
    name = "twinflow"

    def fake_velocity(self, z, t, conditions):
        """The twin trajectory's velocity at ``(z, t)``: the network at time ``-t`` (instantaneous: ``r = t``)."""
        return self.u(self.student, z, -t, -t, conditions)

    def real_velocity(self, z, t, conditions):
        """The real distribution's velocity: the teacher's (guided) or, from data, the network's own real branch."""
        if self.config.source == "teacher":
            return self.teacher_velocity(z, t, conditions)
        return self.u(self.student, z, t, t, conditions)

    def train_step(self, batch, rng) -> dict:
        x, conditions = batch["images"], batch["conditions"]
        n = len(x)
        t, r = self.sample_pairs(rng)
        e = rng.normal_like(x)
        tt = t.view(-1, 1, 1, 1)
        pred, target = self.prediction_and_target((1 - tt) * x + tt * e, r, t, x, e, conditions)
        base = adaptive((pred - target) ** 2)

        ones, zeros = torch.ones(n, device=x.device), torch.zeros(n, device=x.device)
        z = rng.normal_like(x)
        one_step = self.u(self.student, z, zeros, ones, conditions)  # F: x_fake = z - F
        fake = (z - one_step).detach()
        t_adv = self.logit_normal_times(rng)
        e_adv = rng.normal_like(x)
        z_adv = (1 - t_adv.view(-1, 1, 1, 1)) * fake + t_adv.view(-1, 1, 1, 1) * e_adv
        adv = adaptive((self.fake_velocity(z_adv, t_adv, conditions) - (e_adv - fake)) ** 2)

        with torch.no_grad():
            t_rect = self.teacher.sample_times(rng.uniform())
            z_rect = (1 - t_rect.view(-1, 1, 1, 1)) * fake + t_rect.view(-1, 1, 1, 1) * rng.normal_like(x)
            dv = (self.fake_velocity(z_rect, t_rect, conditions) - self.real_velocity(z_rect, t_rect, conditions)).clamp(-1.0, 1.0)
        rectify = adaptive((one_step - (one_step - dv).detach()) ** 2)

        loss = base + adv + self.config.rectify_weight * rectify
        self.update(loss, self.optimizer, self.name)
        self.ema_(self.target_net, self.accelerator.unwrap_model(self.student), self.config.target_ema)
        return {"base": base.detach(), "adversarial": adv.detach(), "rectify": rectify.detach()}
