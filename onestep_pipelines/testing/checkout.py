"""Checkouts of this repository the way users get them, for tests of the install routes."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile


def windows_style_clone(repo: str, dest: str) -> str:
    """``git -c core.symlinks=false clone`` of ``repo`` into ``dest`` (what Git on Windows does by default), with the
    working tree's uncommitted and untracked files copied over, so it tests the change at hand, not the last commit."""
    subprocess.run(["git", "-c", "core.symlinks=false", "clone", "-q", "--no-hardlinks", repo, dest], check=True)
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=repo, capture_output=True, text=True, check=True)
    for path in listed.stdout.split("\n"):
        source = os.path.join(repo, path)
        if path and os.path.isfile(source) and not os.path.islink(source):
            os.makedirs(os.path.dirname(os.path.join(dest, path)), exist_ok=True)
            shutil.copyfile(source, os.path.join(dest, path))
    return dest


def wheel_site(checkout: str, dest: str) -> str:
    """Build the wheel of ``checkout`` (no dependencies, no isolation) and unpack it into ``dest/site``, a folder to
    put on ``PYTHONPATH`` as if the package were pip-installed there. Returns that folder."""
    wheels = os.path.join(dest, "wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, checkout],
                   check=True, capture_output=True)
    (wheel,) = glob.glob(os.path.join(wheels, "*.whl"))
    site = os.path.join(dest, "site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


# Python code that makes this interpreter forget an installed onestep-pipelines (an editable install's finder and any
# site folder holding the package), so that a checkout or a wheel folder on PYTHONPATH is what gets imported.
FORGET_INSTALLED = """
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", "") or "")]
keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
sys.path[:] = [p for p in sys.path if p in keep or not os.path.isdir(os.path.join(p, "onestep_pipelines"))]
"""
