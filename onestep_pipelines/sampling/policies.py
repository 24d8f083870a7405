"""Policies of pi-Flow students (Chen et al. 2025, "pi-Flow: Policy-Based Few-Step Generation via Imitation
Distillation"): a network call at ``(x_t, t)`` returns the parameters of a velocity field that is valid from ``t`` down
to the next step's time; it is integrated with many cheap substeps and no further network call.

Rectified-flow time (``x_s = (1 - s) x_0 + s e``, 1 = noise), where a velocity follows from a data estimate as
``v(x_s, s) = (x_s - x0_hat(x_s, s)) / s``. The network output ``out`` has, per pixel:

- ``"gmflow"`` (GMFlow policy, Chen et al. 2025, "Gaussian Mixture Flow Matching Models"): ``K`` component
  velocities ``u_k`` (``K * C`` channels; means ``mu_k = x_t - t u_k``, the teacher's own parametrisation), ``K``
  mixture logits and one channel whose spatial mean is ``log s`` (a shared isotropic std). The mixture is a posterior
  over ``x_0`` at ``(x_t, t)``; at a later ``(x_s, s)`` it is conditioned on ``x_s`` in closed form: with
  ``a = alpha_s^2 / sigma_s^2 - alpha_t^2 / sigma_t^2`` and ``b = alpha_s x_s / sigma_s^2 - alpha_t x_t / sigma_t^2``
  (``p(x_0 | x_s) ~ p(x_0 | x_t) N(x_s; alpha_s x_0, sigma_s^2) / N(x_t; alpha_t x_0, sigma_t^2)``), component ``k``
  becomes ``N((mu_k + s^2 b) / (1 + a s^2), s^2 / (1 + a s^2))`` with log-weight
  ``logit_k + sum_c (2 mu_k b - a mu_k^2) / (2 (1 + a s^2))``, and ``x0_hat`` is the mixture's mean.
- ``"dx"`` (DX policy): ``K`` data estimates ``x0_j = x_t - t u_j`` at ``K`` times evenly spaced from ``t`` to the
  step's end (``K * C`` channels), linearly interpolated in time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .steps import flow_map_step

POLICIES = ("gmflow", "dx")


def policy_channels(kind: str, components: int, channels: int) -> int:
    """Output channels of a ``kind`` policy with ``components`` components / nodes on ``channels``-channel samples."""
    check_policy(kind, components)
    return components * channels + (components + 1 if kind == "gmflow" else 0)


def check_policy(kind: str, components: int) -> None:
    if kind not in POLICIES:
        raise ValueError(f"policy {kind!r} is unknown; choose one of {', '.join(POLICIES)}.")
    if not isinstance(components, int) or components < (2 if kind == "dx" else 1):
        raise ValueError(f"a {kind} policy needs {'at least 2 nodes' if kind == 'dx' else 'at least 1 component'}, got {components!r}.")


@dataclass
class Policy:
    """A policy anchored at ``(x_t, t)``, valid down to ``t_end`` (times ``(B, 1, 1, 1)`` or scalars)."""

    kind: str
    x_t: torch.Tensor
    t: torch.Tensor
    t_end: torch.Tensor
    means: torch.Tensor  # (B, K, C, H, W): GM means / DX node data estimates
    logits: torch.Tensor | None = None  # (B, K, 1, H, W), gmflow
    variance: torch.Tensor | None = None  # (B, 1, 1, 1, 1), gmflow: s^2


def make_policy(kind: str, out: torch.Tensor, x_t: torch.Tensor, t, t_end, components: int) -> Policy:
    """The policy of network output ``out`` (``(B, policy_channels, H, W)``) at ``(x_t, t)`` for the step to ``t_end``."""
    b, c = x_t.shape[:2]
    expected = policy_channels(kind, components, c)
    if out.shape[1] != expected or out.shape[0] != b or out.shape[2:] != x_t.shape[2:]:
        raise ValueError(f"model output of shape {tuple(out.shape)} is not a {kind} policy with {components} components for samples of shape "
                         f"{tuple(x_t.shape)}: it needs {expected} channels (is the model a pi-Flow policy student of this configuration?).")
    t, t_end = (torch.as_tensor(v, dtype=x_t.dtype, device=x_t.device).reshape(-1, 1, 1, 1) for v in (t, t_end))
    u = out[:, : components * c].unflatten(1, (components, c))
    means = x_t.unsqueeze(1) - t.unsqueeze(1) * u  # x0 = x_t - t u, per component / node
    if kind == "dx":
        return Policy(kind, x_t, t, t_end, means)
    logits = out[:, components * c : components * c + components].unsqueeze(2)
    log_s = out[:, -1:].mean(dim=(1, 2, 3)).view(-1, 1, 1, 1, 1)
    return Policy(kind, x_t, t, t_end, means, logits, (2 * log_s).exp())


def policy_x0(policy: Policy, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The policy's data estimate at ``(x, s)`` (``t_end <= s <= t``; ``s`` shaped ``(B, 1, 1, 1)`` or a scalar)."""
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    if policy.kind == "dx":
        k = policy.means.shape[1]
        span = (policy.t - policy.t_end).clamp_min(1e-12)
        position = ((policy.t - s) / span).clamp(0, 1) * (k - 1)  # node index, fractional
        low = position.floor().clamp(max=k - 2)
        frac = (position - low).unsqueeze(1)
        index = low.long().view(-1, 1, 1, 1, 1).expand(policy.means.shape[0], 1, *policy.means.shape[2:])
        lo, hi = policy.means.gather(1, index), policy.means.gather(1, index + 1)
        return ((1 - frac) * lo + frac * hi).squeeze(1)
    t = policy.t
    a = ((1 - s) / s) ** 2 - ((1 - t) / t) ** 2  # alpha^2 / sigma^2 at s minus at t (flow: alpha = 1 - sigma)
    b = (1 - s) * x / s**2 - (1 - t) * policy.x_t / t**2
    a, b = a.unsqueeze(1), b.unsqueeze(1)
    denominator = 1 + a * policy.variance
    means = (policy.means + policy.variance * b) / denominator
    logits = policy.logits + ((2 * policy.means * b - a * policy.means**2) / (2 * denominator)).sum(dim=2, keepdim=True)
    return (logits.softmax(dim=1) * means).sum(dim=1)


def policy_velocity(policy: Policy, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The policy's flow velocity ``(x - x0_hat(x, s)) / s`` at ``(x, s)``, ``s > 0``."""
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    return (x - policy_x0(policy, x, s)) / s


def policy_rollout(policy: Policy, substeps: int, s_end=None) -> torch.Tensor:
    """Integrate the policy from ``(x_t, t)`` to ``s_end`` (default ``t_end``; per sample allowed) with ``substeps``
    Euler steps (the flow-map step of the sampling core with the instantaneous velocity), no network call."""
    if not isinstance(substeps, int) or substeps < 1:
        raise ValueError(f"substeps must be a positive integer, got {substeps!r}.")
    x = policy.x_t
    s_end = policy.t_end if s_end is None else torch.as_tensor(s_end, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    h = (policy.t - s_end) / substeps
    s = policy.t
    for _ in range(substeps):
        x = flow_map_step(x, policy_velocity(policy, x, s), s, s - h)
        s = s - h
    return x
