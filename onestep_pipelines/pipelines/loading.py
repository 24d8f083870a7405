"""Saving and loading student pipelines so that every usual loading path works.

A saved student names its pipeline class in ``model_index.json`` as ``["pipeline", "<Class>"]`` and
carries a two-line ``pipeline.py`` that imports the class from this package. Three paths load it:

- ``<Class>.from_pretrained(folder)``: always; the shim is never executed (``load_config`` below reads
  the class name itself).
- ``DiffusionPipeline.from_pretrained(folder)`` after ``import onestep_pipelines``: diffusers would
  treat ``pipeline.py`` as remote code and demand ``trust_remote_code=True``. Importing this package
  therefore wraps ``DiffusionPipeline.from_pretrained`` once (in ``onestep_pipelines/__init__.py``): when
  the config names one of *our* classes it calls ``<Class>.from_pretrained`` (our installed code; the
  folder's ``pipeline.py`` is not run), and in every other case it is diffusers' own function, unchanged.
- ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` in an interpreter that never
  imported the package: diffusers runs the shim, which imports the installed package.

Weights load from safetensors only unless the caller passes ``allow_pickle=True``; ``trust_remote_code``
is never set by this package.
"""

from __future__ import annotations

import contextlib
import json
import os

SHIM_NAME = "pipeline"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".msgpack")
REPOSITORY_URL = "https://github.com/onestep-pipelines/onestep-pipelines"  # pyproject's [project.urls] Repository
# onestep-pipelines is not on PyPI (yet): what students' files and cards tell readers to run
INSTALL_COMMAND = f'pip install "git+{REPOSITORY_URL}"'


def shim_source(class_name: str) -> str:
    return (
        "# Written by onestep-pipelines: lets DiffusionPipeline.from_pretrained(..., trust_remote_code=True) load this\n"
        "# student in an interpreter that has not imported the package. Requires onestep-pipelines, which is not on PyPI:\n"
        f"# {INSTALL_COMMAND}  (or `pip install .` in a clone of the repository)\n"
        f"from onestep_pipelines.pipelines import {class_name}  # noqa: F401\n"
    )


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` (with the usual 0o666 & ~umask mode),
    on failure it is removed, so readers never see a half-written file."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomically(path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_loading_files(save_directory: str, class_name: str) -> None:
    """Point ``model_index.json`` at the shim and write the shim."""
    index_path = os.path.join(save_directory, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        config = json.load(f)
    config["_class_name"] = [SHIM_NAME, class_name]
    write_atomically(os.path.join(save_directory, f"{SHIM_NAME}.py"), shim_source(class_name))
    write_atomically(index_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def safetensors_kwargs(kwargs: dict, allow_pickle: bool) -> dict:
    """Force ``use_safetensors=True`` unless pickled weights are explicitly allowed."""
    if kwargs.get("use_safetensors") is False and not allow_pickle:
        raise ValueError("use_safetensors=False loads pickled weights, which can run code: also pass allow_pickle=True to allow it.")
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    return kwargs
