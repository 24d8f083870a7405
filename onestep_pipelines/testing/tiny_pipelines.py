"""Tiny random-weight pipelines of the stock architectures, built fully offline.

Used by the test-suite (and by benchmarks that need shapes, not quality): Stable Diffusion 1.x,
SDXL, SD3, Flux, Qwen-Image, FLUX.2 [dev] and [klein], Z-Image and DiT pipelines with a few thousand
to a few hundred thousand parameters each, tokenizers written from local vocabularies, all models in
eval mode. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import atexit
import shutil
import tempfile
from functools import lru_cache

import torch

from .._image_processors import use_pil_image_processors

ARCHITECTURES = ("sd", "sdxl", "sd3", "flux", "qwen_image", "flux2", "flux2_klein", "z_image", "dit")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


@lru_cache(maxsize=None)
def _clip_vocab_dir() -> str:
    """A CLIP BPE vocabulary of single byte-level characters (514 ids, no merges) in a temp folder."""
    folder = tempfile.mkdtemp(prefix="onestep-clip-vocab-")
    atexit.register(shutil.rmtree, folder, True)
    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return folder


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    folder = _clip_vocab_dir()
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=max_length)


def t5_tokenizer(max_length: int = 32):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in _LETTERS] + [("\u2581" + c, -1.5) for c in _LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_text_model(with_projection: bool = False, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=514,
        projection_dim=32,
        max_position_embeddings=77,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def tiny_clip_folder(folder: str, seed: int = 0) -> str:
    """A tiny random transformers CLIP model (text and vision towers, projection 16) and its offline tokenizer, saved
    in ``folder`` (reward plug-in tests: ``--reward clip:FOLDER``)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


def _t5_encoder(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=56, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int = 4, **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=32,
        **kwargs,
    )


def _tiny_unet(**kwargs):
    """A two-level UNet2DConditionModel on 16x16 latents; ``kwargs`` add the SD or SDXL conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **kwargs,
    )


def _eval(pipe):
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(seed: int = 0):
    """Stable Diffusion 1.x layout: UNet2DConditionModel (epsilon, scaled-linear VP), one CLIP text encoder."""
    use_pil_image_processors()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim=32, attention_head_dim=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=_vae(), text_encoder=_clip_text_model(), tokenizer=clip_tokenizer(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    return _eval(pipe)


def tiny_sdxl_pipeline(seed: int = 0):
    """SDXL layout: text-time conditioned UNet, two CLIP text encoders (the second with projection)."""
    use_pil_image_processors()
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = _tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_clip_text_model(), text_encoder_2=_clip_text_model(with_projection=True),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
        image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True,
    )
    return _eval(pipe)


def tiny_sd3_pipeline(seed: int = 0):
    """SD3 layout: SD3Transformer2DModel (flow velocity, shift 3), two CLIP encoders and a T5 encoder."""
    use_pil_image_processors()
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text_model(with_projection=True), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text_model(with_projection=True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(), tokenizer_3=t5_tokenizer(),
    )
    return _eval(pipe)


def tiny_flux_pipeline(seed: int = 0):
    """Flux layout: FluxTransformer2DModel (packed 2x2 latents, dynamic shift), CLIP and T5 encoders."""
    use_pil_image_processors()
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_vae(latent_channels=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text_model(with_projection=False), tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(), tokenizer_2=t5_tokenizer(),
    )
    return _eval(pipe)


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen3's chat format, as FLUX.2 [klein] (enable_thinking=False) and Z-Image (True) apply it; content may be a string or a
# list of {"type": "text", "text": ...} parts (FLUX.2 [dev]'s Mistral format)
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false -%}<think>\n\n</think>\n\n{%- endif -%}{%- endif -%}"
)
# Qwen/Qwen-Image's scheduler config on the Hub: dynamic exponential shift, stretched to end at sigma 0.02
QWEN_IMAGE_SCHEDULER = dict(use_dynamic_shifting=True, time_shift_type="exponential", base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                            max_image_seq_len=8192, shift_terminal=0.02)


# the words of Qwen-Image's prompt-template prefix that are single tokens in Qwen's real vocabulary: as added tokens here,
# the prefix is 34 tokens long, as QwenImagePipeline's prompt_template_encode_start_idx assumes
QWEN_TEMPLATE_WORDS = ("system", "Describe", " image", " by", " detailing", " the", " color", " shape", " size", " texture", " quantity",
                       " text", " spatial", " relationships", " of", " objects", " and", " background", "user")


def qwen2_tokenizer():
    """A Qwen2 byte-level BPE tokenizer of single bytes (no merges) with the chat special tokens and a Qwen3-style chat
    template, written offline: every text encodes (one id per byte, or per word of Qwen-Image's template prefix)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    vocab.update({token: len(vocab) + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.add_tokens([AddedToken(word, normalized=False) for word in QWEN_TEMPLATE_WORDS])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen_image_pipeline(seed: int = 0):
    """Qwen-Image layout: QwenImageTransformer2DModel (packed 2x2 latents), a Qwen2.5-VL text encoder, the Qwen-Image
    VAE, and the Hub's scheduler config (dynamic exponential shift, ``shift_terminal`` 0.02)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen2_tokenizer()
    torch.manual_seed(seed)
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, "rope_theta": 1e6, "vocab_size": len(tokenizer)}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16}
    last = len(tokenizer) - 1  # no image tokens in text-to-image prompts
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=16, vocab_size=len(tokenizer),
                              vision_start_token_id=last, vision_end_token_id=last, vision_token_id=last)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                              num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=Qwen2_5_VLForConditionalGeneration(config),
                             tokenizer=tokenizer)
    return _eval(pipe)


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(sample_size=32, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                              block_out_channels=(4, 8), layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                              use_post_quant_conv=False)


def _flux2_transformer(guidance_embeds: bool, joint_attention_dim: int):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=joint_attention_dim, axes_dims_rope=[4, 4, 4, 4], guidance_embeds=guidance_embeds)


def _qwen3_config(tokenizer, num_layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2,
                       head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id)


# FLUX.2 [dev] (Mistral) and FLUX.2 [klein] (Qwen3) stack the hidden states of text-encoder layers 10/20/30 and 9/18/27: the tiny
# encoders are that deep (16 wide), so the pipelines' default call arguments work unchanged
FLUX2_TEXT_LAYERS, FLUX2_KLEIN_TEXT_LAYERS = 30, 27
FLUX2_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
Z_IMAGE_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=False)  # Tongyi-MAI/Z-Image-Turbo


def tiny_flux2_pipeline(seed: int = 0):
    """FLUX.2 [dev] layout: Flux2Transformer2DModel (guidance embedding, packed 2x2 latents), a Mistral-3 text encoder
    (here with the byte-level Qwen tokenizer and its chat template: the pipeline only applies a chat template to text),
    the FLUX.2 VAE (batch-norm latent statistics), FLUX.2-dev's scheduler config (its ``mu`` is the pipeline's own)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = qwen2_tokenizer()
    torch.manual_seed(seed)
    text = {"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 16, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 8, "num_hidden_layers": FLUX2_TEXT_LAYERS, "max_position_embeddings": 1024,
            "sliding_window": None, "pad_token_id": tokenizer.pad_token_id}
    vision = {"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
              "image_size": 16, "patch_size": 8}
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=len(tokenizer) - 1, pad_token_id=tokenizer.pad_token_id)
    pipe = Flux2Pipeline(transformer=_flux2_transformer(True, 3 * 16), vae=_flux2_vae(), text_encoder=Mistral3ForConditionalGeneration(config),
                         tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER))
    return _eval(pipe)


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    """FLUX.2 [klein] layout: Flux2Transformer2DModel without guidance embedding (CFG unless ``is_distilled``), a Qwen3
    text encoder, the FLUX.2 VAE and scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    tokenizer = qwen2_tokenizer()
    torch.manual_seed(seed)
    pipe = Flux2KleinPipeline(transformer=_flux2_transformer(False, 3 * 16), vae=_flux2_vae(),
                              text_encoder=Qwen3ForCausalLM(_qwen3_config(tokenizer, FLUX2_KLEIN_TEXT_LAYERS)), tokenizer=tokenizer,
                              scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), is_distilled=is_distilled)
    return _eval(pipe)


def tiny_z_image_pipeline(seed: int = 0):
    """Z-Image layout: ZImageTransformer2DModel (model time ``1 - sigma``, predicts ``x0 - noise``; unpacked latents), a
    Qwen3 text encoder, a 16-channel AutoencoderKL and Z-Image-Turbo's scheduler config (static shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    tokenizer = qwen2_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
                                           n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # allocated, not initialised, by the stock class
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    pipe = ZImagePipeline(transformer=transformer, vae=_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
                          text_encoder=Qwen3Model(_qwen3_config(tokenizer, 2)), tokenizer=tokenizer,
                          scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER))
    return _eval(pipe)


