"""Reflow: a rectified flow trained on the teacher's own couplings (Liu et al. 2022, "Flow Straight and Fast";
InstaFlow, Liu et al. 2023; Lee et al. 2024, "Improving the Training of Rectified Flows").

The teacher's probability-flow ODE (``--ode-steps`` Euler steps with ``--guidance-scale``, time 1 = noise) pairs each
noise ``e`` with a sample ``x``; the couplings are cached on disk (:mod:`..couplings`). The student starts as the
teacher and learns the straight path between the pairs,

    z_t = (1 - t) x + t e,    L = d(v(z_t, t), e - x),

with ``d`` pseudo-Huber or squared L2 (``--loss``). Paths of a deterministic coupling cross less than those of
independent pairs, so the 2-rectified flow is straighter and its few-step Euler samples are closer to its ODE's.
``t`` follows the U-shaped density ``p(t) ~ cosh(a (t - 1/2))``, ``a = 4``, which puts weight on both ends (Lee et
al. 2024 weight the ends; at ``t = 1`` the velocity is the whole 1-step jump).

- ``--target flow`` (default): the 2-rectified flow above; sampled by Euler (ConsistencyScheduler, gamma 0) at any
  step count.
- ``--target distill``: InstaFlow's second stage, only ``t = 1``: the 1-step jump ``x = e - v(e, 1)`` regresses onto
  the coupled sample (at ``t = 1`` the velocity error is the sample error). Run it with ``--teacher`` the reflowed
  student folder, whose ODE then makes the couplings.

The teacher's guidance is baked into the couplings, so the student samples without CFG.
"""

from __future__ import annotations

import math
import os

import torch

from ..couplings import build_couplings
from . import METHODS
from .base import Method, distance

U_SHAPE = 4.0  # a of the U-shaped time density cosh(a (t - 1/2))


def u_shaped_times(u: torch.Tensor, a: float = U_SHAPE) -> torch.Tensor:
    """Times with density ``~ cosh(a (t - 1/2))`` on ``[0, 1]`` from uniform draws ``u`` (inverse CDF:
    ``t = 1/2 + asinh((2u - 1) sinh(a / 2)) / a``)."""
    return 0.5 + torch.asinh((2 * u - 1) * math.sinh(a / 2)) / a


class Reflow(Method):
    name = "reflow"
    any_step_count = True  # a flow: Euler at any step count
    reports_straightness = True
    adam_betas = (0.9, 0.999)

    @staticmethod
    def sampler_gamma(config) -> float:
        return 0.0

    def __init__(self, teacher, student, scheduler, config, **run):
        super().__init__(teacher, student, scheduler, config, **run)
        self.target = config.target or METHODS[self.name].targets[0]

    def ode_times(self) -> torch.Tensor:
        """Native times of the teacher's Euler ODE (the student's schedule at ``--ode-steps`` steps, then 0), on the
        training device."""
        grid = type(self.scheduler).from_config(self.scheduler.config)
        grid.set_timesteps(self.config.ode_steps, mu=self.teacher.shift_mu(self.config.ode_steps))
        times = torch.cat([grid.native_times(grid.timesteps).cpu().float(), torch.zeros(1)])
        return times.to(self.accelerator.device)

    def prepare(self, data):
        """The couplings replace the data (generated on the first run, read back afterwards)."""
        folder = self.config.coupling_dir or os.path.join(self.config.output_dir, "couplings")
        return build_couplings(self, folder, self.config.coupling_count, self.accelerator)

    def train_step(self, batch, rng) -> dict:
        x, e, conditions = batch["images"], batch["noise"], batch["conditions"]
        t = torch.ones(len(x), device=x.device) if self.target == "distill" else u_shaped_times(rng.uniform())
        z = self.teacher.add_noise(x, t, e)
        x0, eps = self.predict_student(z, t, conditions)
        loss = distance(eps - x0, e - x, self.config.loss).mean()  # the flow velocity eps - x0 against the straight path's
        self.update(loss, self.optimizer, self.name)
        return {self.name: loss.detach()}
