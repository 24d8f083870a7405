"""onestep-pipelines' ComfyUI node pack (V3 ``comfy_api`` schema): few-step samplers, sigma presets, flow-map
r-conditioning, a student LoRA loader and a diffusers bridge, as thin adapters over ``onestep_pipelines``.

ComfyUI finds ``comfy_entrypoint`` in three ways: this repository cloned into ``ComfyUI/custom_nodes/`` (the
repository's top-level ``__init__.py``), a pip-installed package plus the one-line shim
``from onestep_pipelines.comfy_nodes import comfy_entrypoint`` saved as ``ComfyUI/custom_nodes/onestep.py``, or
the Comfy Registry (``[tool.comfy]`` in pyproject.toml). Importing this package without ComfyUI is harmless: the
nodes (which import ComfyUI) load only when ComfyUI calls the entry point.
"""


async def comfy_entrypoint():
    from .nodes import OneStepExtension

    return OneStepExtension()
