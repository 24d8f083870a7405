"""Start the trainer's worker processes the way ``accelerate launch --config_file F`` would, on CPU processes.

accelerate starts several processes only on accelerators (``launch --cpu`` runs one); the tests start CPU workers
with ``torchrun`` instead and give them the environment accelerate's launcher derives from the config file
(``ACCELERATE_*`` and ``FSDP_*`` variables), computed by accelerate's own launch code, so the shipped configs are the
ones under test.
"""

from __future__ import annotations

import os
import subprocess
import sys


def accelerate_env(config_file: str, num_processes: int) -> dict[str, str]:
    """The variables ``accelerate launch --config_file config_file`` sets for its workers (the ones it adds to the
    current environment)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", config_file, "--num_processes", str(num_processes), "-m", "onestep_pipelines.training.cli"]
    )
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_")) and os.environ.get(k) != v}


def run_cpu_workers(num_processes: int, argv: list[str], config_file: str | None = None, timeout: int = 600,
                    **env: str) -> subprocess.CompletedProcess:
    """``onestep-train`` with ``argv`` on ``num_processes`` CPU processes (gloo), under ``config_file``'s engine
    (DDP without one), with ``env`` on top. Full precision unless ``env`` says otherwise, one thread per process."""
    variables = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    if config_file:
        variables.update(accelerate_env(config_file, num_processes))
    variables.update({"ACCELERATE_MIXED_PRECISION": "no", **env})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
               "-m", "onestep_pipelines.training.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=variables)
