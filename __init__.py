"""Entry point when this repository is cloned into ``ComfyUI/custom_nodes/``: loads the node pack
(``comfy_nodes``), using the package from this checkout unless onestep-pipelines is pip-installed."""

import importlib.util
import os
import sys

if importlib.util.find_spec("onestep_pipelines") is None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onestep_pipelines.comfy_nodes import comfy_entrypoint  # noqa: E402,F401
