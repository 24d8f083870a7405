"""Flow-map distillation (Sabour et al. 2025, "Align Your Flow: Scaling Continuous-Time Flow Map Distillation").

The student is a flow map written with an average velocity, ``X(z_t, t, r) = z_t - (t - r) u(z_t, r, t)`` (time 1 =
noise), and must transport ``z_t`` along the teacher's probability-flow ODE ``dz/dt = v(z, t)`` to any earlier time
``r``. Lagrangian map distillation (AYF sec. 3) asks that the map's end point move with the teacher's velocity,
``d/dr X(z_t, t, r) = v(X(z_t, t, r), r)``, which for ``X = z_t - (t - r) u`` reads

    dX/dr = u - (t - r) du/dr = v(X, r)   =>   u_tgt = v(sg(X), r) + (t - r) sg(du/dr).

- ``--target jvp``: ``du/dr`` is one forward-mode JVP of ``u`` in the direction of ``r`` (``torch.func.jvp``). The
  target's own derivative feeds back into it, so, as in AYF, the residual ``u - u_tgt`` is normalised (divided
  by its RMS + 0.1): without it the loss grows within a few hundred updates on the digits teacher.
- ``--target euler`` (no JVP, the default): the discrete form of the same condition. With ``d = 1 / ode_steps`` and
  ``r' = min(r + d, t)``, the EMA map jumps to ``r'`` and one teacher Euler step finishes the jump,
  ``z_r = X_ema(z_t, t, r') - (r' - r) v(X_ema, r')``, so
  ``u_tgt = (z_t - z_r) / (t - r) = ((t - r') u_ema(z_t, r', t) + (r' - r) v(X_ema, r')) / (t - r)``. Intervals shorter
  than ``d`` regress onto the teacher's velocity itself, so many small steps follow the teacher's ODE (flow maps
  do not degrade as steps grow, unlike consistency models).

The teacher's velocity is guided (``--guidance-scale``, baked into the student). Times, the loss weighting and the
EMA target network are MeanFlow's.
"""

from __future__ import annotations

import torch

from . import register_method
from .meanflow import MeanFlow

TANGENT_NORM_C = 0.1  # ||residual|| (RMS per sample) below which the JVP target's step stays proportional


@register_method
class FlowMap(MeanFlow):
    name = "flowmap"
    targets = ("euler", "jvp")
    source_options = ("teacher",)

    def prediction_and_target(self, z, r, t, x, e, conditions):
        tt, rr = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
        if self.target == "jvp":
            pred, dudr = self.jvp(self.student, (z, r, t), (torch.zeros_like(z), torch.ones_like(r), torch.zeros_like(t)), conditions)
            with torch.no_grad():
                end = z - (tt - rr) * pred
                residual = pred - self.teacher_velocity(end, r, conditions) - (tt - rr) * dudr
                norm = residual.flatten(1).norm(dim=1).view(-1, 1, 1, 1) / residual[0].numel() ** 0.5
                target = pred - residual / (norm + TANGENT_NORM_C)  # AYF's tangent normalisation: a bounded step
            return pred, target.detach()
        with torch.no_grad():
            r_mid = torch.minimum(r + 1.0 / self.config.ode_steps, t)
            mid = r_mid.view(-1, 1, 1, 1)
            u_ema = self.u(self.target_net, z, r_mid, t, conditions)
            v_mid = self.teacher_velocity(z - (tt - mid) * u_ema, r_mid, conditions)  # the teacher's velocity where the EMA map lands
            target = ((tt - mid) * u_ema + (mid - rr) * v_mid) / (tt - rr).clamp_min(1e-6)
            target = torch.where((t > r).view(-1, 1, 1, 1), target, v_mid)
        return self.u(self.student, z, r, t, conditions), target
