"""Flow-map distillation (Sabour et al. 2025, "Align Your Flow: Scaling Continuous-Time Flow Map Distillation").

The student is a flow map written with an average velocity, ``X(z_t, t, r) = z_t - (t - r) u(z_t, r, t)`` (time 1 =
noise), and must transport ``z_t`` along the teacher's probability-flow ODE ``dz/dt = v(z, t)`` to any earlier time
``r``. Two ways to tie it to the teacher:

- ``--target euler`` (no JVP, the default), Lagrangian map distillation in discrete form (AYF sec. 3): the map's end
  point must move with the teacher, ``d/dr X(z_t, t, r) = v(X, r)``. With ``d = 1 / ode_steps`` and
  ``r' = min(r + d, t)``, the EMA map jumps to ``r'`` and one teacher Euler step finishes the jump,
  ``z_r = X_ema(z_t, t, r') - (r' - r) v(X_ema, r')``, so
  ``u_tgt = (z_t - z_r) / (t - r) = ((t - r') u_ema(z_t, r', t) + (r' - r) v(X_ema, r')) / (t - r)``. Intervals
  shorter than ``d`` regress onto the teacher's velocity itself, so many small steps follow the teacher's ODE (flow
  maps do not degrade as steps grow, unlike consistency models). With ``--jump-fraction f`` (default 0.5) the teacher covers
  ``r' - r = max(d, f (t - r))`` in Euler steps of at most ``d`` (their mean velocity replaces ``v``): long jumps
  then bootstrap from a map a fraction ``f`` shorter instead of ``d`` shorter, at the cost of more teacher calls
  (``f = 0``: the single Euler step above).
- ``--target jvp``, Eulerian map distillation (AYF): ``X`` is constant along the teacher's ODE,
  ``dX/dt = v - u - (t - r) du/dt = 0``, i.e. ``u_tgt = v - (t - r) sg(du/dt)`` with the total derivative ``du/dt``
  along ``(v, 0, 1)`` from one JVP. This is MeanFlow's identity with the teacher's velocity, so it is MeanFlow's
  target. (The continuous Lagrangian form ``u_tgt = v(X, r) + (t - r) du/dr`` feeds the student's own
  ``r``-derivative back with a positive sign; on the digits teacher it diverged, and with AYF's residual
  normalisation it did not learn: FD > 300.)

``--target shortcut`` is MeanFlow's (two half jumps of the EMA map on dyadic steps; see :mod:`.meanflow`).

The teacher's velocity is guided (``--guidance-scale``, baked into the student). Times, the loss weighting and the
EMA target network are MeanFlow's.
"""

from __future__ import annotations

import math

import torch

from .meanflow import MeanFlow


class FlowMap(MeanFlow):
    name = "flowmap"

    def prediction_and_target(self, z, r, t, x, e, conditions):
        tt, rr = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
        if self.target in ("jvp", "shortcut"):  # Eulerian: MeanFlow's identity with the teacher's velocity; shortcut's halves
            return super().prediction_and_target(z, r, t, x, e, conditions)
        with torch.no_grad():
            d = 1.0 / self.config.ode_steps
            r_mid = torch.minimum(r + torch.clamp_min(self.config.jump_fraction * (t - r), d), t)
            mid = r_mid.view(-1, 1, 1, 1)
            u_ema = self.u(self.target_net, z, r_mid, t, conditions)
            # teacher Euler steps of at most d for the longest teacher interval possible, max(d, f): known on the host
            substeps = max(1, math.ceil(max(d, self.config.jump_fraction) / d - 1e-6))
            h = ((r_mid - r) / substeps).view(-1, 1, 1, 1)
            z_s, s, v_sum, v_first = z - (tt - mid) * u_ema, mid, 0.0, None
            for _ in range(substeps):
                v = self.teacher_velocity(z_s, s.flatten(), conditions)
                v_first = v if v_first is None else v_first  # at (z_t, t) where r' = t
                v_sum, z_s, s = v_sum + v, z_s - h * v, s - h
            target = ((tt - mid) * u_ema + (mid - rr) * v_sum / substeps) / (tt - rr).clamp_min(1e-6)
            target = torch.where((t > r).view(-1, 1, 1, 1), target, v_first)
        return self.u(self.student, z, r, t, conditions), target
