"""pi-Flow: policy-based few-step students trained by imitation distillation (Chen et al. 2025, "pi-Flow: Policy-Based
Few-Step Generation via Imitation Distillation").

At each of its ``--num-steps`` steps the student's network returns a *policy*: the parameters of a velocity field
valid from the step's time ``t_i`` to the next one, ``t_{i+1}`` (GMFlow's Gaussian mixture, ``--policy gmflow``, or
data estimates at evenly spaced times, ``--policy dx``; :mod:`onestep_pipelines.sampling.policies`). Sampling
integrates the policy in ``--policy-substeps`` Euler substeps with no further network call, so the network cost is
the number of steps.

pi-ID (imitation distillation): the student's own roll-out (its earlier steps, no gradient) reaches ``x_{t_i}``; the
network gives the policy there (with gradient); the policy alone, detached, carries ``x_{t_i}`` to a random time
``s`` of the step, ``t_{i+1} < s <= t_i``; there the policy's velocity must equal the teacher's (guided),

    L = || v_pi(x_s, s) - v_teacher(x_s, s) ||^2,

so the policy imitates the teacher along the trajectory the policy itself takes (on-policy: errors it makes early
move the states where it is corrected later).

The student is the teacher with a wider output layer: for gmflow ``K`` copies of the teacher's velocity head (the
component means start at the teacher's data estimate, each copy's bias perturbed so that the components differ), zero
logits (equal weights) and a log-std channel starting at ``log 0.1``; for dx ``K`` copies. Digits DiT teachers here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from onestep_pipelines.sampling.policies import make_policy, policy_channels, policy_rollout, policy_velocity
from onestep_pipelines.schedulers import PolicyScheduler

from .base import Method

INITIAL_STD = 0.1  # the gmflow components' std at initialisation
MEAN_JITTER = 0.05  # std of the perturbation of each component's bias at initialisation


def policy_head(model, kind: str, components: int, seed: int = 0) -> None:
    """Widen the digits DiT ``model``'s output layer, in place, to a ``kind`` policy initialised from its velocity head."""
    cfg = model.config
    c, p = cfg.in_channels, cfg.patch_size
    old = model.out
    channels = policy_channels(kind, components, c)
    new = nn.Linear(old.in_features, channels * p * p).to(old.weight.device, old.weight.dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        rows = c * p * p  # the velocity head's rows: channel-major, then the patch's pixels
        for k in range(components):
            new.weight[k * rows : (k + 1) * rows] = old.weight
            jitter = MEAN_JITTER * torch.randn(rows, generator=generator) if kind == "gmflow" and components > 1 else 0.0
            new.bias[k * rows : (k + 1) * rows] = old.bias + jitter
        if kind == "gmflow":
            new.bias[(channels - 1) * p * p :] = math.log(INITIAL_STD)  # the log-std channel (its spatial mean is log s)
    model.out = new
    model.register_to_config(out_channels=channels)


class PiFlow(Method):
    name = "piflow"
    scheduler_class = "PolicyScheduler"
    adam_betas = (0.9, 0.99)

    @staticmethod
    def sampler_gamma(config) -> None:
        return None  # PolicyScheduler: deterministic, no gamma

    @classmethod
    def check_teacher(cls, teacher) -> None:
        super().check_teacher(teacher)
        if teacher.architecture != "digits":
            raise ValueError(f"--method piflow builds its policy head on the digits DiT; a {teacher.architecture} teacher's output layer "
                             "is not supported yet.")

    @classmethod
    def start_from(cls, teacher, student, config):
        """The teacher's copy with a policy head, and the scheduler that integrates its policies."""
        policy_head(student, config.policy, config.policy_components, config.seed)
        return PolicyScheduler.from_config(teacher.pipeline.scheduler.config, policy=config.policy, num_components=config.policy_components,
                                           substeps=config.policy_substeps)

    def end_time(self, i: int, n: int, device) -> torch.Tensor:
        """The time step ``i`` ends at: the next step's, or 0 after the last."""
        return self.time_at(i + 1, n, device) if i + 1 < len(self.times) else torch.zeros(n, device=device)

    def policy(self, out, x, i):
        return make_policy(self.config.policy, out, x, self.time_at(i, len(x), x.device), self.end_time(i, len(x), x.device), self.config.policy_components)

    def sample(self, noise, conditions, steps: int) -> torch.Tensor:
        """The student's own roll-out for ``steps`` of its steps (no gradient): network call, then the policy's substeps."""
        x = noise
        with torch.no_grad():
            for i in range(steps):
                out = self.teacher.call(self.student, x, self.time_at(i, len(x), x.device), conditions).float()
                x = policy_rollout(self.policy(out, x, i), self.config.policy_substeps)
        return x

    def train_step(self, batch, rng) -> dict:
        conditions = batch["conditions"]
        noise = rng.normal(*self.teacher.sample_shape)
        i = rng.host_integer(0, len(self.times))
        x = self.sample(noise, conditions, i)
        out = self.teacher.call(self.student, x, self.time_at(i, len(x), x.device), conditions).float()
        policy = self.policy(out, x, i)
        with torch.no_grad():  # the policy's own trajectory to a random time of the step, and the teacher there
            t, t_end = policy.t.flatten(), policy.t_end.flatten()
            s = (t_end + (t - t_end) * (1 - rng.uniform())).clamp_min(1e-3)
            detached = self.policy(out.detach(), x, i)
            x_s = policy_rollout(detached, self.config.policy_substeps, s_end=s)
            x0, eps = self.teacher.predict(self.teacher.model, x_s, s, conditions, guidance_scale=self.config.guidance_scale)
            v_teacher = eps - x0
        loss = ((policy_velocity(policy, x_s, s) - v_teacher) ** 2).mean()
        self.update(loss, self.optimizer, self.name)
        return {self.name: loss.detach()}
