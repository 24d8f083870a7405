"""The embedded benchmarks: digits (data, FD-digits metric, shipped teacher and classifier) and text-to-image digits
(captions, the learned teachers of real diffusers pipeline classes)."""

import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
# The shipped text-to-image digits teachers, by the name --teacher takes (trained by benchmark/train_text_digits.py).
TEXT_TEACHERS = {
    "text-digits-sd": os.path.join(ASSETS_DIR, "text_digits", "sd"),
    "text-digits-sd3": os.path.join(ASSETS_DIR, "text_digits", "sd3"),
}
# A trained LoRA student shipped with them, by the name ComfyUI's Diffusers Student node offers: text-digits-sd
# distilled by 4-step consistency, LoRA rank 16 (README's row; docs/methods.md "Text-to-image students" has the command).
TEXT_STUDENT_LORAS = {
    "text-digits-sd-lcm-lora": os.path.join(ASSETS_DIR, "text_digits", "sd_lcm_lora", "pytorch_lora_weights.safetensors"),
}


def teacher_folder(source: str) -> str:
    """The folder of a shipped text-to-image digits teacher named ``source``; any other source as it is."""
    return TEXT_TEACHERS.get(source, source)
