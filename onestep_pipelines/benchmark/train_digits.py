"""Train the shipped digits models (seeded, reproducible on CPU).

    python -m onestep_pipelines.benchmark.train_digits classifier --out onestep_pipelines/assets/digits/classifier
    python -m onestep_pipelines.benchmark.train_digits teacher --out onestep_pipelines/assets/digits/teacher
    python -m onestep_pipelines.benchmark.train_digits reward-classifier --out onestep_pipelines/assets/digits/reward_classifier

The classifier is a small CNN (FD-digits features); the reward classifier an MLP trained on half A only (the reward of
reward post-training, kept apart from the FD classifier); the teacher is a class-conditional
rectified-flow model (velocity prediction, Liu et al. 2022) trained with logit-normal times
(Esser et al. 2024), 10 % label dropout for classifier-free guidance and an EMA of its weights.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

from .digits import DigitsClassifier, DigitsRewardClassifier, load_digits_images, real_halves


def _random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel (padding with background -1)."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + 8, dx : dx + 8]


def fit_classifier(images, labels, epochs: int = 80, seed: int = 0) -> DigitsClassifier:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=g)
        for idx in perm.split(128):
            loss = F.cross_entropy(model(_random_shift(images[idx], g)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _save_atomically(save_fn, out: str) -> None:
    """Write into a temporary sibling folder, then swap it into place."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    os.chmod(tmp, 0o755)
    try:
        save_fn(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def train_classifier(out: str, seed: int = 0) -> None:
    (xa, ya), (xb, yb) = real_halves()
    held_out = fit_classifier(xa, ya, seed=seed)
    with torch.no_grad():
        acc = (held_out(xb).argmax(1) == yb).float().mean().item()
    print(f"classifier trained on half A: accuracy on held-out half B = {acc:.4f}")
    images, labels = load_digits_images()
    model = fit_classifier(images, labels, seed=seed)
    _save_atomically(model.save_pretrained, out)
    print(f"saved the classifier trained on all {len(images)} digits to {out}")


def train_reward_classifier(out: str, seed: int = 0, epochs: int = 150, noise: float = 0.2) -> None:
    """The reward model: trained on half A only (the digits the trainer may see), with random shifts and Gaussian
    pixel noise of std ``noise``; its accuracy on half B is printed."""
    (xa, ya), (xb, yb) = real_halves()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitsRewardClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(xa), generator=g).split(128):
            images = _random_shift(xa[idx], g)
            images = images + noise * torch.randn(images.shape, generator=g)
            loss = F.cross_entropy(model(images), ya[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xb).argmax(1) == yb).float().mean().item()
    print(f"reward classifier trained on half A: accuracy on half B = {acc:.4f}")
    _save_atomically(model.save_pretrained, out)
    print(f"saved the reward classifier to {out}")


def train_teacher(out: str, steps: int, batch_size: int, lr: float, seed: int, guidance_scale: float, log_every: int = 200) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..models import DigitsTransformer2DModel
    from ..pipelines.pipeline_digits import DigitsPipeline

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    (images, labels), _ = real_halves()  # half A only: half B is the reference of every FD
    model = DigitsTransformer2DModel(sample_size=8, patch_size=2, hidden_size=128, depth=4, num_heads=4)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    print(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {steps} steps of {batch_size}")
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=g) < 0.1] = model.null_class
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=g))  # logit-normal(0, 1)
        s = sigma[:, None, None, None]
        x_t = (1 - s) * x0 + s * eps
        loss = F.mse_loss(model(x_t, sigma * 1000, y).sample, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 200)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running += loss.item()
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            print(f"step {step:5d}  loss {running / n:.4f}  {time.time() - start:7.1f} s", flush=True)
            running = 0.0
    pipe = DigitsPipeline(transformer=ema, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), default_guidance_scale=guidance_scale)
    _save_atomically(lambda d: pipe.save_pretrained(d, safe_serialization=True), out)
    print(f"saved the teacher (EMA weights) to {out} after {time.time() - start:.0f} s of training")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["classifier", "reward-classifier", "teacher"])
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--steps", type=int, default=4000, help="teacher training steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="teacher's default CFG scale")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.what == "classifier":
        train_classifier(args.out, args.seed)
    elif args.what == "reward-classifier":
        train_reward_classifier(args.out, args.seed)
    else:
        train_teacher(args.out, args.steps, args.batch_size, args.lr, args.seed, args.guidance_scale)


if __name__ == "__main__":
    main()
