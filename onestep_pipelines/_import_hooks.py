"""Run a function when a module finishes loading (a post-import hook), without importing that module.

Used by the package's ``__init__`` to teach ``DiffusionPipeline.from_pretrained`` this package's pipelines as soon as
diffusers loads it, so that ``import onestep_pipelines`` itself stays cheap (the ``onestep-train`` command parses its
flags before torch or diffusers load).
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Callable


class _CallWhenLoaded(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for ``name`` it asks the other finders and wraps the loader's ``exec_module``, then
    removes itself from ``sys.meta_path``."""

    def __init__(self, name: str, callback: Callable):
        self.name, self.callback = name, callback

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            self.callback(module)

        spec.loader.exec_module = exec_module
        return spec


def call_when_imported(name: str, callback: Callable) -> None:
    """``callback(module)`` now if module ``name`` is loaded, else right after it loads (once)."""
    module = sys.modules.get(name)
    if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False) is False:
        callback(module)
    elif not any(isinstance(f, _CallWhenLoaded) and f.name == name and f.callback is callback for f in sys.meta_path):
        sys.meta_path.insert(0, _CallWhenLoaded(name, callback))
