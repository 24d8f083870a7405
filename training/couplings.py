"""Couplings of a teacher's ODE: ``(noise, sample, conditions)`` triples cached on disk, for reflow.

The teacher's probability-flow ODE maps noise ``e`` to a sample ``x`` deterministically; a 2-rectified flow is trained
on these pairs instead of independent (data, noise) draws (Liu et al. 2022). Generating them is most of reflow's cost,
so they are written once, in chunks of :data:`CHUNK` couplings (``chunk-00000.safetensors``, ...; each written to a
temporary name and renamed, so a chunk on disk is whole), and reused: a stopped run skips the chunks it has, a second
run (a longer one, or the 1-step distillation of the reflowed model) passes the same ``--coupling-dir``. Each chunk
records what made it (teacher, ODE steps, guidance, seed, shape); a folder made otherwise is refused, naming the
option that differs. Chunk ``k``'s noise and conditions are drawn from ``(seed, k)`` alone, so the couplings do not
depend on the number of processes (process ``p`` of ``N`` writes the chunks ``k = p mod N``).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from onestep_pipelines.pipelines.loading import atomic_path

from .draws import Draws

CHUNK = 1024
CHUNK_SEED_OFFSET = 2**31  # chunk k draws from update number 2**31 + k: never a training update's draws


def chunk_name(k: int) -> str:
    return f"chunk-{k:05d}.safetensors"


def coupling_recipe(teacher, config) -> dict[str, str]:
    """What makes a chunk: it must match for a chunk to be reused (safetensors metadata holds strings)."""
    return {"teacher": str(teacher.source), "ode_steps": str(config.ode_steps), "guidance_scale": repr(float(config.guidance_scale)),
            "seed": str(config.seed), "shape": json.dumps(list(teacher.sample_shape))}


def _read_recipe(path: str) -> dict:
    try:
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except Exception as error:  # a file that is not safetensors, or truncated by hand
        raise ValueError(f"--coupling-dir: {path} is not a readable safetensors file ({error}); delete it to regenerate it.") from None


def check_chunk(path: str, recipe: dict) -> None:
    found = _read_recipe(path)
    names = {"teacher": "--teacher", "ode_steps": "--ode-steps", "guidance_scale": "--guidance-scale", "seed": "--seed", "shape": "the sample shape"}
    for key, name in names.items():
        if found.get(key) != recipe[key]:
            raise ValueError(f"--coupling-dir {os.path.dirname(path)} holds couplings made with {name} {found.get(key)!r}, not {recipe[key]!r}: "
                             f"pass another --coupling-dir, or the options that made them.")


def build_couplings(method, folder: str, count: int, accelerator) -> "Couplings":
    """Generate the missing chunks of ``count`` couplings into ``folder`` (every process its share), then load all."""
    teacher, config = method.teacher, method.config
    recipe = coupling_recipe(teacher, config)
    os.makedirs(folder, exist_ok=True)
    chunks = (count + CHUNK - 1) // CHUNK
    for k in range(chunks):
        path = os.path.join(folder, chunk_name(k))
        if os.path.isfile(path):
            check_chunk(path, recipe)
    missing = [k for k in range(chunks) if not os.path.isfile(os.path.join(folder, chunk_name(k)))]
    mine = missing[accelerator.process_index :: accelerator.num_processes]
    if missing:
        accelerator.print(f"reflow: generating {len(missing) * CHUNK} couplings with the teacher's {config.ode_steps}-step Euler ODE into {folder}")
    times = method.ode_times()
    for k in mine:
        rng = Draws(config.seed, CHUNK_SEED_OFFSET + k, 0, CHUNK, accelerator.device)
        noise = rng.normal(*teacher.sample_shape)
        conditions = teacher.sample_conditions(rng)
        samples = []
        for start in range(0, CHUNK, config.batch_size):
            part = slice(start, start + config.batch_size)
            with accelerator.autocast():
                samples.append(method.rollout(noise[part], {c: v[part] for c, v in conditions.items()}, len(times) - 1, rng,
                                              model=teacher.model, times=times, guidance_scale=config.guidance_scale).float())
        tensors = {"noise": noise, "sample": torch.cat(samples)} | {f"condition.{c}": v for c, v in conditions.items()}
        with atomic_path(os.path.join(folder, chunk_name(k))) as tmp:
            save_file({n: v.detach().cpu().contiguous() for n, v in tensors.items()}, tmp, metadata=recipe | {"chunk": str(k)})
    accelerator.wait_for_everyone()
    return Couplings.load(folder, chunks, count, accelerator.device)


class Couplings:
    """The couplings in host memory; ``batch(rng)`` draws a training batch of them (through pinned memory on CUDA)."""

    def __init__(self, noise: torch.Tensor, samples: torch.Tensor, conditions: dict[str, torch.Tensor], device):
        self.noise, self.samples, self.conditions = noise, samples, conditions
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.noise)

    @classmethod
    def load(cls, folder: str, chunks: int, count: int, device) -> "Couplings":
        parts: dict[str, list[torch.Tensor]] = {}
        for k in range(chunks):
            with safe_open(os.path.join(folder, chunk_name(k)), "pt") as f:
                for name in f.keys():
                    parts.setdefault(name, []).append(f.get_tensor(name))
        whole = {name: torch.cat(values)[:count] for name, values in parts.items()}
        conditions = {name.split(".", 1)[1]: v for name, v in whole.items() if name.startswith("condition.")}
        return cls(whole["noise"], whole["sample"], conditions, device)

    def batch(self, rng) -> dict:
        idx = rng.host_integers(len(self))
        cuda = self.device.type == "cuda"
        move = lambda t: (t[idx].pin_memory() if cuda else t[idx]).to(self.device, non_blocking=True)  # noqa: E731
        return {"noise": move(self.noise), "images": move(self.samples), "conditions": {c: move(v) for c, v in self.conditions.items()}}
