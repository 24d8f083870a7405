"""The repository's layout: no symbolic links, every folder installed where pyproject maps it, no import reaching
above its folder, no import circle, and a checkout made without symlink support (Git on Windows) loads the node
pack both as a plain clone in ComfyUI/custom_nodes and from a built wheel."""

import ast
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from onestep_pipelines.testing import checkout

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAPPED = {"onestep_pipelines.training": "training", "onestep_pipelines.comfy_nodes": "comfy_nodes", "onestep_pipelines.model_cards": "model_cards"}


def pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def git_files() -> list[tuple[str, str]]:
    """``(mode, path)`` of every tracked file, or skip outside a git checkout."""
    if not os.path.isdir(os.path.join(REPO, ".git")) or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [(line.split()[0], line.split("\t", 1)[1]) for line in out.splitlines()]


def test_no_symbolic_links_are_tracked():
    links = [path for mode, path in git_files() if mode == "120000"]
    assert links == [], f"symbolic links break checkouts with core.symlinks=false (Git on Windows): {links}"


def package_folders() -> dict[str, str]:
    """Every importable package under the mapped top-level folders: ``{dotted name: folder}``."""
    roots = {"onestep_pipelines": "onestep_pipelines", **MAPPED}
    found = {}
    for package, folder in roots.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, os.path.join(REPO, folder))
                found[package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"] = dirpath
    return found


def test_pyproject_installs_every_package_from_its_folder():
    setuptools = pyproject()["tool"]["setuptools"]
    assert sorted(setuptools["packages"]) == sorted(package_folders())
    for package, folder in MAPPED.items():
        assert setuptools["package-dir"][package] == folder
    root_init = ast.parse(open(os.path.join(REPO, "__init__.py")).read())  # a plain clone maps the same folders
    (dirs,) = [ast.literal_eval(node.value) for node in root_init.body if isinstance(node, ast.Assign) and node.targets[0].id == "PACKAGE_DIRS"]
    assert dirs == setuptools["package-dir"]


def test_every_module_has_one_import_name():
    """No file of the repository imports the mapped folders by their folder names (``import training``): they are
    ``onestep_pipelines.training`` etc. everywhere, so one file is never loaded twice under two names (two method
    registries) and a clone on ``sys.path`` shadows nothing."""
    top_level = {folder for folder in MAPPED.values()}
    offenders = []
    for path in glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True):
        if os.sep + "." in path or "site-packages" in path:
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{os.path.relpath(path, REPO)}: {n}" for n in names if n.split(".")[0] in top_level]
    assert not offenders, offenders


def modules() -> dict[str, str]:
    """``{dotted module name: path}`` of every Python module of the installed package."""
    out = {}
    for package, folder in package_folders().items():
        for path in glob.glob(os.path.join(folder, "*.py")):
            name = os.path.basename(path)[:-3]
            out[package if name == "__init__" else f"{package}.{name}"] = path
    return out


def imports_of(name: str, path: str, known: dict) -> set[str]:
    """Modules of the package that ``name`` imports (relative imports resolved), at any depth of its code."""
    base = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


@pytest.mark.parametrize("folder", ["training", "comfy_nodes"])
def test_mapped_folders_import_nothing_above_themselves(folder):
    """training/ and comfy_nodes/ are packages of their own: relative imports stay inside the folder (the library is
    imported by its absolute name), so they read the same in the repository and installed."""
    for path in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True):
        depth = os.path.relpath(os.path.dirname(path), os.path.join(REPO, folder)).count(os.sep) + (os.path.dirname(path) != os.path.join(REPO, folder))
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level - 1 <= depth, f"{os.path.relpath(path, REPO)}:{node.lineno} imports above {folder}/"


def test_no_import_circles():
    """A lower layer never imports a higher one: the module import graph has no cycle (lazy imports included)."""
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


@pytest.fixture(scope="module")
def windows_style_clone(tmp_path_factory):
    """The repository cloned the way Git on Windows does by default (no symbolic links), with uncommitted changes."""
    git_files()
    return pathlib.Path(checkout.windows_style_clone(REPO, str(tmp_path_factory.mktemp("clone") / "onestep-pipelines")))


STRIP_INSTALLED = checkout.FORGET_INSTALLED


@pytest.mark.slow
def test_plain_clone_loads_as_a_custom_node(windows_style_clone):
    """ComfyUI imports ``custom_nodes/<folder>/__init__.py`` as a package named after the folder; without the package
    installed, the node pack and the library come from the clone."""
    code = STRIP_INSTALLED + f"""
import asyncio, importlib.util, os
clone = {str(windows_style_clone)!r}
assert importlib.util.find_spec("onestep_pipelines") is None, "installed"
spec = importlib.util.spec_from_file_location("onestep-pipelines", os.path.join(clone, "__init__.py"), submodule_search_locations=[clone])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
path_before = list(sys.path)
spec.loader.exec_module(module)
assert sys.path == path_before, "the clone added to sys.path"
import onestep_pipelines, onestep_pipelines.sampling, onestep_pipelines.students, onestep_pipelines.training.config
for m in (onestep_pipelines, onestep_pipelines.training.config):
    assert m.__file__.startswith(clone), m.__file__
assert module.comfy_entrypoint.__module__ == "onestep_pipelines.comfy_nodes"  # one name per module
assert importlib.util.find_spec("training") is None and importlib.util.find_spec("comfy_nodes") is None
try:
    asyncio.run(module.comfy_entrypoint())
except ImportError as error:  # no ComfyUI here: the nodes' own import of comfy_api is what fails
    assert "comfy" in str(error) or "folder_paths" in str(error), error
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(windows_style_clone.parent))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.slow
def test_wheel_from_the_clone_holds_every_part(windows_style_clone, tmp_path):
    target = checkout.wheel_site(str(windows_style_clone), str(tmp_path))
    (wheel,) = glob.glob(str(tmp_path / "wheel" / "*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("onestep_pipelines/training/cli.py", "onestep_pipelines/training/methods/dmd2.py", "onestep_pipelines/comfy_nodes/nodes.py",
                     "onestep_pipelines/model_cards/student_full.md", "onestep_pipelines/assets/digits/teacher/model_index.json",
                     "onestep_pipelines/comfy_nodes/example_workflows/consistency_sampler.api.json",
                     "onestep_pipelines/comfy_nodes/example_workflows/consistency_sampler.json", "onestep_pipelines/comfy_nodes/install.py"):
        assert expected in names, expected
    assert not any(name.startswith(("training/", "comfy_nodes/", "tests/", "example_workflows/")) for name in names)
    code = STRIP_INSTALLED + f"""
sys.path.insert(0, {target!r})
import onestep_pipelines.training.cli, onestep_pipelines.comfy_nodes, onestep_pipelines.students.cards as cards
for module in (onestep_pipelines.training.cli, onestep_pipelines.comfy_nodes, cards):
    assert module.__file__.startswith({target!r}), module.__file__
assert cards.TEMPLATES_DIR.startswith({target!r})
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_requirements_txt_is_pyprojects_dependencies_without_torch():
    """A plain clone into ComfyUI/custom_nodes installs requirements.txt (ComfyUI-Manager, the Comfy Registry)."""
    with open(os.path.join(REPO, "requirements.txt")) as f:
        listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert listed == [d for d in pyproject()["project"]["dependencies"] if not d.startswith("torch")]
