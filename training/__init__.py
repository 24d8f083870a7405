"""The distillation trainer: teachers, methods (one file each, registered by name), the accelerate loop and the
``onestep-train`` command. Installed as ``onestep_pipelines.training`` (the repository's top-level ``training/``
folder, mapped by pyproject's ``package-dir``). Importing it loads nothing heavy; ``Teacher`` and ``load_teacher``
import on first use."""

from __future__ import annotations

from .methods import METHODS, get_method

__all__ = ["METHODS", "Teacher", "get_method", "load_teacher"]


def __getattr__(name: str):
    if name in ("Teacher", "load_teacher"):
        from . import teachers

        return getattr(teachers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
