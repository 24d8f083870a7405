"""Inference cost of a pi-Flow policy student against a 1-step student: the network call, the policy's substeps, and
whole pipeline calls (median of repeated timed calls after warm-up, on the device given).

    python benchmarks/policy_cost.py --policy-student RUN/student --one-step-student RUN2/student [--batch 256] [--device cpu]

Prints a table: per batch, the network forward, the policy roll-out at several substep counts (no network), and the
pipelines' whole calls at their recorded steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, device, repeats: int = 20) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after 3 warm-up calls (synchronised on CUDA)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy-student", required=True, help="a pi-Flow student folder (onestep-train distill --method piflow)")
    parser.add_argument("--one-step-student", required=True, help="a 1-step student folder to compare with (e.g. the default DMD2 run)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--substeps", default="8,32,128")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from diffusers import DiffusionPipeline

    import onestep_pipelines  # noqa: F401
    from onestep_pipelines.sampling.policies import make_policy, policy_rollout
    from onestep_pipelines.schedulers import PolicyScheduler

    device = torch.device(args.device)
    policy_pipe = DiffusionPipeline.from_pretrained(args.policy_student).to(device)
    one_step = DiffusionPipeline.from_pretrained(args.one_step_student).to(device)
    for pipe in (policy_pipe, one_step):
        pipe.set_progress_bar_config(disable=True)
    config = policy_pipe.scheduler.config
    model = policy_pipe.transformer
    labels = torch.arange(args.batch, device=device) % 10
    x = torch.randn(args.batch, 1, 8, 8, device=device)
    t = torch.full((args.batch,), 1000.0, device=device)
    rows = []
    with torch.no_grad():
        forward = timed(lambda: model(x, t, labels), device)
        rows.append(("network forward (either student)", forward))
        out = model(x, t, labels).sample
        for n in (int(s) for s in args.substeps.split(",")):
            policy = make_policy(config.policy, out, x, 1.0, 0.0, config.num_components)
            rows.append((f"policy roll-out, {n} substeps ({config.policy}, K={config.num_components})", timed(lambda: policy_rollout(policy, n), device)))
        call = dict(class_labels=labels.tolist(), output_type="latent")
        rows.append((f"1-step student ({one_step.student.method}), whole call", timed(lambda: one_step(**call), device)))
        for n in (int(s) for s in args.substeps.split(",")):
            policy_pipe.scheduler = PolicyScheduler.from_config(config, substeps=n)
            steps = policy_pipe.student.num_inference_steps
            rows.append((f"pi-Flow student, {steps} NFE x {n} substeps, whole call", timed(lambda: policy_pipe(**call), device)))
    print(f"batch {args.batch} on {device}; median of 20 calls")
    print(f"{'what':<62} {'ms':>8} {'x forward':>10}")
    for name, seconds in rows:
        print(f"{name:<62} {seconds * 1000:>8.2f} {seconds / forward:>10.2f}")


if __name__ == "__main__":
    main()
