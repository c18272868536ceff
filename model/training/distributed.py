"""Distributed set-up: one code path for a laptop, one GPU and ``torchrun``.

``WORLD_SIZE`` > 1 (set by ``torchrun``) starts a process group (NCCL on GPUs, gloo on CPUs);
otherwise the run is a single process.  Rank 0 alone writes files.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from model.hardware import resolve_device

__all__ = ["DistributedContext", "init_distributed", "seed_everything"]


@dataclass(frozen=True)
class DistributedContext:
    """This process's rank among ``world_size`` and the device it trains on."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def single(cls, device: torch.device | None = None) -> DistributedContext:
        """A run of one process on ``device`` (default: the first GPU, else the CPU)."""
        return cls(0, 1, resolve_device("auto") if device is None else device)

    @property
    def main(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.world_size > 1:
            dist.barrier()


def init_distributed() -> DistributedContext:
    """Join the ``torchrun`` process group when there is one; pin this rank's GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext.single()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
