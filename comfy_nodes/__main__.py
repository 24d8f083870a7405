"""``python -m onestep_pipelines.comfy_nodes /path/to/ComfyUI``: see :mod:`.install`."""

from __future__ import annotations

import argparse
import sys

from .install import install, ui_workflows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m onestep_pipelines.comfy_nodes",
                                     description="Put the installed node pack and its example workflows into a ComfyUI's custom_nodes.")
    parser.add_argument("comfyui", help="ComfyUI's folder (or the --base-directory it runs with): the one holding custom_nodes/")
    parser.add_argument("--name", default="onestep", help="folder name in custom_nodes (the templates are listed under it)")
    args = parser.parse_args(argv)
    try:
        target = install(args.comfyui, args.name)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {target}: the entry point and {len(ui_workflows())} example workflows. Restart ComfyUI; the workflows are "
          f"in its template browser under {args.name!r}.")


if __name__ == "__main__":
    main()
