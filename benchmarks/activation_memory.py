"""Activation memory of one transformer block at the real width of Flux.1 and Qwen-Image, measured on the CPU.

With gradient checkpointing a backward pass holds the input of every block plus, while one block is recomputed, the
tensors that block saves for its backward. This script measures the second part: one block at its real width (random
bf16 weights, a rank-64 LoRA on the family's default targets, bf16 autocast) runs forward with gradients under
``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps; their bytes (each storage once)
are the block's activations. It does so at two token counts, so that the bytes per token (and whether attention keeps
anything quadratic) are measured, not assumed, and compares them with the ``34 x tokens x width`` bytes that
``benchmarks/memory.py`` takes from Korthikanti et al. (2022).

    python benchmarks/activation_memory.py [--families flux,qwen_image,sdxl] [--tokens 256,1024]

(``sdxl``: SDXL's whole UNet, whose blocks differ, at 256 and 512 px: the checkpointed blocks' inputs and the largest
block's saved tensors; it builds the 2.6 B-parameter UNet, about 6 GB of memory and a minute.)

Measured on the CPU; a GPU keeps the same tensors (its fused attention may keep less than the CPU kernel does).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXT_TOKENS = 512


def _block(family: str):
    """``(block, width, call)``: one real-width block with a LoRA and a function running it on ``tokens`` image tokens."""
    from onestep_pipelines.training.methods.base import add_lora

    torch.set_default_dtype(torch.bfloat16)
    try:
        if family == "flux":
            from diffusers import FluxTransformer2DModel

            model = FluxTransformer2DModel(num_layers=1, num_single_layers=0)
        else:
            from diffusers import QwenImageTransformer2DModel

            model = QwenImageTransformer2DModel(num_layers=1)
    finally:
        torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    add_lora(model, 64, 64, "", family)
    block = model.transformer_blocks[0]
    width = model.config.num_attention_heads * model.config.attention_head_dim

    def call(tokens: int):
        image = torch.randn(1, tokens, width, dtype=torch.bfloat16, requires_grad=True)
        text = torch.randn(1, TEXT_TOKENS, width, dtype=torch.bfloat16, requires_grad=True)
        temb = torch.randn(1, width, dtype=torch.bfloat16)
        if family == "flux":
            ids = torch.cat([torch.zeros(TEXT_TOKENS, 3), torch.zeros(tokens, 3)])
            rope = model.pos_embed(ids)
            return block(hidden_states=image, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
        side = int(tokens ** 0.5)
        rope = model.pos_embed([[(1, side, side)]], max_txt_seq_len=TEXT_TOKENS, device=image.device)
        return block(hidden_states=image, encoder_hidden_states=text, encoder_hidden_states_mask=None, temb=temb, image_rotary_emb=rope)

    call.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # (autograd saves weights too: not activations)
    return block, width, call


def saved_bytes(call, tokens: int) -> int:
    """Bytes of the tensors autograd saves in one forward of ``call(tokens)`` (each storage once; the weights excluded)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in call.weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        call(tokens)
    return sum(seen.values())


SDXL_UNET = dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)  # SDXL's UNet


def sdxl_unet_parts(latent_sides: tuple[int, ...]) -> list[dict]:
    """SDXL's whole UNet (2.6 B bf16 weights, a rank-64 LoRA on its attention projections): for each latent side, the
    bytes the checkpointed blocks keep (their inputs) and the most any one block (a ResNet or a Transformer2D block, the
    units diffusers checkpoints) saves while it is recomputed."""
    import re

    from diffusers import UNet2DConditionModel

    from onestep_pipelines.training.methods.base import add_lora

    torch.set_default_dtype(torch.bfloat16)
    try:
        unet = UNet2DConditionModel(**SDXL_UNET)
    finally:
        torch.set_default_dtype(torch.float32)
    unet.requires_grad_(False)
    add_lora(unet, 64, 64, "", "sdxl")
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    blocks = [m for n, m in unet.named_modules() if re.fullmatch(r"((down|up)_blocks\.\d+|mid_block)\.(resnets|attentions)\.\d+", n)]
    current, rows = [None], []
    for side in latent_sides:
        saved, inputs = {}, {}

        def pre(module, args, kwargs):
            current[0] = module
            inputs[id(module)] = (args[0] if args else kwargs["hidden_states"]).untyped_storage().nbytes()

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights and current[0] is not None:
                saved.setdefault(id(current[0]), {})[storage.data_ptr()] = storage.nbytes()
            return tensor

        handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
        handles += [b.register_forward_hook(lambda *a: current.__setitem__(0, None)) for b in blocks]
        x = torch.randn(1, 4, side, side)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            unet(x.requires_grad_(), torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 77, 2048),
                 added_cond_kwargs={"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)})
        for h in handles:
            h.remove()
        rows.append({"side": side, "stored": sum(inputs.values()), "max_block": max(sum(v.values()) for v in saved.values())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="flux,qwen_image")
    parser.add_argument("--tokens", default="256,1024", help="two image-token counts (squares: 256 = 256 px in 2x2 patches of 8x latents)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    low, high = (int(t) for t in args.tokens.split(","))
    families = args.families.split(",")
    if "sdxl" in families:
        rows = sdxl_unet_parts((32, 64))
        print("\n| SDXL UNet, latent side | checkpointed blocks' inputs | the largest block's saved tensors |\n|---|---|---|")
        for r in rows:
            print(f"| {r['side']} ({r['side'] * 8} px) | {r['stored'] / 2**20:.1f} MB | {r['max_block'] / 2**20:.1f} MB |")
        families.remove("sdxl")
    if families:
        print(f"| family | width | saved by one block: {low} + {TEXT_TOKENS} tokens | {high} + {TEXT_TOKENS} tokens | bytes per token and width "
              "| 34 x tokens x width (memory.py) at the larger count |")
        print("|---|---|---|---|---|---|")
    for family in families:
        block, width, call = _block(family)
        a, b = saved_bytes(call, low), saved_bytes(call, high)
        del block
        per = (b - a) / (high - low) / width
        formula = 34 * (high + TEXT_TOKENS) * width
        print(f"| {family} | {width} | {a / 2**20:.0f} MB | {b / 2**20:.0f} MB | {per:.1f} | {formula / 2**20:.0f} MB |")


if __name__ == "__main__":
    main()
