"""Saving and loading student pipelines so that every usual loading path works.

A saved student names its pipeline class in ``model_index.json`` as ``["pipeline", "<Class>"]`` and
carries a two-line ``pipeline.py`` that imports the class from this package. Three paths load it:

- ``<Class>.from_pretrained(folder)``: always; the shim is never executed (``load_config`` below reads
  the class name itself).
- ``DiffusionPipeline.from_pretrained(folder)`` after ``import onestep_pipelines``: diffusers would
  treat ``pipeline.py`` as remote code and demand ``trust_remote_code=True``. Importing this package
  therefore wraps ``DiffusionPipeline.from_pretrained`` once: when the config names one of *our*
  classes it calls ``<Class>.from_pretrained`` (our installed code; the folder's ``pipeline.py`` is not
  run), and in every other case it is diffusers' own function, unchanged.
- ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` in an interpreter that never
  imported the package: diffusers runs the shim, which imports the installed package.

Weights load from safetensors only unless the caller passes ``allow_pickle=True``; ``trust_remote_code``
is never set by this package.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

from diffusers import DiffusionPipeline

SHIM_NAME = "pipeline"
PIPELINE_CLASSES: dict[str, type] = {}
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".msgpack")


def register_pipeline(cls: type) -> type:
    """Class decorator: make ``cls`` loadable through the paths above."""
    PIPELINE_CLASSES[cls.__name__] = cls
    return cls


def shim_source(class_name: str) -> str:
    return (
        "# Written by onestep-pipelines: lets DiffusionPipeline.from_pretrained(..., trust_remote_code=True) load this\n"
        "# student in an interpreter that has not imported the package. Requires `pip install onestep-pipelines`.\n"
        f"from onestep_pipelines.pipelines import {class_name}  # noqa: F401\n"
    )


def own_class_name(config: dict) -> str | None:
    """The name of our pipeline class that a ``model_index.json`` config names, if any."""
    name = config.get("_class_name")
    if isinstance(name, (list, tuple)) and len(name) == 2 and name[0] == SHIM_NAME:
        name = name[1]
    return name if isinstance(name, str) and name in PIPELINE_CLASSES else None


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


def _install_diffusers_hook() -> None:
    original = DiffusionPipeline.from_pretrained.__func__
    if getattr(original, "_onestep_hook", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        if cls is DiffusionPipeline and kwargs.get("custom_pipeline") is None:
            try:
                config = DiffusionPipeline.load_config(
                    pretrained_model_name_or_path, **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
                )
            except Exception:  # not a pipeline, offline, ...: diffusers reports it in its own words
                config = {}
            name = own_class_name(config)
            if name is not None:
                return PIPELINE_CLASSES[name].from_pretrained(pretrained_model_name_or_path, **kwargs)
        return original(cls, pretrained_model_name_or_path, **kwargs)

    from_pretrained._onestep_hook = True
    DiffusionPipeline.from_pretrained = classmethod(from_pretrained)
