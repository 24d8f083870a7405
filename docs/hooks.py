"""mkdocs hooks (mkdocs.yml's ``hooks``; not part of the package).

- Serve a few repository files that live outside docs/ under their repository paths, so that pages link them as the
  repository does, with no copies to drift: the node pack's and the trainer's READMEs as pages, and the benchmark
  figures the pages show.
- Fill ``<!-- distill-options -->`` and ``<!-- distill-methods -->`` (docs/trainer.md) from the trainer's own option
  and method tables (``onestep_pipelines.training.config``, torch-free), so the page lists what ``--help`` lists.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks")
REPO_FILES = ["comfy_nodes/README.md", "training/README.md", "benchmarks/results/*/*.png"]


def on_files(files, config):
    root = os.path.dirname(os.path.abspath(config["config_file_path"]))
    for pattern in REPO_FILES:
        for path in sorted(glob.glob(os.path.join(root, pattern))):
            uri = os.path.relpath(path, root).replace(os.sep, "/")
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=path))
    seen = {}
    for file in files:  # `training.md` and `training/README.md` would both become training/index.html
        if file.dest_uri in seen:
            log.warning("%s and %s are both built to %s; rename one", seen[file.dest_uri], file.src_uri, file.dest_uri)
        seen[file.dest_uri] = file.src_uri
    return files


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def options_table() -> str:
    from onestep_pipelines.training.config import DistillConfig, flag

    rows = ["| flag | default | what it sets |", "| --- | --- | --- |"]
    for f in dataclasses.fields(DistillConfig):
        name = flag(f.name)
        if isinstance(f.default, bool):
            name = f"{name} / --no-{name[2:]}"
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "") + (f" (one of: {', '.join(map(str, choices))})" if choices else "")
        rows.append(f"| `{name}` | `{f.default!r}` | {_cell(text)} |")
    return "\n".join(rows)


def methods_table() -> str:
    from onestep_pipelines.training.methods import METHODS

    rows = ["| `--method` | what it trains | papers |", "| --- | --- | --- |"]
    for name, spec in METHODS.items():
        papers = "; ".join(f"[{_cell(title)}](https://arxiv.org/abs/{arxiv})" for title, arxiv in spec.papers)
        rows.append(f"| `{name}` | {_cell(spec.summary)} | {papers} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    if "<!-- distill-options -->" in markdown:
        markdown = markdown.replace("<!-- distill-options -->", options_table())
    if "<!-- distill-methods -->" in markdown:
        markdown = markdown.replace("<!-- distill-methods -->", methods_table())
    return markdown
