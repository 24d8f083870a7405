"""Teachers: a frozen pipeline seen through the sampling core's time and prediction conventions.

A :class:`Teacher` turns ``(model, x_t, t, conditions)`` into ``(x0_hat, eps_hat)`` for any denoiser of the
teacher's architecture (the teacher itself, a fake score, the student), so that every method writes its loss
in one convention: native time ``t`` (flow ``sigma`` in (0, 1], or a VP timestep with -1 = clean) and
``x_t = alpha_t x0 + sigma_t eps``. The conventions come from a :class:`ConsistencyScheduler` built from the
teacher's own scheduler config, the scheduler the student will sample with: training and sampling share them.

Conditions are small index tensors (``class_labels`` for the digits teacher, ``prompt_index`` into prompt
embeddings computed once for text-to-image teachers), so batches stay cheap and checkpoints stay small.
"""

from __future__ import annotations

import contextlib
import os

import torch
from diffusers import DiffusionPipeline

from onestep_pipelines.benchmark import TEXT_TEACHERS, teacher_folder
from onestep_pipelines.benchmark.evaluate import load_digits_teacher
from onestep_pipelines.pipelines import architecture_of
from onestep_pipelines.sampling import calculate_shift, to_x0_eps
from onestep_pipelines.schedulers import ConsistencyScheduler

from . import families


