"""Reward post-training of a few-step student, kept on the data manifold by distribution matching (DMD + reward:
Diff-Instruct* (Luo et al. 2024, "Diff-Instruct*: Towards Human-Preferred One-step Text-to-image Generative
Models"); Reward Guided Latent Consistency Distillation (Li et al. 2024); TDM-R1 (Luo et al. 2025)).

The student (``--student``, a folder this trainer wrote, sampled with ConsistencyScheduler) generates ``x`` as in
DMD2 (step ``k`` of its own roll-out, with gradients). It maximises a reward while DMD2's reverse-KL gradient against
the frozen teacher, with a fake score trained on the student's samples (DMD2's, not a copy), keeps its distribution
near the teacher's:

    L = L_DMD(x) - lambda mean_b r(D(x_b), c_b),    lambda = --reward-weight,

``D`` decoding latents to pixels (the identity for digits). ``--regularizer none`` drops ``L_DMD``: the student then
drifts to whatever the reward likes (reward hacking; FD rises). A reward without a gradient in its images is
followed by a policy-gradient surrogate: the student's sample is the mean of a Gaussian policy ``x + s e``,
``s = --reward-noise``, whose reward gradient is estimated with antithetic pairs (Salimans et al. 2017),
``g = E[(r(x + s e) - r(x - s e)) / (2 s) e]``, and the loss ``-sg(g) . x`` climbs it.

Rewards are plug-ins with one interface, ``reward(images, conditions) -> scores`` (:mod:`..rewards`).
"""

from __future__ import annotations


import torch

from ..rewards import checked_scores, load_reward
from .dmd2 import DMD2


def antithetic_gradient(reward, x: torch.Tensor, e: torch.Tensor, s: float) -> torch.Tensor:
    """Per-sample estimate of the gradient of the smoothed reward ``E_e r(x + s e)`` from one antithetic pair:
    ``(r(x + s e) - r(x - s e)) / (2 s) e`` (unbiased for it; for a quadratic ``r``, unbiased for ``grad r(x)``)."""
    gain = (reward(x + s * e) - reward(x - s * e)) / (2 * s)
    return gain.view(-1, *([1] * (x.ndim - 1))) * e


class RewardTuning(DMD2):
    name = "reward"

    @classmethod
    def start_from(cls, teacher, student, config):
        """The ``--student`` folder's weights into ``student`` and its scheduler (its steps, gamma and times)."""
        from diffusers import DiffusionPipeline

        from onestep_pipelines.schedulers import ConsistencyScheduler  # (importing the package registers its pipelines)

        folder = config.student
        try:
            pipe = DiffusionPipeline.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ValueError(f"--student {folder} could not be loaded as a pipeline: {error}") from None
        metadata = getattr(pipe, "student", None)
        if metadata is None:
            raise ValueError(f"--student {folder} holds no student metadata: pass a student folder written by onestep-train (OUTPUT_DIR/student).")
        if metadata.architecture != teacher.architecture:
            raise ValueError(f"--student {folder} is a {metadata.architecture} student; the teacher is {teacher.architecture}.")
        if not isinstance(pipe.scheduler, ConsistencyScheduler) or metadata.r_conditioning:
            raise ValueError(f"--student {folder} samples with {type(pipe.scheduler).__name__} ({metadata.method}); reward post-training takes "
                             f"students sampled with ConsistencyScheduler (dmd2, sid, consistency, scm, reflow).")
        if metadata.num_inference_steps != config.num_steps:
            raise ValueError(f"--student {folder} samples in {metadata.num_inference_steps} step(s): pass --num-steps {metadata.num_inference_steps}.")
        weights = getattr(pipe, teacher.denoiser_name).state_dict()
        try:
            student.load_state_dict(weights)
        except RuntimeError as error:
            raise ValueError(f"--student {folder}: its weights do not fit the teacher's model ({str(error).splitlines()[0]}).") from None
        return pipe.scheduler

    def __init__(self, teacher, student, scheduler, config, **run):
        super().__init__(teacher, student, scheduler, config, **run)
        self.reward = load_reward(config.reward, device=next(teacher.model.parameters()).device)

    # the distribution regulariser is DMD2's fake score; --regularizer none builds none
    def build_fake_score(self) -> None:
        if self.config.regularizer == "dmd":
            return super().build_fake_score()
        self.fake, self.head, self._fake_names, self.fake_optimizer = None, None, [], None

    def trained_networks(self) -> dict:
        return super().trained_networks() if self.fake is not None else {}

    def build_optimizers(self) -> dict:
        return super().build_optimizers() if self.fake is not None else {}

    def checkpoint_modules(self) -> dict:
        return super().checkpoint_modules() if self.fake is not None else {}

    def checkpoint_optimizers(self) -> dict:
        return super().checkpoint_optimizers() if self.fake is not None else {}

    def scores(self, x: torch.Tensor, conditions: dict) -> torch.Tensor:
        """The reward of the student samples ``x`` (latents are decoded), checked: one finite score per sample."""
        images = self.teacher.decode(x)
        scores = checked_scores(self.reward(images, self.teacher.reward_conditions(conditions)), images, self.config.reward)
        self.guard.watch(scores.detach(), f"reward of --reward {self.config.reward}", self.update_index)
        return scores

    def reward_loss(self, x, conditions, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, scores)``: ``-mean r`` through the reward's gradient, or the antithetic policy-gradient surrogate
        when the reward has none (or says ``differentiable = False``)."""
        scores = self.scores(x, conditions)
        if scores.requires_grad and getattr(self.reward, "differentiable", True):
            return -scores.mean(), scores
        with torch.no_grad():
            grad = antithetic_gradient(lambda y: self.scores(y, conditions), x.detach(), rng.normal_like(x), self.config.reward_noise)
        return -(grad * x).flatten(1).sum(dim=1).mean(), scores.detach()

    def train_step(self, batch, rng) -> dict:
        if self.fake is not None:
            return super().train_step(batch, rng)
        x = self._generate(batch["conditions"], rng)
        loss, losses = self.generator_losses(x, None, None, batch["conditions"], rng)
        self.update(loss, self.optimizer, "generator")
        return {k: v.detach() for k, v in losses.items()}

    def generator_losses(self, x, x_t, t, conditions, rng):
        total, losses = super().generator_losses(x, x_t, t, conditions, rng) if self.fake is not None else (0.0, {})
        loss, scores = self.reward_loss(x, conditions, rng)  # (the surrogate's perturbations: the update's draws)
        return total + self.config.reward_weight * loss, losses | {"reward": scores.mean().detach()}
