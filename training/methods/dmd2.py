"""DMD2: distribution matching distillation (Yin et al. 2024, "Improved Distribution Matching Distillation for
Fast Image Synthesis"), with f-divergence weighting (Xu et al. 2025, "One-step Diffusion Models with
f-Divergence Distribution Matching"); ``--diff-instruct``: Diff-Instruct (Luo et al. 2023, "Diff-Instruct: A Universal
Approach for Transferring Knowledge From Pre-trained Diffusion Models").

Generator (student) sample ``x`` (one step from noise, or step ``k`` of its own roll-out: backward
simulation), noised to ``x_t``. The frozen teacher gives ``x0_real`` (with CFG), a trainable copy trained on
student samples gives ``x0_fake``. The DMD gradient of the reverse KL is ``g = (x0_fake - x0_real) / mean|x -
x0_real|`` (DMD eq. 7 with its normalisation) and the generator loss is ``0.5 ||x - sg(x - h(r) g)||^2``.
Without the normalisation, ``g = x0_fake - x0_real`` is Diff-Instruct's gradient of the integral KL divergence
``int w(t) KL(p_student,t || p_teacher,t) dt`` (``s_fake - s_real = alpha_t (x0_fake - x0_real) / sigma_t^2``, with
``w(t) = sigma_t^2 / alpha_t``): DMD is Diff-Instruct with a per-sample normalisation. The
f-divergence weight ``h`` of the density ratio ``r = exp(D(x_t))`` from the discriminator is 1 (reverse KL,
plain DMD), ``r`` (forward KL) or ``r / (1 + r)`` (Jensen-Shannon), normalised to mean 1 over the batch.
The fake score is updated ``fake_updates`` times per generator step (two time-scale update rule). The optional
GAN head sits on the fake score's last block (DMD2 sec. 4.3): non-saturating loss, real data against student
samples, both noised to the same ``t`` (the fake score's; ``--gan-max-time`` draws the head's own, low-noise times:
on the digits a linear probe of its features tells a 1-step student from real digits 84 % of the time at 2 % noise and
at chance from 20 %).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, add_lora, tied_copy, ties_bases



class FeatureHead(nn.Module):
    """Discriminator head on the features of one block of the fake score (mean over tokens / pixels)."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=1) if features.ndim == 3 else features.mean(dim=(2, 3))
        return self.net(pooled.float()).squeeze(-1)


def feature_block(model) -> tuple[nn.Module, int]:
    """The block whose output feeds the discriminator head, and its width (the deepest features of the model)."""
    cfg = model.config
    if hasattr(model, "blocks"):  # digits DiT
        return model.blocks[-1], cfg.hidden_size
    if hasattr(model, "mid_block"):  # UNet
        return model.mid_block, cfg.block_out_channels[-1]
    return model.transformer_blocks[-1], cfg.num_attention_heads * cfg.attention_head_dim  # SD3 / Flux


def f_divergence_weights(logits: torch.Tensor, divergence: str, clip: float = 10.0) -> torch.Tensor:
    """``h(r)`` with ``r = exp(logit)``, clipped to ``[1/clip, clip]`` and normalised to mean 1 (f-distill)."""
    if divergence == "reverse-kl":
        return torch.ones_like(logits)
    r = logits.detach().float().clamp(-20, 20).exp()
    h = r if divergence == "forward-kl" else r / (1 + r)
    h = h.clamp(1 / clip, clip) if divergence == "forward-kl" else h
    return h / h.mean().clamp_min(1e-8)


