"""GPU memory of a LoRA DMD2 (and consistency) run on the real SDXL, FLUX.1 [dev], Qwen-Image, FLUX.2 [dev] and Z-Image.

Nothing is downloaded or allocated: every model is built on the meta device from its released configuration (the
diffusers transformers' class defaults are the released sizes; the text encoders' configs are written out below from
their Hub ``config.json``), and every byte count below comes from those parameter counts. COMPUTED, NOT MEASURED: no GPU
has run these models in this project yet (``benchmarks/gpu.py`` is how a lent GPU measures a run).

What a LoRA DMD2 run holds on one GPU (batch 1, 1024 x 1024, bf16 weights, gradient checkpointing):

- frozen base weights: the teacher, the LoRA student and the LoRA fake score share one bf16 copy of the transformer
  (``training.methods.base.tied_copy``; measured on tiny models: the run's ``weights_mb`` is one base plus adapters);
  under FSDP2 each network is sharded on its own (three copies, divided among the GPUs); ``--quantize-base int8`` or
  ``float8`` holds the base's linear layers in one byte per weight (torchao); an NF4 base is not built (computed here);
- the two LoRAs (rank ``--rank`` on the family's default targets, ``training.methods.base.LORA_TARGETS``): fp32 weights,
  gradients and Adam moments, plus the student's EMA: 20 bytes per student LoRA parameter, 16 per fake-score one;
- activations of one backward pass with checkpointing: the block inputs kept for recomputation (2 bytes x tokens x
  width per block) plus one block recomputed in full: ``k x tokens x width`` bytes, k measured for FLUX.1's and
  Qwen-Image's blocks (30.6 and 44.5, ``benchmarks/activation_memory.py``: the tensors autograd saves, linear in
  tokens), else Korthikanti et al.'s
  34 (2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1 without the attention-score term,
  which flash / SDPA attention does not store);
- the text encoder in bf16 (the trainer encodes the prompt list once, but keeps the encoder on the device for previews
  and validation samples; with ``--cache`` it stays on the CPU) and the VAE in float32.

    python benchmarks/memory.py [--rank 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

GIB = 1024**3
TOKENS_1024 = 4096  # 1024 x 1024 px: a 128 x 128 latent in 2 x 2 patches (all three families)
SAVED_PER_TOKEN_AND_WIDTH = {"flux": 30.6, "qwen_image": 44.5}
# SDXL's UNet (blocks of different widths): measured at 512 px (activation_memory.py --families sdxl: checkpointed blocks'
# inputs 48.1 MB, the largest block's saved tensors 156.6 MB), times 4 for the 4x pixels of 1024 px (from 256 to 512 px
# they grew 4.0x and 3.4x)
SDXL_ACTIVATIONS_1024 = 4 * (48.1 + 156.6) * 2**20  # bytes: the stored block inputs plus one recomputed block


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _text_encoders():
    """The released text encoders (their Hub config.json values), on the meta device."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3Config,
        Qwen3Model,
        T5Config,
        T5EncoderModel,
    )

    qwen25_vl_7b = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         vocab_size=152064, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584), vocab_size=152064)
    qwen3_4b = Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=128, vocab_size=151936, tie_word_embeddings=True)
    clip_big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
                                hidden_act="gelu")
    t5_xxl = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu", vocab_size=32128)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
    with torch.device("meta"):
        return {
            "sdxl": ("CLIP-L + OpenCLIP bigG", _count(CLIPTextModel(clip_l)) + _count(CLIPTextModelWithProjection(clip_big_g))),
            "flux": ("CLIP-L + T5-XXL", _count(CLIPTextModel(clip_l)) + _count(T5EncoderModel(t5_xxl))),
            "qwen_image": ("Qwen2.5-VL-7B", _count(Qwen2_5_VLForConditionalGeneration(qwen25_vl_7b))),
            "flux2": ("Mistral-Small-3.1-24B", _count(Mistral3ForConditionalGeneration(Mistral3Config()))),  # its defaults are that model
            "z_image": ("Qwen3-4B", _count(Qwen3Model(qwen3_4b))),
        }


