"""Entry point when this repository is cloned into ``ComfyUI/custom_nodes/``.

ComfyUI imports this file as a package named after the folder and looks for ``comfy_entrypoint``. The node pack is
``onestep_pipelines.comfy_nodes``, the one name it has everywhere: from the installed onestep-pipelines, or, when it
is not installed, from this checkout, whose folders are mapped to their package names exactly as pyproject's
``package-dir`` maps them in an install (``training/`` is ``onestep_pipelines.training``...). Nothing is added to
``sys.path``, so this checkout's ``training``, ``tests`` or ``benchmarks`` folders never shadow another node pack's
modules. Imported any other way (pytest collecting the checkout, say), this file does nothing.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

# pyproject.toml [tool.setuptools.package-dir] (tests/test_layout.py keeps the two equal)
PACKAGE_DIRS = {
    "onestep_pipelines": "onestep_pipelines",
    "onestep_pipelines.training": "training",
    "onestep_pipelines.comfy_nodes": "comfy_nodes",
    "onestep_pipelines.model_cards": "model_cards",
}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the packages of ``PACKAGE_DIRS`` in this checkout (their submodules load from the package's folder)."""

    root = os.path.dirname(os.path.abspath(__file__))

    def find_spec(self, name, path=None, target=None):
        folder = PACKAGE_DIRS.get(name)
        if folder is None:
            return None
        location = os.path.join(self.root, folder)
        return importlib.util.spec_from_file_location(name, os.path.join(location, "__init__.py"), submodule_search_locations=[location])


if __package__:  # loaded as a package: a ComfyUI custom node
    if importlib.util.find_spec("onestep_pipelines") is None and not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFinder())
    from onestep_pipelines.comfy_nodes import comfy_entrypoint  # noqa: F401
