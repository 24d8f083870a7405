"""Step-by-step parity of our schedulers with the diffusers schedulers they generalise.

For every row: fresh random sample and model outputs (seeded), the same ``torch.Generator`` seed for
both schedulers' noise (or, with ``--per-image-generators``, a list of one generator per image of the batch, as
pipelines pass with ``generator=[...]``), 1, 2 and 4 steps where the diffusers scheduler supports that count; each
scheduler runs its own trajectory and the maximum absolute difference of ``prev_sample`` over all
steps is reported, relative to the largest value of the stock trajectory (at least 1): a row passes at <= 1e-6,
a few float32 rounding steps (our schedulers apply each step as per-step constants worked out in float64, so the
last bits differ from the stock schedulers' own order of operations).

    python benchmarks/parity.py
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    LCMScheduler,
    SCMScheduler,
    TCDScheduler,
)

from onestep_pipelines import ConsistencyScheduler, FlowMapScheduler

try:  # not in every diffusers release
    from diffusers import FlowMapEulerDiscreteScheduler
except ImportError:  # pragma: no cover - depends on the installed diffusers
    FlowMapEulerDiscreteScheduler = None

TOLERANCE = 1e-6
STEPS = (1, 2, 4)
SHAPE = (2, 4, 8, 8)


@dataclass
class Row:
    name: str
    steps: int
    max_abs_diff: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= TOLERANCE


def _generators(seed: int, per_image: bool):
    """One generator, or one per image of the batch (seeds ``seed, seed + 1, ...``)."""
    if not per_image:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + b) for b in range(SHAPE[0])]


def _run(stock, ours, stock_timesteps, seed: int, stock_step_kwargs=None, start_scale: float = 1.0, per_image: bool = False) -> float:
    """Run both schedulers on the same model outputs and noise seeds; max |prev_a - prev_b| / max(1, |prev_a|) over
    steps."""
    g = torch.Generator().manual_seed(seed)
    x_a = torch.randn(SHAPE, generator=g) * start_scale
    x_b = x_a.clone()
    outputs = [torch.randn(SHAPE, generator=g) for _ in stock_timesteps]
    gen_a, gen_b = _generators(seed + 1, per_image), _generators(seed + 1, per_image)
    kwargs = dict(stock_step_kwargs or {})
    if "generator" in inspect.signature(stock.step).parameters:
        kwargs["generator"] = gen_a
    worst = 0.0
    for t_a, t_b, out in zip(stock_timesteps, ours.timesteps, outputs):
        x_a = stock.step(out, t_a, x_a, **kwargs).prev_sample
        x_b = ours.step(out, t_b, x_b, generator=gen_b).prev_sample
        worst = max(worst, (x_a - x_b).abs().max().item() / max(1.0, x_a.abs().max().item()))
    return worst


def parity_rows(seed: int = 0, per_image_generators: bool = False) -> list[Row]:
    rows: list[Row] = []
    run = functools.partial(_run, per_image=per_image_generators)
    for n in STEPS:
        stock = LCMScheduler()
        ours = ConsistencyScheduler.from_config(LCMScheduler().config, gamma=1)
        stock.set_timesteps(n)
        ours.set_timesteps(n)
        rows.append(Row("LCMScheduler vs Consistency(gamma=1)", n, run(stock, ours, stock.timesteps, seed)))

    for g in (0.0, 0.3, 1.0):
        for n in STEPS:
            stock = TCDScheduler()
            # Stock LCM and TCD configs are identical; TCD's trajectories end at alphas_cumprod[0].
            ours = ConsistencyScheduler.from_config(TCDScheduler().config, gamma=g, set_alpha_to_one=False)
            stock.set_timesteps(n)
            ours.set_timesteps(n)
            diff = run(stock, ours, stock.timesteps, seed, {"eta": g})
            rows.append(Row(f"TCDScheduler(eta={g}) vs Consistency(gamma={g})", n, diff))

    for n in STEPS:
        stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
        ours = ConsistencyScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, gamma=0, timestep_preset="linspace")
        stock.set_timesteps(n)
        ours.set_timesteps(n)  # the "linspace" preset is the stock default grid
        rows.append(Row("FlowMatchEuler(shift=3) vs Consistency(gamma=0, linspace preset)", n, run(stock, ours, stock.timesteps, seed)))
        stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sigmas = np.linspace(1.0, 1.0 / n, n).tolist()  # what the Flux pipeline passes; both shift it
        stock.set_timesteps(sigmas=sigmas)
        ours.set_timesteps(sigmas=sigmas)
        rows.append(Row("FlowMatchEuler(shift=3) vs Consistency(gamma=0), sigmas", n, run(stock, ours, stock.timesteps, seed)))

    for n in STEPS:
        stock = FlowMatchLCMScheduler(shift=3.0)
        ours = ConsistencyScheduler.from_config(FlowMatchLCMScheduler(shift=3.0).config, gamma=1, timestep_preset="linspace")
        stock.set_timesteps(n)
        ours.set_timesteps(n)
        rows.append(Row("FlowMatchLCM(shift=3) vs Consistency(flow, gamma=1, linspace preset)", n, run(stock, ours, stock.timesteps, seed)))

    for n in STEPS:
        stock = SCMScheduler()
        ours = ConsistencyScheduler.from_config(SCMScheduler().config, gamma=1)
        stock.set_timesteps(n, intermediate_timesteps=1.3 if n == 2 else None)
        ours.set_timesteps(n)
        diff = run(stock, ours, stock.timesteps[:-1], seed, start_scale=stock.config.sigma_data)
        rows.append(Row("SCMScheduler vs Consistency(trigflow, gamma=1)", n, diff))

    for n in STEPS:
        ours = FlowMapScheduler(shift=3.0, gamma=0.0)
        ours.set_timesteps(n)
        if FlowMapEulerDiscreteScheduler is not None:
            stock = FlowMapEulerDiscreteScheduler(shift=3.0)
            stock.set_timesteps(n)
            diff = run(stock, ours, stock.timesteps, seed)
            rows.append(Row("FlowMapEulerDiscrete(shift=3) vs FlowMap(gamma=0)", n, diff))
        else:
            rows.append(Row("formula x_r = x_t - (t - r) u vs FlowMap(gamma=0)", n, _formula_flow_map(ours, seed)))
    return rows


def _formula_flow_map(ours: FlowMapScheduler, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    worst, ref = 0.0, x.clone()
    sigmas = ours.sigmas.double()
    for i, t in enumerate(ours.timesteps):
        u = torch.randn(SHAPE, generator=g)
        ref = (ref.double() - (sigmas[i] - sigmas[i + 1]) * u.double()).float()
        x = ours.step(u, t, x).prev_sample
        worst = max(worst, (x - ref).abs().max().item())
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-image-generators", action="store_true", help="one generator per image of the batch")
    args = parser.parse_args(argv)
    rows = parity_rows(args.seed, args.per_image_generators)
    width = max(len(r.name) for r in rows)
    print(f"{'comparison':<{width}}  steps  max |diff| / max(1, |x|)   pass (<= {TOLERANCE:g})")
    for r in rows:
        print(f"{r.name:<{width}}  {r.steps:>5}  {r.max_abs_diff:.2e}                  {'yes' if r.passed else 'NO'}")
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
