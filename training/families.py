"""The 2026 families in the trainer's conventions: Qwen-Image, FLUX.2 ([dev] and [klein]) and Z-Image (and the latents
of every text-to-image family: :func:`to_latents`, :func:`to_pixels`).

The trainer works on latents ``x`` of shape ``(B, C, h, w)`` at flow time ``sigma`` (``x = (1 - sigma) x0 + sigma
noise``) and wants the model's velocity ``noise - x0``. Each family's diffusers pipeline (0.42) holds its latents and
calls its transformer its own way; these functions do what the pipeline does, in one place:

==========  ===================================  ==========================  ===============  =======================
family      latents ``x``                         model input                 model time       model output
==========  ===================================  ==========================  ===============  =======================
qwen_image  VAE latents, (z - mean) / std         2x2 patches as tokens       ``sigma``        ``noise - x0``
flux2       2x2-patchified VAE latents,           one token per position,     ``sigma``        ``noise - x0``
            batch-norm statistics removed         4-axis position ids
z_image     ``(z - shift) * scale``               a list of ``(C, 1, h, w)``  ``1 - sigma``    ``x0 - noise``
==========  ===================================  ==========================  ===============  =======================

Prompts are encoded once with the pipeline's own ``encode_prompt`` into tensors indexed by prompt (Z-Image's
variable-length embeddings are padded and carry their lengths).
"""

from __future__ import annotations

import torch

FAMILIES = ("qwen_image", "flux2", "z_image")
FLUX2_GUIDANCE = 4.0  # FLUX.2 [dev]'s distilled-guidance embedding: Flux2Pipeline's default guidance_scale


def latent_channels(pipe, architecture: str) -> int:
    """Channels of ``x``: Qwen-Image packs 2x2 patches of its latents into tokens (``in_channels = 4 C``); FLUX.2's
    and Z-Image's ``x`` has the transformer's input channels."""
    channels = pipe.transformer.config.in_channels
    return channels // 4 if architecture == "qwen_image" else channels


def latent_size(pipe, architecture: str, resolution: int) -> int:
    """Side of ``x`` for ``resolution`` pixels (FLUX.2's ``x`` is patchified: half the VAE's latent size)."""
    size = resolution // pipe.vae_scale_factor
    return size // 2 if architecture == "flux2" else size


def encode(pipe, architecture: str, prompts: list[str]) -> dict:
    """Prompt embeddings of ``prompts``, one row per prompt."""
    device = pipe._execution_device
    if architecture == "qwen_image":
        embeds, mask = pipe.encode_prompt(prompts, device=device)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device) if mask is None else mask
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
    if architecture == "flux2":
        embeds, text_ids = pipe.encode_prompt(prompts, device=device)
        return {"prompt_embeds": embeds, "text_ids": text_ids}
    embeds, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
    lengths = torch.tensor([len(e) for e in embeds], device=device)
    return {"prompt_embeds": torch.nn.utils.rnn.pad_sequence(list(embeds), batch_first=True), "prompt_lengths": lengths}


def call(pipe, architecture: str, model, x: torch.Tensor, sigma: torch.Tensor, emb: dict, r: torch.Tensor | None = None) -> torch.Tensor:
    """The velocity ``noise - x0`` of ``model`` (this family's transformer, or a copy) at ``(x, sigma)``, called as the
    family's pipeline calls it; ``r`` (flow time) goes to an r-conditioned model in the units of its ``timestep``."""
    dtype = next(model.parameters()).dtype
    b, c, h, w = x.shape
    extra = {} if r is None else {"r_timestep": r.float()}
    if architecture == "qwen_image":
        packed = pipe._pack_latents(x.to(dtype), b, c, h, w)
        out = model(hidden_states=packed, timestep=sigma.float(), encoder_hidden_states=emb["prompt_embeds"],
                    encoder_hidden_states_mask=emb["prompt_embeds_mask"], img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False, **extra)[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, h * scale, w * scale, scale)[:, :, 0]
    if architecture == "flux2":
        guidance = torch.full((b,), FLUX2_GUIDANCE, device=x.device) if model.config.guidance_embeds else None
        out = model(hidden_states=pipe._pack_latents(x.to(dtype)), timestep=sigma.float(), guidance=guidance, encoder_hidden_states=emb["prompt_embeds"],
                    txt_ids=emb["text_ids"], img_ids=pipe._prepare_latent_ids(x).to(x.device), return_dict=False, **extra)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)
    if r is not None:
        raise ValueError("Z-Image's transformer takes no second time r (flow-map / MeanFlow students are not available for it).")
    captions = [e[:n] for e, n in zip(emb["prompt_embeds"], emb["prompt_lengths"].tolist())]
    out = model(list(x.to(dtype).unsqueeze(2)), 1 - sigma.float(), captions, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def to_latents(pipe, architecture: str, pixels: torch.Tensor) -> torch.Tensor:
    """``x`` of images ``pixels`` in ``[-1, 1]`` (the VAE's mean latent), as the family's pipeline holds latents."""
    vae = pipe.vae
    if architecture == "flux2":
        return pipe._encode_vae_image(pixels, generator=None)
    if architecture == "qwen_image":
        latent = vae.encode(pixels[:, :, None]).latent_dist.mean[:, :, 0]
        mean, std = _qwen_statistics(vae, latent)
        return (latent - mean) / std
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD, SDXL, SD3, Flux, Z-Image: the VAE's own scale and shift
    return (vae.encode(pixels).latent_dist.mean - shift) * vae.config.scaling_factor


def to_pixels(pipe, architecture: str, x: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` of ``x`` (differentiable): the inverse of :func:`to_latents` and the VAE's decoder."""
    vae = pipe.vae
    x = x.to(vae.dtype)
    if architecture == "flux2":
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x)
        return vae.decode(pipe._unpatchify_latents(x * std + mean)).sample.float()
    if architecture == "qwen_image":
        mean, std = _qwen_statistics(vae, x)
        return vae.decode((x * std + mean)[:, :, None]).sample[:, :, 0].float()
    return vae.decode(x / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)).sample.float()


def _qwen_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, std)`` of the Qwen-Image VAE's latents (its config), shaped to broadcast over ``like``."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(like)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(like)
    return mean, std