class Teacher:
    """A frozen teacher pipeline (digits, SD, SDXL, SD3, Flux, Qwen-Image, FLUX.2 or Z-Image) and the conventions of its
    denoiser.

    Args:
        pipeline: the teacher pipeline; its denoiser is frozen.
        source: path or Hub id it came from (the students' base model is named from it: ``students.base_model_name``).
        resolution: image size of text-to-image samples (latents are ``resolution / vae_scale_factor``); 0: the
            pipeline's own default size (:func:`default_resolution`).
    """

    def __init__(self, pipeline: DiffusionPipeline, source: str, resolution: int = 0):
        self.pipeline, self.source = pipeline, source
        self.architecture = architecture_of(pipeline)
        self.convention = ConsistencyScheduler.from_config(pipeline.scheduler.config)
        self.time_type = self.convention.config.time_type
        self.prediction_type = self.convention.config.prediction_type
        if self.time_type not in ("flow", "vp"):
            raise ValueError(f"time_type={self.time_type!r}: the trainer distils VP and flow teachers.")
        self.num_train_timesteps = self.convention.config.num_train_timesteps
        self.model.eval().requires_grad_(False)
        self.resolution = resolution or (0 if self.architecture == "digits" else default_resolution(pipeline))
        self.embeddings: dict[str, torch.Tensor] = {}
        self.prompts: list[str] = []

    @property
    def benchmark(self) -> str | None:
        """The embedded benchmark this teacher is scored on: ``"digits"``, ``"text-digits"`` (a shipped text-to-image
        digits teacher, by name or folder) or None (any other teacher: no score, sample grids only)."""
        if self.architecture == "digits":
            return "digits"
        folders = {os.path.realpath(f) for f in TEXT_TEACHERS.values()}
        return "text-digits" if os.path.realpath(teacher_folder(self.source)) in folders else None

    @property
    def guidance_embedding(self) -> float | None:
        """The distilled-guidance embedding value the teacher (and so the student) gets: FLUX.1 [dev] 3.5, FLUX.2 [dev]
        4.0 (their pipelines' defaults); None for models without one."""
        if self.architecture not in ("flux", "flux2") or not self.model.config.guidance_embeds:
            return None
        return 3.5 if self.architecture == "flux" else families.FLUX2_GUIDANCE

    @property
    def denoiser_name(self) -> str:
        return "unet" if self.architecture in ("sd", "sdxl") else "transformer"

    @property
    def model(self):
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        cfg = self.model.config
        if self.architecture == "digits":
            return (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if self.architecture in families.FAMILIES:
            size = families.latent_size(self.pipeline, self.architecture, self.resolution)
            return (families.latent_channels(self.pipeline, self.architecture), size, size)
        size = self.resolution // self.pipeline.vae_scale_factor
        channels = cfg.in_channels // 4 if self.architecture == "flux" else cfg.in_channels
        return (channels, size, size)

    # -------------------------------------------------------------------------------- time
    def shift_mu(self, num_steps: int) -> float | None:
        """The resolution-dependent shift ``mu`` the teacher's pipeline computes for ``num_steps`` steps at the training
        resolution (None without dynamic shift): Flux-style ``calculate_shift`` of the image tokens, FLUX.2's empirical
        fit of tokens and steps."""
        cfg = self.convention.config
        if not cfg.use_dynamic_shifting:
            return None
        if self.architecture == "flux2":
            from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

            return compute_empirical_mu(self.sample_shape[1] * self.sample_shape[2], num_steps)
        tokens = (self.sample_shape[1] // 2) * (self.sample_shape[2] // 2)
        return calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` at native times ``t`` (shape ``(B,)``), float32 shaped ``(B, 1, 1, 1)``, computed on
        ``t``'s device (no host round trip)."""
        alpha, sigma = self.convention.coefficients_at(t)
        return alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)

    def native_time(self, fraction: torch.Tensor) -> torch.Tensor:
        """Native time at a fraction of the noise range (0 = clean, 1 = pure noise / the last timestep)."""
        if self.time_type == "flow":
            return fraction.float()
        return (fraction * self.num_train_timesteps).round().long() - 1

    def fraction(self, t) -> float:
        """The inverse of :meth:`native_time`: the fraction of the noise range at native time ``t``."""
        t = float(t)
        return t if self.time_type == "flow" else (t + 1) / self.num_train_timesteps

    def sample_times(self, u: torch.Tensor, low: float = 0.02, high: float = 0.98) -> torch.Tensor:
        """Native times covering the fraction ``[low, high]`` of the noise range, from uniform draws ``u`` in [0, 1)."""
        return self.native_time(low + (high - low) * u)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.coefficients(t)
        return alpha * x0 + sigma * noise

    def output_error_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Factor that turns an x0 error into an error of the model's own output (velocity / v: ``1 / sigma``;
        epsilon: ``alpha / sigma``), to train auxiliary denoisers with their usual loss."""
        alpha, sigma = self.coefficients(t)
        return alpha / sigma if self.prediction_type == "epsilon" else 1 / sigma

    # -------------------------------------------------------------------------------- conditions
    def set_prompts(self, prompts: list[str]) -> None:
        """Encode ``prompts`` (and the empty prompt, for CFG) once; conditions then index them."""
        if self.architecture == "digits":
            raise ValueError("the digits teacher is class-conditional; it takes no prompts.")
        prompts = [p.strip() for p in prompts]
        if not prompts or not all(prompts):
            raise ValueError("the prompt list is empty or has empty lines.")
        self.prompts = prompts
        with torch.no_grad():
            self.embeddings = encode_prompts(self, [*prompts, ""])

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders (``text_encoder``, ``text_encoder_2``, ...)."""
        return [m for name, m in self.pipeline.components.items() if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)]

    @contextlib.contextmanager
    def text_encoders_on(self, device):
        """The text encoders on ``device`` for the duration (previews and validation samples of a run that trains from a
        prompt cache, whose text encoders otherwise stay on the CPU); a no-op where they already are there."""
        moved = [m for m in self.text_encoders if next(m.parameters()).device != torch.device(device)]
        for module in moved:
            module.to(device)
        try:
            yield
        finally:
            for module in moved:
                module.to("cpu")

    def to_device(self, device, text_encoders: bool = True) -> None:
        """The pipeline's models on ``device``; ``text_encoders=False`` leaves the text encoders on the CPU (a run that
        trains from a prompt cache)."""
        kept = set() if text_encoders else set(map(id, self.text_encoders))
        for component in self.pipeline.components.values():
            if isinstance(component, torch.nn.Module) and id(component) not in kept:
                component.to(device)

    def use_cache(self, cache) -> None:
        """Conditions index the rows of a prompt cache (:class:`~onestep_pipelines.training.cache.PromptCache`, read on
        demand) instead of embeddings held in memory; its empty-prompt row is row ``len(prompts)``, as here."""
        cache.check(self)
        self.prompts, self.embeddings = cache.prompts, dict(cache.columns)

    def sample_conditions(self, rng) -> dict:
        """Random conditions for a data-free batch (one per sample, on the training device)."""
        if self.architecture == "digits":
            return {"class_labels": rng.integers(self.model.config.num_classes)}
        if not self.prompts:
            raise ValueError("a text-to-image teacher needs prompts: pass --prompts FILE (one per line) or --data FOLDER.")
        return {"prompt_index": rng.integers(len(self.prompts))}

    def null_conditions(self, conditions: dict) -> dict:
        if self.architecture == "digits":
            return {"class_labels": torch.full_like(conditions["class_labels"], self.model.config.num_classes)}
        return {"prompt_index": torch.full_like(conditions["prompt_index"], len(self.prompts))}

    def reward_conditions(self, conditions: dict) -> dict:
        """Conditions as reward plug-ins take them: ``class_labels`` (digits) or the ``prompts`` as strings."""
        if self.architecture == "digits":
            return {"class_labels": conditions["class_labels"]}
        return {"prompts": [self.prompts[i] for i in conditions["prompt_index"].tolist()]}

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as pixels in ``[-1, 1]``, differentiably: the digits' own pixels, or latents through the VAE."""
        if self.architecture == "digits":
            return x
        return families.to_pixels(self.pipeline, self.architecture, x)

    # -------------------------------------------------------------------------------- predictions
    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, conditions: dict, guidance_scale: float = 1.0,
                prediction_type: str | None = None):
        """``(x0_hat, eps_hat)`` of ``model`` (the teacher or any copy of it) at ``(x_t, t)``; with
        ``guidance_scale != 1`` classifier-free guided (one batched forward). ``prediction_type``: what the model
        outputs when it is not the teacher's (a student switched to v-prediction); None = the teacher's."""
        if guidance_scale != 1.0:
            null = self.null_conditions(conditions)
            both = {k: torch.cat([conditions[k], null[k]]) for k in conditions}
            c, u = self.call(model, torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
            out = u + guidance_scale * (c - u)
        else:
            out = self.call(model, x_t, t, conditions)
        alpha, sigma = self.coefficients(t)
        return to_x0_eps(out.float(), x_t.float(), alpha, sigma, prediction_type or self.prediction_type)

    def call(self, model, x: torch.Tensor, t: torch.Tensor, conditions: dict, r: torch.Tensor | None = None) -> torch.Tensor:
        """One call of a denoiser of this architecture, as its pipeline makes it; with ``r`` (native time, flow
        teachers) the second time goes to an r-conditioned model in the units of its ``timestep``."""
        dtype = next(model.parameters()).dtype
        timestep = t.float() * self.num_train_timesteps if self.time_type == "flow" else t.clamp_min(0)
        extra = {} if r is None else {"r_timestep": r.float() * self.num_train_timesteps}
        if self.architecture == "digits":
            return model(x.to(dtype), timestep, conditions["class_labels"], **extra).sample
        index = conditions["prompt_index"]
        emb = {k: v.to(index.device)[index].to(dtype if v.is_floating_point() else v.dtype) for k, v in self.embeddings.items()}
        if self.architecture in families.FAMILIES:
            return families.call(self.pipeline, self.architecture, model, x, t, emb, r)
        if self.architecture == "sd":
            return model(x.to(dtype), timestep, encoder_hidden_states=emb["prompt_embeds"], **extra).sample
        if self.architecture == "sdxl":
            added = {"text_embeds": emb["pooled_prompt_embeds"], "time_ids": emb["time_ids"]}
            return model(x.to(dtype), timestep, encoder_hidden_states=emb["prompt_embeds"], added_cond_kwargs=added, **extra).sample
        if self.architecture == "sd3":
            return model(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=emb["prompt_embeds"],
                         pooled_projections=emb["pooled_prompt_embeds"], **extra).sample
        b, c, h, w = x.shape  # flux: packed 2x2 patches, sigma as timestep
        packed = self.pipeline._pack_latents(x.to(dtype), b, c, h, w)
        image_ids = self.pipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        guidance = torch.full((b,), self.guidance_embedding, device=x.device) if model.config.guidance_embeds else None
        extra = {k: v / self.num_train_timesteps for k, v in extra.items()}  # Flux takes sigma
        out = model(hidden_states=packed, timestep=timestep / self.num_train_timesteps, guidance=guidance, pooled_projections=emb["pooled_prompt_embeds"],
                    encoder_hidden_states=emb["prompt_embeds"], txt_ids=emb["text_ids"][0], img_ids=image_ids, **extra).sample
        return self.pipeline._unpack_latents(out, h * self.pipeline.vae_scale_factor, w * self.pipeline.vae_scale_factor, self.pipeline.vae_scale_factor)


def encode_prompts(teacher: Teacher, prompts: list[str]) -> dict:
    """Embeddings of ``prompts`` as the teacher's denoiser takes them (one row per prompt)."""
    return _encode(teacher.pipeline, prompts, teacher.resolution)


def _encode(pipe, prompts: list[str], resolution: int) -> dict:
    """Prompt embeddings of a text-to-image pipeline, with its own ``encode_prompt``."""
    device = pipe._execution_device
    arch = architecture_of(pipe)
    if arch in families.FAMILIES:
        return families.encode(pipe, arch, prompts)
    if arch == "sd":
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return {"prompt_embeds": embeds}
    if arch == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        projection = pipe.text_encoder_2.config.projection_dim
        ids = pipe._get_add_time_ids((resolution, resolution), (0, 0), (resolution, resolution), embeds.dtype, projection)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "time_ids": ids.repeat(len(prompts), 1)}
    if arch == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompts, device=device)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids[None].expand(len(prompts), -1, -1)}


def default_resolution(pipe) -> int:
    """The image size a text-to-image pipeline makes when called without ``height``: its denoiser's sample size (SD3:
    ``default_sample_size``; Flux: 128 latent pixels, whatever its transformer) times the VAE's factor."""
    if architecture_of(pipe) == "z_image":
        return 1024  # ZImagePipeline's default height and width
    size = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    return int(size) * pipe.vae_scale_factor


def load_teacher(source: str = "digits", resolution: int = 0, allow_pickle: bool = False, local_files_only: bool = False) -> Teacher:
    """The teacher named by ``source``: ``"digits"`` (the embedded digits teacher), a shipped text-to-image digits
    teacher (``"text-digits-sd"``), or a folder or Hub id of a diffusers pipeline with a UNet (SD 1.5 / SDXL, epsilon
    or v) or a transformer (SD3 / Flux / Qwen-Image / FLUX.2 / Z-Image, flow); ``resolution`` 0: the pipeline's default size; ``local_files_only``:
    a Hub id from the local cache only (the Hub is unreachable)."""
    if source == "digits":
        return Teacher(load_digits_teacher(), "digits")  # the embedded teacher (load_digits_teacher())
    name, source = source, teacher_folder(source)
    if os.path.exists(source) and not os.path.isfile(os.path.join(source, "model_index.json")):
        raise ValueError(f"teacher {source} is not a diffusers pipeline folder (it has no model_index.json).")
    if not os.path.exists(source) and (os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") != 1):
        raise ValueError(f"teacher {source!r} is neither 'digits', a pipeline folder, nor a Hub id 'org/name'.")
    try:
        offline = {"local_files_only": True} if local_files_only else {}  # (else diffusers' default: HF_HUB_OFFLINE)
        pipe = DiffusionPipeline.from_pretrained(source, use_safetensors=None if allow_pickle else True, **offline)
    except (OSError, ValueError) as error:
        raise ValueError(f"teacher {source!r} could not be loaded as a diffusers pipeline: {error}") from None
    try:
        architecture_of(pipe)
    except TypeError as error:
        raise ValueError(f"teacher {source!r}: {error}") from None
    return Teacher(pipe, name, resolution)
