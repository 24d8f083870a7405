"""Puts a pip-installed node pack into a ComfyUI, with its example workflows where ComfyUI looks for them:

    python -m onestep_pipelines.comfy_nodes /path/to/ComfyUI

writes ``custom_nodes/onestep/__init__.py`` (the one-line entry point) and copies the UI-format example workflows into
``custom_nodes/onestep/example_workflows/``. ComfyUI lists and serves workflow templates only from the
``example_workflows`` folder of a custom node's own folder (``app/custom_node_manager.py``), never from an installed
package, so the one-line file ``custom_nodes/onestep.py`` loads the nodes but shows no templates. Run it again after
upgrading the package: it replaces the copies. A clone into ``custom_nodes`` needs none of this (the repository's
``example_workflows/`` is that folder)."""

from __future__ import annotations

import glob
import os
import shutil

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "example_workflows")
MARKER = "# Written by `python -m onestep_pipelines.comfy_nodes`; running it again replaces this folder's example_workflows.\n"
ENTRY_POINT = "from onestep_pipelines.comfy_nodes import comfy_entrypoint  # noqa: F401\n"


def ui_workflows(folder: str = EXAMPLES) -> list[str]:
    """The example workflows in ComfyUI's UI format (``<name>.json``), the ones ComfyUI offers as templates; the
    ``<name>.api.json`` twins are for ``/prompt`` and would not load as templates."""
    return sorted(p for p in glob.glob(os.path.join(folder, "*.json")) if not p.endswith(".api.json"))


def install(comfyui: str, name: str = "onestep") -> str:
    """Writes ``<comfyui>/custom_nodes/<name>/`` (entry point + example_workflows) and returns that folder. Refuses a
    folder this function did not write, and a ``custom_nodes/<name>.py`` beside it (ComfyUI would load the pack twice)."""
    custom_nodes = os.path.join(comfyui, "custom_nodes")
    if not os.path.isdir(custom_nodes):
        raise ValueError(f"{comfyui}: no custom_nodes folder in it; give ComfyUI's folder (or the --base-directory it runs with).")
    target, entry = os.path.join(custom_nodes, name), os.path.join(custom_nodes, name, "__init__.py")
    if os.path.exists(target) and not _written_here(entry):
        raise ValueError(f"{target} exists and was not written by this command; move it away or pass another --name.")
    if os.path.exists(target + ".py"):
        raise ValueError(f"{target}.py also loads a node pack named {name!r}; delete it (the folder {target} replaces the one-line file).")
    examples = os.path.join(target, "example_workflows")
    shutil.rmtree(examples, ignore_errors=True)
    os.makedirs(examples)
    for path in ui_workflows():
        shutil.copyfile(path, os.path.join(examples, os.path.basename(path)))
    with open(entry, "w", encoding="utf-8") as f:
        f.write(MARKER + ENTRY_POINT)
    return target


def _written_here(entry: str) -> bool:
    if not os.path.isfile(entry):
        return False
    with open(entry, encoding="utf-8") as f:
        return f.read().startswith(MARKER)
