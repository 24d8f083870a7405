"""A real ComfyUI server for tests and benchmarks: random-weight models shaped the way ComfyUI detects them, a
client for ``/object_info``, ``/prompt`` and ``/history``, and what a node pack adds to ComfyUI's start.

Needs a ComfyUI checkout (``COMFYUI_DIR``) and a Python that can run it (``COMFYUI_PYTHON``, default this one).
ComfyUI's own modules are imported only to build checkpoints (key names and the tiny TAESD layout); the server runs
in its own process on 127.0.0.1 with ``--cpu`` and a temporary base directory.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import torch
from safetensors.torch import load_file, save_file

SD15_UNET = dict(  # ComfyUI detects SD 1.5 by model_channels 320 and context_dim 768; depth is free
    sample_size=8, block_out_channels=(320, 640), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=8,
)
# ComfyUI's layout of that UNet (transformer_depth_output is read from the end by comfy.utils.unet_to_diffusers)
SD15_COMFY_LAYOUT = {"num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 0], "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 1}


def comfyui_dir() -> str | None:
    path = os.environ.get("COMFYUI_DIR")
    return path if path and os.path.isfile(os.path.join(path, "main.py")) else None


def _import_comfy():
    root = comfyui_dir()
    if root is None:
        raise RuntimeError("set COMFYUI_DIR to a ComfyUI checkout")
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    try:
        import comfy.utils
    except ModuleNotFoundError as error:  # this process writes checkpoints with ComfyUI's own key layout
        raise RuntimeError(f"this Python imports ComfyUI's comfy.utils from {root} and needs {error.name!r}: "
                           f"pip install {error.name}") from error

    return comfy


def sd15_unet(seed: int = 0):
    """A random SD 1.5-shaped diffusers UNet (weights scaled so that outputs stay O(1))."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("weight") and p.ndim > 1:
                p.mul_(0.5)
    return unet


def write_sd15_checkpoint(path: str, unet, seed: int = 0) -> str:
    """A single-file SD 1.5 checkpoint for ComfyUI's CheckpointLoaderSimple: ``unet`` in ComfyUI's (LDM) layout, a
    random full-size CLIP-L text encoder (ComfyUI's is fixed-size) and a random tiny TAESD-layout VAE."""
    comfy = _import_comfy()
    import comfy.taesd.taesd  # noqa: F811  (a submodule of the package _import_comfy returns)
    from transformers import CLIPTextConfig, CLIPTextModel

    names = comfy.utils.unet_to_diffusers(SD15_COMFY_LAYOUT)
    tensors = {f"model.diffusion_model.{names[k]}": v.contiguous() for k, v in unet.state_dict().items()}
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                        max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"))
    tensors.update({f"cond_stage_model.transformer.{k}": v.half().contiguous() for k, v in clip.state_dict().items()})
    vae = comfy.taesd.taesd.TAESD()
    for p in vae.parameters():
        torch.nn.init.normal_(p, std=0.02)
    tensors.update({f"first_stage_model.{k}": v.contiguous() for k, v in vae.state_dict().items()})
    save_file(tensors, path)
    return path


TORCHVISION_STANDIN = '''"""Import stand-in for torchvision, written by onestep_pipelines.testing.comfyui for a ComfyUI server on a CPU-only
torch whose published torchvision wheel does not import. Every ``torchvision.*`` module imports; every attribute is
an inert placeholder. Nothing of torchvision works: the random-weight test workflows never use it."""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+standin"


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls

    def __call__(cls, *args, **kwargs):
        raise RuntimeError("torchvision is a stand-in here (onestep_pipelines.testing.comfyui)")

    def __iter__(cls):
        return iter(())


class placeholder(metaclass=_Placeholder):
    pass


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return placeholder


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = __getattr__
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
'''


