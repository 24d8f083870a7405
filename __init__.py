"""Entry point when this repository is cloned into ``ComfyUI/custom_nodes/``.

ComfyUI imports this file as a package named after the folder, so the node pack loads as its subpackage
``comfy_nodes`` (no symbolic links, no installation of this package needed). The library the nodes call is the
installed onestep-pipelines, or this checkout's ``onestep_pipelines/`` when it is not installed (dependencies from
``requirements.txt``)."""

import importlib.util
import os
import sys

if importlib.util.find_spec("onestep_pipelines") is None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from .comfy_nodes import comfy_entrypoint  # noqa: E402,F401
