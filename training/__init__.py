"""The distillation trainer: teachers, methods (one file each, registered by name), the accelerate loop and
the ``onestep-train`` command. Installed as ``onestep_pipelines.training`` (the top-level ``training/`` folder
of the repository, linked into the package)."""

from .methods import METHODS, get_method
from .teachers import Teacher, load_teacher

__all__ = ["METHODS", "Teacher", "get_method", "load_teacher"]
