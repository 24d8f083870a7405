"""The random numbers of one micro-batch, the same whatever the number of processes and wherever a run resumes."""

from __future__ import annotations

import numpy as np
import torch


class Draws:
    """Random numbers for one micro-batch of one update.

    Its generators are seeded from ``(seed, update, micro-batch)`` alone, so a resumed run continues exactly. Every
    process draws the numbers of the whole global batch (``batch_size * world_size`` samples) and keeps its own slice,
    so the samples of an update do not depend on how many processes share it (a checkpoint resumes exactly on another
    world size). Per-sample numbers are drawn on the training device: no host-to-device copy and no synchronisation in
    the loop. Numbers the host needs (one random segment of a roll-out for the whole batch, indices into data kept on
    the host) come from a second, CPU generator.
    """

    def __init__(self, seed: int, update: int, micro: int, batch_size: int, device, rank: int = 0, world_size: int = 1):
        device_seed, host_seed = np.random.SeedSequence([seed, update, micro]).generate_state(2)
        self.update, self.micro = update, micro  # (0-based) which update and which of its micro-batches
        self.device = torch.device(device)
        self.batch_size, self.global_batch_size = batch_size, batch_size * world_size
        self.local = slice(rank * batch_size, (rank + 1) * batch_size)
        self.generator = torch.Generator(device=self.device).manual_seed(int(device_seed))
        self.host_generator = torch.Generator().manual_seed(int(host_seed))

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal ``(batch_size, *shape)`` on the device."""
        return torch.randn((self.global_batch_size, *shape), generator=self.generator, device=self.device, dtype=dtype)[self.local]

    def normal_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal shaped like the local batch ``x`` (float32, on the device)."""
        return self.normal(*x.shape[1:])

    def uniform(self) -> torch.Tensor:
        """``U[0, 1)`` per sample, float32 on the device."""
        return torch.rand(self.global_batch_size, generator=self.generator, device=self.device)[self.local]

    def integers(self, high: int) -> torch.Tensor:
        """Integers in ``[0, high)`` per sample (int64, on the device)."""
        return torch.randint(0, high, (self.global_batch_size,), generator=self.generator, device=self.device)[self.local]

    def host_integers(self, high: int) -> torch.Tensor:
        """Integers in ``[0, high)`` per sample, on the host (to index data kept in host memory)."""
        return torch.randint(0, high, (self.global_batch_size,), generator=self.host_generator)[self.local]

    def host_integer(self, low: int, high: int) -> int:
        """One integer in ``[low, high)`` for the whole batch, the same on every process."""
        return int(torch.randint(low, high, (1,), generator=self.host_generator))
