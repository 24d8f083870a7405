"""transformers >= 5 without torchvision: bind the PIL image processors that diffusers imports before it imports them.

In transformers 5, ``CLIPImageProcessor`` and ``SiglipImageProcessor`` name the torchvision-backed processors. Without
torchvision, the first ``from transformers import CLIPImageProcessor`` falls back to ``CLIPImageProcessorPil`` and logs
"`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` ..." (once per
name). diffusers' Stable Diffusion pipeline modules (the safety checker's feature extractor) and its IP-adapter loader
import both names, so loading any SD / SDXL / SD3 / Flux pipeline printed those two lines although nothing here uses an
image processor. :func:`use_pil_image_processors` binds the two names to their PIL classes first: the class transformers
would fall back to, without the notice. With torchvision installed, or with a transformers that has no PIL twins (4.x,
where these names are the PIL processors), it changes nothing; no log message is filtered.
"""

from __future__ import annotations

import sys

NAMES = ("CLIPImageProcessor", "SiglipImageProcessor")  # what diffusers' pipeline and loader modules import


def use_pil_image_processors() -> None:
    """Call before importing a diffusers pipeline module (idempotent; imports transformers' two PIL processors when it
    binds them)."""
    import transformers
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    found = {}
    for name in NAMES:
        if name not in vars(sys.modules["transformers"]):  # not yet resolved (by transformers' fallback or an earlier call)
            found[name] = getattr(transformers, f"{name}Pil", None)
    # importing a processor can replace the module: transformers.processing_utils re-executes transformers' __init__
    # (direct_transformers_import), so bind the names on the module that is in sys.modules now
    module = sys.modules["transformers"]
    for name, pil in found.items():
        if pil is not None and name not in vars(module):
            setattr(module, name, pil)
