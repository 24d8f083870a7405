"""Hyper-SD: trajectory segmented consistency distillation (Ren et al. 2024, "Hyper-SD: Trajectory Segmented
Consistency Model for Efficient Image Synthesis").

Stage by stage the noise range is cut into fewer segments, 8 -> 4 -> 2 -> 1 (from ``--phases``, halved down to
``--num-steps``; the ``--max-train-steps`` updates split evenly), and each stage is phased consistency distillation
with that many segments (TSCD, the loss of :mod:`.consistency`: a guided teacher DDIM step, the student and its EMA
target both mapped to the lower edge of the segment), starting from the student the previous stage left: a short
segment's target is learnt first and bootstraps the longer ones. With ``--dmd-weight`` the last stage adds the
score-distillation term of the paper's 1-step stage: DMD2's reverse-KL gradient on the student's own samples with a
fake score trained on them (DMD2's update and options). The paper's human-feedback stage is reward post-training
(``--method reward``) of the result.

Students are sampled like the published Hyper-SD LoRAs: an N-step student by deterministic (DDIM, trailing) jumps
between its segment edges (gamma 0), the 1-step student with full re-noising when run with more steps (TCD's eta 1,
the card's setting at 1 step; lower gamma at more steps).
"""

from __future__ import annotations

import torch

from .base import Method, tied_copy, ties_bases
from .consistency import phased_consistency_loss
from .dmd2 import DMD2
from .progressive import stage_at, stage_count


class HyperSD(DMD2):
    """TSCD stages; a :class:`DMD2` only for the fake score of the ``--dmd-weight`` stage (none is built without it)."""

    name = "hyper-sd"

    def __init__(self, teacher, student, scheduler, config, **run):
        Method.__init__(self, teacher, student, scheduler, config, **run)
        first = config.phases or 8
        self.segments = [first // 2**k for k in range(stage_count(first, config.num_steps) + 1)]  # the config checked the halving
        self.target = tied_copy(student, ties_bases(self.accelerator)).eval().requires_grad_(False)
        self.fake = self.head = None
        if config.dmd_weight > 0:
            self.build_fake_score()

    @staticmethod
    def sampler_gamma(config) -> float | None:
        return 0.0 if config.num_steps > 1 else 1.0

    def stage(self) -> int:
        return stage_at(self.update_index, len(self.segments), self.config.max_train_steps)

    def trained_networks(self) -> dict:
        return super().trained_networks() if self.fake is not None else {}

    def build_optimizers(self) -> dict:
        return super().build_optimizers() if self.fake is not None else {}

    def target_networks(self) -> dict:
        return {"target": self.target}

    def checkpoint_modules(self) -> dict:
        return {"target": (self.target, self.student_trainable_names)} | (super().checkpoint_modules() if self.fake is not None else {})

    def checkpoint_optimizers(self) -> dict:
        return super().checkpoint_optimizers() if self.fake is not None else {}

    def train_step(self, batch, rng) -> dict:
        conditions, stage = batch["conditions"], self.stage()
        last = stage == len(self.segments) - 1
        logs = {}
        if self.fake is not None and last:  # the score-distillation stage: DMD2's fake-score update on the student's samples
            self.fake.train()
            for _ in range(self.config.fake_updates):
                logs = self._fake_update(conditions, batch, rng)
        losses = {"consistency": phased_consistency_loss(self, batch["images"], conditions, rng, self.segments[stage])}
        total = losses["consistency"]
        if self.fake is not None and last:
            x = self._generate(conditions, rng)
            x_t, t, _ = self._noised(x, rng)
            losses["dmd"], _ = self.generator_losses(x, x_t, t, conditions, rng)
            total = total + self.config.dmd_weight * losses["dmd"]
        self.update(total, self.optimizer, self.name)
        self.ema_(self.target, self.accelerator.unwrap_model(self.student), self.config.target_ema)
        return {k: v.detach() for k, v in losses.items()} | logs | {"segments": torch.tensor(float(self.segments[stage]))}
