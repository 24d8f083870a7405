"""Train the shipped text-to-image digits teachers: real diffusers classes, learned on half A (seeded, CPU).

    python -m onestep_pipelines.benchmark.train_text_digits vae --out VAE_DIR
    python -m onestep_pipelines.benchmark.train_text_digits sd --vae VAE_DIR --out onestep_pipelines/assets/text_digits/sd

``vae`` trains a tiny :class:`~diffusers.AutoencoderKL` (32x32 RGB to 8x8x4 latents) on the captioned digits of half A
and sets its ``scaling_factor`` to one over the latents' standard deviation (what Stable Diffusion's 0.18215 is for
its VAE). ``sd`` trains a :class:`~diffusers.UNet2DConditionModel` with epsilon prediction on Stable Diffusion 1.x's
scaled-linear VP schedule (Ho et al. 2020; Rombach et al. 2022), 10 % of the captions replaced by the empty prompt
(classifier-free guidance, Ho & Salimans 2022) and an EMA of its weights, and saves a
:class:`~diffusers.StableDiffusionPipeline` with that VAE and a tiny CLIP text encoder kept frozen at its random
initialisation (its embeddings of the 40 captions are distinct; the UNet learns to read them). Only half A is seen:
half B stays the untouched reference of FD-digits.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

from .text_digits import DEFAULT_SIZE, text_halves
from .train_digits import _save_atomically

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=DEFAULT_SIZE, layers_per_block=1, norm_num_groups=16,
    block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
UNET_CONFIG = dict(
    sample_size=DEFAULT_SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
SD3_CONFIG = dict(
    sample_size=DEFAULT_SIZE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16, num_attention_heads=4,
    joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=16,
)
SD3_SHIFT = 3.0
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
CFG_DROPOUT = 0.1
ENCODER_SEED = 0  # the frozen text encoders' initialisation, whatever --seed (which draws the batches)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float = 0.999) -> None:
    decay = min(max_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def _log(step: int, steps: int, running: float, every: int, start: float, what: str = "loss") -> None:
    n = every if step % every == 0 else step % every
    print(f"step {step:5d}/{steps}  {what} {running / n:.5f}  {time.time() - start:7.1f} s", flush=True)


def train_vae(out: str, steps: int = 600, batch_size: int = 64, lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0, log_every: int = 100) -> None:
    """A tiny AutoencoderKL on half A (MSE + ``kl_weight`` KL), ``scaling_factor`` set from its latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    (images, _, _), (held_out, _, _) = text_halves(DEFAULT_SIZE)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    print(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, {steps} steps of {batch_size}")
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample(generator=g)).sample, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 50) * (0.1 + 0.9 * (1 - step / steps))
        opt.step()
        running += loss.item()
        if step % log_every == 0 or step == steps:
            _log(step, steps, running, log_every, start)
            running = 0.0
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(part).latent_dist.mean for part in images.split(256)])
        error = torch.cat([(vae.decode(vae.encode(part).latent_dist.mean).sample - part).abs().mean((1, 2, 3)) for part in held_out.split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    print(f"latent std {latents.std():.4f} -> scaling_factor {vae.config.scaling_factor:.4f}; held-out (half B) reconstruction L1 {error.mean():.4f}")
    _save_atomically(lambda d: vae.save_pretrained(d, safe_serialization=True), out)
    print(f"saved the VAE to {out} after {time.time() - start:.0f} s")


def frozen_text_encoder(seed: int = 0, projection: bool = False):
    """The tiny CLIP text encoder (``projection``: with its text projection, as SDXL's and SD3's) and its offline
    character-level tokenizer, at a seeded random initialisation."""
    from ..testing.tiny_pipelines import _clip_text_model, clip_tokenizer

    torch.manual_seed(seed)
    return _clip_text_model(with_projection=projection).eval().requires_grad_(False), clip_tokenizer()


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as scaled latents (the posterior means), as the pipelines' inverse of their decoding."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        return torch.cat([(vae.encode(part).latent_dist.mean - shift) * vae.config.scaling_factor for part in images.split(256)])


def _fit(model, loss_fn, steps: int, lr: float, log_every: int, seed_generator: torch.Generator):
    """AdamW with a 200-update warm-up and gradient clipping at 1; returns the EMA copy (decay up to 0.999)."""
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        loss = loss_fn(seed_generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 200)
        opt.step()
        _ema_update(ema, model, step)
        running += loss.item()
        if step % log_every == 0 or step == steps:
            _log(step, steps, running, log_every, start)
            running = 0.0
    return ema, time.time() - start


def _captioned_latents(vae):
    """Half A's latents, the sorted distinct captions and each image's caption index."""
    (images, _, captions), _ = text_halves(DEFAULT_SIZE)
    prompts = sorted(set(captions))
    return encode_latents(vae, images), prompts, torch.tensor([prompts.index(c) for c in captions])


def _dropped(index: torch.Tensor, null: int, g: torch.Generator) -> torch.Tensor:
    """Caption indices with ``CFG_DROPOUT`` of them replaced by ``null`` (the empty prompt)."""
    index = index.clone()
    index[torch.rand(len(index), generator=g) < CFG_DROPOUT] = null
    return index


def train_sd(out: str, vae_dir: str, steps: int = 3600, batch_size: int = 64, lr: float = 4e-4, seed: int = 0, log_every: int = 200,
             init: str | None = None) -> None:
    """The SD-class teacher (see the module docstring)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from .._image_processors import use_pil_image_processors

    use_pil_image_processors()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    text_encoder, tokenizer = frozen_text_encoder(ENCODER_SEED)
    unet = UNet2DConditionModel(**UNET_CONFIG) if init is None else UNet2DConditionModel.from_pretrained(init, subfolder="unet")
    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    latents, prompts, prompt_index = _captioned_latents(vae)
    with torch.no_grad():
        embeddings, _ = pipe.encode_prompt([*prompts, ""], torch.device("cpu"), 1, False)
    noise_schedule = DDPMScheduler(**SD_SCHEDULE)
    print(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, {steps} steps of {batch_size}, {len(prompts)} captions")

    def loss_fn(g):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        noise = torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, SD_SCHEDULE["num_train_timesteps"], (batch_size,), generator=g)
        x_t = noise_schedule.add_noise(latents[idx], noise, t)
        return F.mse_loss(unet(x_t, t, encoder_hidden_states=embeddings[_dropped(prompt_index[idx], len(prompts), g)]).sample, noise)

    ema, seconds = _fit(unet, loss_fn, steps, lr, log_every, g)
    pipe.register_modules(unet=ema)
    _save_atomically(lambda d: pipe.save_pretrained(d, safe_serialization=True), out)
    print(f"saved the SD teacher (EMA UNet) to {out} after {seconds:.0f} s of training")


def train_sd3(out: str, vae_dir: str, steps: int = 2400, batch_size: int = 32, lr: float = 4e-4, seed: int = 0, log_every: int = 200,
              init: str | None = None) -> None:
    """The flow teacher: a :class:`~diffusers.StableDiffusion3Pipeline`, rectified-flow velocity prediction with
    logit-normal times shifted by ``SD3_SHIFT`` (Esser et al. 2024, as diffusers' SD3 training scripts draw them), its
    three text encoders tiny and frozen at random (two CLIP, one T5: 77 + 256 text tokens, the pipeline's defaults),
    the same VAE with its latents' mean as ``shift_factor``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from .._image_processors import use_pil_image_processors
    from ..testing.tiny_pipelines import _t5_encoder, t5_tokenizer

    use_pil_image_processors()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    raw = encode_latents(vae, text_halves(DEFAULT_SIZE)[0][0]) / vae.config.scaling_factor
    vae.register_to_config(shift_factor=float(raw.mean()), scaling_factor=float(1.0 / raw.std()))
    (clip_1, tokenizer), (clip_2, _) = frozen_text_encoder(ENCODER_SEED, projection=True), frozen_text_encoder(ENCODER_SEED + 1, projection=True)
    torch.manual_seed(ENCODER_SEED + 2)
    t5 = _t5_encoder(d_model=SD3_CONFIG["joint_attention_dim"]).eval().requires_grad_(False)
    transformer = SD3Transformer2DModel(**SD3_CONFIG) if init is None else SD3Transformer2DModel.from_pretrained(init, subfolder="transformer")
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT), vae=vae,
                                    text_encoder=clip_1, tokenizer=tokenizer, text_encoder_2=clip_2, tokenizer_2=tokenizer,
                                    text_encoder_3=t5, tokenizer_3=t5_tokenizer())
    latents, prompts, prompt_index = _captioned_latents(vae)
    with torch.no_grad():
        texts = [*prompts, ""]
        embeddings, _, pooled, _ = pipe.encode_prompt(texts, texts, texts, device=torch.device("cpu"), do_classifier_free_guidance=False)
    print(f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f} M parameters, {steps} steps of {batch_size}, "
          f"{embeddings.shape[1]} text tokens, shift {SD3_SHIFT:g}")

    def loss_fn(g):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        cond = _dropped(prompt_index[idx], len(prompts), g)
        noise = torch.randn(latents[idx].shape, generator=g)
        u = torch.sigmoid(torch.randn(batch_size, generator=g))
        sigma = (SD3_SHIFT * u / (1 + (SD3_SHIFT - 1) * u)).view(-1, 1, 1, 1)
        x_t = (1 - sigma) * latents[idx] + sigma * noise
        out = transformer(hidden_states=x_t, timestep=sigma.flatten() * 1000, encoder_hidden_states=embeddings[cond], pooled_projections=pooled[cond]).sample
        return F.mse_loss(out, noise - latents[idx])

    ema, seconds = _fit(transformer, loss_fn, steps, lr, log_every, g)
    pipe.register_modules(transformer=ema)
    _save_atomically(lambda d: pipe.save_pretrained(d, safe_serialization=True), out)
    print(f"saved the SD3 teacher (EMA transformer) to {out} after {seconds:.0f} s of training")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["vae", "sd", "sd3"])
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--vae", help="the trained VAE folder (sd, sd3)")
    parser.add_argument("--steps", type=int, help="training steps (default: vae 600, sd 3600, sd3 2400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: one per core)")
    parser.add_argument("--init", help="sd, sd3: continue from the denoiser of this saved teacher (a second stage with --steps more updates)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    steps = {} if args.steps is None else {"steps": args.steps}
    if args.what == "vae":
        train_vae(args.out, seed=args.seed, **steps)
    elif not args.vae:
        parser.error(f"{args.what} needs --vae VAE_DIR (train one with: vae --out VAE_DIR).")
    else:
        (train_sd if args.what == "sd" else train_sd3)(args.out, args.vae, seed=args.seed, init=args.init, **steps)


if __name__ == "__main__":
    main()