def tiny_dit_pipeline(seed: int = 0):
    """DiT layout: class-conditional DiTTransformer2DModel (epsilon + learned sigma, linear VP)."""
    use_pil_image_processors()
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, num_embeds_ada_norm=1000,  # DiTPipeline uses class 1000 as the null label
    )
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler(), id2label={i: f"class {i}" for i in range(10)})
    return _eval(pipe)


_BUILDERS = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "qwen_image": tiny_qwen_image_pipeline,
    "flux2": tiny_flux2_pipeline,
    "flux2_klein": tiny_flux2_klein_pipeline,
    "z_image": tiny_z_image_pipeline,
    "dit": tiny_dit_pipeline,
}
# classifier-free guidance 2 (uncond + 2 (cond - uncond)) as each family's pipeline takes it (Flux: its distilled-guidance
# embedding; FLUX.2 [dev] has only that)
GUIDANCE_KWARGS = {"qwen_image": {"true_cfg_scale": 2.0, "negative_prompt": ""}, "flux2": {"guidance_scale": 4.0}, "z_image": {"guidance_scale": 1.0}}


def tiny_pipeline(architecture: str, seed: int = 0):
    """A tiny random pipeline of ``architecture`` (one of ``ARCHITECTURES``)."""
    if architecture not in _BUILDERS:
        raise ValueError(f"architecture={architecture!r} is unknown; choose one of {list(ARCHITECTURES)}.")
    return _BUILDERS[architecture](seed)


def tiny_call_kwargs(architecture: str, num_inference_steps: int, seed: int = 0) -> dict:
    """Arguments for one small, deterministic call of the tiny pipeline."""
    kwargs = {"num_inference_steps": num_inference_steps, "generator": torch.Generator().manual_seed(seed), "output_type": "np"}
    if architecture == "dit":
        return {"class_labels": [1, 3], **kwargs}
    kwargs.update(prompt="a cat", height=32, width=32, **GUIDANCE_KWARGS.get(architecture, {"guidance_scale": 2.0}))
    if architecture not in ("sd", "sdxl"):
        kwargs["max_sequence_length"] = 16
    return kwargs