class DMD2(Method):
    name = "dmd2"
    fake_in_generator_graph = False  # the generator loss differentiates through the fake score's input (SiD)

    def __init__(self, teacher, student, scheduler, config, **run):
        super().__init__(teacher, student, scheduler, config, **run)
        self.build_fake_score()

    def build_fake_score(self) -> None:
        """The fake score (a trainable float32 copy of the teacher, or a LoRA on it) and the optional GAN head; their
        optimizer is made by :meth:`build_optimizers`. Also used by other methods' score regularisers (sCM's rCM)."""
        config, teacher = self.config, self.teacher
        # a LoRA fake score shares the teacher's frozen base (one copy of the weights); a full one is its own float32 copy
        self.fake = tied_copy(teacher.model, tie=bool(config.fake_lora_rank) and ties_bases(self.accelerator)).train()
        if config.fake_lora_rank:  # a LoRA on the frozen teacher (kept in the training precision)
            self.fake.requires_grad_(False)
            add_lora(self.fake, config.fake_lora_rank, 0.0, config.lora_targets, teacher.architecture)
        else:  # a full copy, trained in float32
            self.fake.float().requires_grad_(True)
        if hasattr(self.fake, "r_embed"):
            self.fake.r_embed.requires_grad_(False)
        if config.gradient_checkpointing and self.fake._supports_gradient_checkpointing:
            self.fake.enable_gradient_checkpointing()
        for p in self.fake.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self._fake_names = [n for n, p in self.fake.named_parameters() if p.requires_grad]
        self.head = None
        if config.gan_weight > 0:
            block, width = feature_block(self.fake)
            self.head = FeatureHead(width)
            block.register_forward_hook(lambda m, i, o: setattr(self, "_features", o[-1] if isinstance(o, tuple) else o))
        self.fake_optimizer = None  # built by build_optimizers, over the parameters as the trainer placed them

    def _discriminator_params(self) -> list[torch.nn.Parameter]:
        """The fake score's trained parameters and the head's, as they are now (after DDP / FSDP placement)."""
        fake = self.accelerator.unwrap_model(self.fake) if self.accelerator else self.fake
        names = set(self._fake_names)
        params = [p for n, p in fake.named_parameters() if n in names]
        return params + (list(self.head.parameters()) if self.head is not None else [])

    def trained_networks(self) -> dict:
        return {"fake": self.fake} | ({"head": self.head} if self.head is not None else {})

    def build_optimizers(self) -> dict:
        self.fake_optimizer = torch.optim.AdamW(self._discriminator_params(), lr=self.config.fake_learning_rate, betas=(0.0, 0.99), weight_decay=0.0)
        return {"fake_optimizer": self.fake_optimizer}

    def checkpoint_modules(self) -> dict:
        return {"fake": (self.fake, self._fake_names)} | ({"head": (self.head, None)} if self.head is not None else {})

    def checkpoint_optimizers(self) -> dict:
        return {"fake_optimizer": (self.fake_optimizer, {"fake": self.fake} | ({"head": self.head} if self.head is not None else {}))}

    def _noised(self, x, rng):
        t = self.teacher.sample_times(rng.uniform())
        noise = rng.normal_like(x)
        return self.teacher.add_noise(x, t, noise), t, noise

    def _generate(self, conditions, rng):
        """A student sample: the x0 prediction at step k of its roll-out (k random for multi-step students:
        backward simulation), with gradients; k is kept in ``self.segment``."""
        noise = rng.normal(*self.teacher.sample_shape)
        self.segment = k = rng.host_integer(0, len(self.times))
        x_k = self.rollout(noise, conditions, k, rng)
        return self.predict_student(x_k, self.time_at(k, len(noise), noise.device), conditions)[0]

    def fake_loss_weight(self, t):
        """Per-sample weight of the fake score's x0 error: its usual denoising loss (velocity / epsilon error)."""
        return self.teacher.output_error_weight(t)

    def fake_target(self, x, x_t, t, noise):
        """The fake score's x0 regression target for the student sample ``x`` noised to ``x_t`` and its per-sample
        weight: ``x`` itself, weighted by :meth:`fake_loss_weight`."""
        return x, self.fake_loss_weight(t)

    def generator_loss(self, x, grad, weights):
        """``0.5 ||x - sg(x - h g)||^2`` per sample, averaged (DMD eq. 7 with the f-divergence weight h)."""
        return 0.5 * (weights.view(-1, 1, 1, 1) * (x - (x - grad).detach()) ** 2).sum(dim=(1, 2, 3)).mean()

    def _fake_update(self, conditions, batch, rng) -> dict:
        with torch.no_grad():
            x = self._generate(conditions, rng)
        x_t, t, noise = self._noised(x, rng)
        n = len(x_t)
        if self.head is None:
            x0_fake = self.fake_prediction(x_t, t, conditions)
        else:  # one forward of the fake score (FSDP2 shards expect one per backward): the fake loss's inputs when the
            # head's differ (--gan-max-time), then student samples and real images noised to the head's times
            gan_x, gan_t = self._gan_noised(x, x_t, t, rng)
            real = batch["images"]
            real_t = self.teacher.add_noise(real, gan_t[: len(real)], rng.normal_like(real))
            own = 0 if gan_x is x_t else n
            both = {k: torch.cat([v[:own], v, batch["conditions"][k][: len(real)]]) for k, v in conditions.items()}
            x0_fake = self.fake_prediction(torch.cat([x_t[:own], gan_x, real_t]), torch.cat([t[:own], gan_t, gan_t[: len(real)]]), both)[:n]
            logits = self.head(self._features)[own : own + n + len(real)]  # (the conditional half under guidance)
            fake_logits, real_logits = logits[:n], logits[n:]
        target, weight = self.fake_target(x, x_t, t, noise)
        losses = {"fake": (((x0_fake - target) * weight) ** 2).mean()}  # denoising loss on student samples
        if self.head is not None:
            losses["discriminator"] = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        self.update(losses["fake"] + self.config.gan_weight * losses.get("discriminator", 0.0), self.fake_optimizer, "fake-score")
        return {k: v.detach() for k, v in losses.items()}

    def _gan_noised(self, x, x_t, t, rng):
        """The student samples the GAN head sees and their times: ``(x_t, t)``, the fake score's own, or with
        ``--gan-max-time`` ``x`` noised afresh to times in ``[0.02, gan_max_time]`` of the noise range, where real and
        generated samples still differ (at high noise they are alike, and a head shown them stays near chance)."""
        if not self.config.gan_max_time:
            return x_t, t
        gan_t = self.teacher.sample_times(rng.uniform(), high=self.config.gan_max_time)
        return self.teacher.add_noise(x, gan_t, rng.normal_like(x)), gan_t

    def fake_prediction(self, x_t, t, conditions):
        """The fake score's x0 at ``(x_t, t)`` (plain; SiD's LSG option guides it)."""
        return self.teacher.predict(self.fake, x_t, t, conditions)[0]

    def generator_losses(self, x, x_t, t, conditions, rng) -> tuple[torch.Tensor, dict]:
        """The DMD loss (and the GAN head's, weighted by ``--gan-weight``) of the student sample ``x`` noised to
        ``x_t``; ``(total, {name: loss})``. ``rng``: the update's draws, for subclasses whose loss draws more."""
        with torch.no_grad():
            x0_real, _ = self.teacher.predict(self.teacher.model, x_t, t, conditions, guidance_scale=self.config.guidance_scale)
        if self.head is None:
            with torch.no_grad():
                x0_fake = self.fake_prediction(x_t, t, conditions)
            weights, losses = torch.ones(len(x), device=x.device), {}
        else:  # the GAN loss goes through the fake score and the head (one forward gives both)
            x0_fake, weights, losses = self.adversarial(x, x_t, t, conditions, rng)
            x0_fake = x0_fake.detach()
        grad = x0_fake - x0_real  # Diff-Instruct's integral-KL gradient; DMD divides it by mean|x - x0_real|
        if not self.config.diff_instruct:
            grad = grad / (x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
        losses = {"generator": self.generator_loss(x, grad, weights)} | losses
        return losses["generator"] + self.config.gan_weight * losses.get("gan", 0.0), losses

    def adversarial(self, x, x_t, t, conditions, rng):
        """The fake score's x0 at ``x_t`` (in the graph) and the head's non-saturating generator loss on its features
        (of ``x`` noised to the head's own times with ``--gan-max-time``, batched after ``x_t``):
        ``(x0_fake, f-divergence weights, {"gan": loss})``."""
        gan_x, gan_t = self._gan_noised(x, x_t, t, rng)
        n = len(x_t)
        own = 0 if gan_x is x_t else n  # one forward: x_t, then the head's inputs when they differ (as in _fake_update)
        both = {k: torch.cat([v, v[:own]]) for k, v in conditions.items()}
        x0_fake = self.fake_prediction(torch.cat([x_t, gan_x[:own]]), torch.cat([t, gan_t[:own]]), both)[:n]
        logits = self.head(self._features)[own : own + n]  # (the conditional half under guidance)
        self._logits = logits.detach()  # log density ratio (Uni-Instruct's r)
        # (0 x the output keeps the whole forward in the graph: DDP and FSDP2 expect every parameter to be reached)
        gan = F.softplus(-logits).mean() + 0.0 * x0_fake.float().sum()
        return x0_fake, f_divergence_weights(logits, self.config.divergence), {"gan": gan}

    def train_step(self, batch, rng) -> dict:
        conditions = batch["conditions"]
        logs = {}
        self.fake.train()
        for _ in range(self.config.fake_updates):
            logs = self._fake_update(conditions, batch, rng)
        x = self._generate(conditions, rng)
        x_t, t, _ = self._noised(x, rng)
        stashed = []
        if self.head is not None or self.fake_in_generator_graph:  # the generator's loss reaches the fake score's (and
            stashed = [(p, p.grad) for p in self._discriminator_params()]  # the head's) parameters: their own gradients
            for p, _ in stashed:  # are set aside and put back after it (freezing them instead would leave shards FSDP2
                p.grad = None  # frees out of the graph)
        total, losses = self.generator_losses(x, x_t, t, conditions, rng)
        self.update(total, self.optimizer, "generator")
        for p, g in stashed:
            p.grad = g
        return {k: v.detach() for k, v in losses.items()} | logs
