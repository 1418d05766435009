"""Training under torchrun: one process per device, torch DistributedDataParallel, NCCL on CUDA and gloo on CPU.

Without torchrun (no ``WORLD_SIZE`` above 1 in the environment) nothing here does anything, so the same commands
behave as in one process. ``--batch-size`` stays the global batch: each of N processes takes 1/N of every batch
(``DistributedSampler``'s split of the same seeded permutation), so N processes step as one would on the same
images, and a checkpoint does not depend on how many processes wrote it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nas._schema import SpecError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes checkpoints and reports progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place among torchrun's (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process otherwise."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise SpecError("", "RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)",
                        source="environment") from None


def join(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group (once per process) and return this process's device: ``cuda:LOCAL_RANK`` for
    CUDA, so N processes on one machine use its N GPUs."""
    w = world()
    if not w.distributed:
        return w, device
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return w, device


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all processes (the values themselves in one process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def leave() -> None:
    """Leave the process group, if this process joined one (torch warns at exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