def _transformers_and_vaes():
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLFlux2,
        AutoencoderKLQwenImage,
        Flux2Transformer2DModel,
        FluxTransformer2DModel,
        QwenImageTransformer2DModel,
        UNet2DConditionModel,
        ZImageTransformer2DModel,
    )

    with torch.device("meta"):
        def autoencoder(latent_channels):  # the SD / SDXL / FLUX.1 VAE layout
            return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=latent_channels)

        flux1_ae, sdxl_vae = autoencoder(16), autoencoder(4)
        from activation_memory import SDXL_UNET

        return {
            "sdxl": (UNet2DConditionModel(**SDXL_UNET), sdxl_vae),
            "flux": (FluxTransformer2DModel(guidance_embeds=True), flux1_ae),  # FLUX.1 [dev]
            "qwen_image": (QwenImageTransformer2DModel(), AutoencoderKLQwenImage()),
            "flux2": (Flux2Transformer2DModel(), AutoencoderKLFlux2()),
            "z_image": (ZImageTransformer2DModel(), flux1_ae),
        }


def _lora_params(model, architecture: str, rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA on the family's default targets (peft's matching of the target list)."""
    import re

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from onestep_pipelines.training.methods.base import LORA_TARGETS

    targets = LORA_TARGETS.get(architecture, "to_q,to_k,to_v,to_out.0")  # (FLUX.1: the attention projections)
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if targets.startswith(".*"):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets.split(","))
        total += rank * (module.in_features + module.out_features) if hit else 0
    return total


def _width_and_blocks(model, architecture: str) -> tuple[int, int, int]:
    """(width, number of blocks, text tokens) of the transformer at 1024 px."""
    if architecture == "qwen_image":
        c = model.config
        return c.num_attention_heads * c.attention_head_dim, c.num_layers, 512 - 34  # max_sequence_length minus the template
    if architecture in ("flux", "flux2"):
        c = model.config
        return c.num_attention_heads * c.attention_head_dim, c.num_layers + c.num_single_layers, 512
    c = model.config
    return c.dim, c.n_layers + 2 * c.n_refiner_layers, 512


def estimate(rank: int) -> list[dict]:
    encoders = _text_encoders()
    rows = []
    for architecture, (transformer, vae) in _transformers_and_vaes().items():
        params = _count(transformer)
        lora = _lora_params(transformer, architecture, rank)
        if architecture == "sdxl":
            activations = SDXL_ACTIVATIONS_1024
        else:
            width, blocks, text = _width_and_blocks(transformer, architecture)
            tokens = TOKENS_1024 + text
            activations = 2 * tokens * width * blocks + SAVED_PER_TOKEN_AND_WIDTH.get(architecture, 34) * tokens * width
        adapters = 20 * lora + 16 * lora  # student LoRA (+ EMA) and fake-score LoRA, fp32 with Adam
        base = {"one shared bf16 base": 2 * params, "--quantize-base int8 / float8": params, "NF4 base (not built)": params // 2,
                "3 bf16 copies (FSDP2: / GPUs)": 3 * 2 * params}
        rows.append({
            "family": architecture, "transformer_params": params, "vae_params": _count(vae), "text_encoder": encoders[architecture][0],
            "text_encoder_params": encoders[architecture][1], "lora_params": lora, "rank": rank,
            "gib": {option: (weights + adapters + activations + 4 * _count(vae) + 2 * encoders[architecture][1]) / GIB for option, weights in base.items()}
            | {"shared base, --cache (text encoder on the CPU)": (2 * params + adapters + activations + 4 * _count(vae)) / GIB,
               "--cache --quantize-base int8": (params + adapters + activations + 4 * _count(vae)) / GIB,
               # consistency distillation: no fake score; the target network's adapters are a float32 copy of the student's
               "consistency LoRA, --cache": (2 * params + 24 * lora + activations + 4 * _count(vae)) / GIB},
            "text_encoder_bf16_gib": 2 * encoders[architecture][1] / GIB, "activations_gib": activations / GIB,
        })
    return rows


def fits(gib: float) -> str:
    return next((f"{size} GB" for size in (24, 48, 80) if gib <= 0.9 * size * 1e9 / GIB), "> 80 GB")  # 10 % for the allocator and CUDA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of the student and of the fake score (Lightning's: 64)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    rows = estimate(args.rank)
    options = list(rows[0]["gib"])
    print(f"LoRA DMD2, rank {args.rank}, batch 1 at 1024 px, gradient checkpointing: GiB per GPU (smallest card that fits), COMPUTED not measured\n")
    print("| family | transformer | LoRA params | " + " | ".join(options) + " | text encoder (bf16) |")
    print("|---" * (len(options) + 4) + "|")
    for r in rows:
        cells = " | ".join(f"{v:.1f} ({fits(v)})" for v in r["gib"].values())
        print(f"| {r['family']} | {r['transformer_params'] / 1e9:.2f} B | {r['lora_params'] / 1e6:.1f} M | {cells} | "
              f"{r['text_encoder']} {r['text_encoder_params'] / 1e9:.2f} B = {r['text_encoder_bf16_gib']:.1f} GiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