def torchvision_standin(python: str, folder: str) -> str | None:
    """A folder to put on the server's PYTHONPATH when ``python`` cannot import torchvision (None when it can)."""
    if subprocess.run([python, "-c", "import torchvision"], capture_output=True).returncode == 0:
        return None
    os.makedirs(os.path.join(folder, "torchvision"), exist_ok=True)
    with open(os.path.join(folder, "torchvision", "__init__.py"), "w") as f:
        f.write(TORCHVISION_STANDIN)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``with ComfyServer(base_dir) as server:`` starts ComfyUI on 127.0.0.1 (CPU) with ``base_dir`` as its base
    directory (models/, custom_nodes/, output/ inside it) and stops it on exit."""

    def __init__(self, base_dir: str, python: str | None = None, timeout: float = 240.0, pythonpath: tuple[str, ...] = (),
                 forget_installed: bool = False):
        """``pythonpath``: folders put first on the server's ``PYTHONPATH``; ``forget_installed``: the server ignores an
        installed onestep-pipelines (a test of a checkout or a wheel folder on ``pythonpath``)."""
        self.base_dir, self.timeout = base_dir, timeout
        self.pythonpath, self.forget_installed = tuple(pythonpath), forget_installed
        self.python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base_dir, "server.log")

    def __enter__(self):
        flags = ["--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", self.base_dir,
                 "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
        args = [self.python, "main.py", *flags]
        if self.forget_installed:
            from .checkout import FORGET_INSTALLED

            args = [self.python, "-c", FORGET_INSTALLED + f"import runpy\nsys.argv = ['main.py', *{flags!r}]\nrunpy.run_path('main.py', run_name='__main__')\n"]
        self.log = open(self.log_path, "w")
        env = dict(os.environ)
        standin = torchvision_standin(self.python, os.path.join(self.base_dir, ".standin"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*self.pythonpath, standin, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(args, cwd=comfyui_dir(), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.read_log()[-4000:]}")
            try:
                self.get("/object_info/KSampler")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"ComfyUI did not answer within {self.timeout} s:\n{self.read_log()[-4000:]}")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()

    def read_log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def custom_node_import_seconds(self) -> dict[str, float]:
        """ComfyUI's own start-up measure, ``{custom node path: seconds}`` from its "Import times for custom nodes"
        lines (one decimal; import, ``comfy_entrypoint``, node list and schemas)."""
        found = re.findall(r"^\s*([\d.]+) seconds(?: \(IMPORT FAILED\))?: (.+)$", self.read_log(), flags=re.M)
        return {path.strip(): float(seconds) for seconds, path in found}

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return response.status, json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue an API-format workflow and wait for it; returns its /history entry (``status``, ``outputs``).
        A workflow ComfyUI refuses at validation raises ValueError with ComfyUI's answer."""
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise ValueError(f"ComfyUI refused the workflow ({status}): {json.dumps(answer)[:2000]}")
        prompt_id = answer["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(f"workflow {prompt_id} did not finish in {timeout} s")

    def output_path(self, *parts: str) -> str:
        return os.path.join(self.base_dir, "output", *parts)

    def latent(self, entry: dict, node: str) -> torch.Tensor:
        """The tensor a SaveLatent node of a finished workflow wrote."""
        item = entry["outputs"][node]["latents"][0]
        return load_file(self.output_path(item.get("subfolder", ""), item["filename"]))["latent_tensor"]


def execution_error(entry: dict) -> str | None:
    """ComfyUI's message for a workflow that failed while running, or None."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()}"
    return None


# ----------------------------------------------------------------------------- what a node pack adds to a start
# Modules a node pack must not import while ComfyUI starts: they cost seconds and only some nodes need them, at run time.
HEAVY_MODULES = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "sklearn", "matplotlib", "onestep_pipelines.pipelines",
                 "onestep_pipelines.students", "onestep_pipelines.models", "onestep_pipelines.schedulers", "onestep_pipelines.metadata",
                 "onestep_pipelines.training", "onestep_pipelines.hub")
# Packages whose submodules are heavy but whose __init__ is not: onestep_pipelines.benchmark's holds the shipped teachers'
# names and folders (the bridge node lists them), its submodules the data and metrics (scikit-learn).
HEAVY_SUBMODULES = ("onestep_pipelines.benchmark",)

_LOAD_NODE_PACK = """
import asyncio, json, sys, time
pack = sys.argv[1]
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import nodes  # what the server has imported before it loads custom nodes (torch, comfy, comfy_api, folder_paths)
from comfy_config import config_parser  # noqa: F401  (imported by ComfyUI's loader for its built-in nodes first)
before = set(sys.modules)
start = time.perf_counter()
loaded = asyncio.run(nodes.load_custom_node(pack, set(nodes.NODE_CLASS_MAPPINGS)))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "loaded": loaded, "nodes": sorted(nodes.NODE_CLASS_MAPPINGS), "modules": sorted(set(sys.modules) - before)}))
"""


def node_pack_start_cost(pack: str, python: str | None = None, pythonpath: tuple[str, ...] = (), forget_installed: bool = False) -> dict:
    """What loading the custom node ``pack`` (a folder or ``.py`` file) adds to a ComfyUI start, measured as ComfyUI's
    "Import times for custom nodes" measures it (``nodes.load_custom_node``: import, ``comfy_entrypoint``, node list,
    every schema), in a fresh process that has already imported what the server imports before custom nodes.

    Returns ``{"seconds", "loaded", "nodes": node ids registered, "modules": modules the pack imported}``; ``heavy``
    lists those of :data:`HEAVY_MODULES` (and their submodules) and the submodules of :data:`HEAVY_SUBMODULES` among them."""
    python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
    code = _LOAD_NODE_PACK
    if forget_installed:
        from .checkout import FORGET_INSTALLED

        code = FORGET_INSTALLED + code
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ)
        standin = torchvision_standin(python, folder)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*pythonpath, standin, env.get("PYTHONPATH")) if p)
        out = subprocess.run([python, "-c", code, os.path.abspath(pack)], cwd=comfyui_dir(), env=env, capture_output=True, text=True,
                             timeout=600)
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"loading {pack} in ComfyUI failed ({out.returncode}):\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["heavy"] = [m for m in result["modules"] if m in HEAVY_MODULES or m.startswith(tuple(f"{h}." for h in HEAVY_MODULES + HEAVY_SUBMODULES))]
    return result
