"""Process-group start-up from the torchrun / elastic-agent environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError('training.device = "cuda" but no CUDA device is visible; use "cpu" or "auto"')
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """CPU ranks use gloo; CUDA ranks get NCCL for tensors plus gloo for CPU-side collectives
    (async checkpointing and the step's flags need a CPU-capable group)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(
    requested_device: str = "auto", timeout_s: float = 300.0, store: dist.Store | None = None
) -> DistEnv:
    """Join the job's process group when launched by torchrun or the elastic agent.

    One process without the launcher's environment is a world of one and creates no group.
    ``store`` (a prefix of the launcher's job store) replaces the ``env://`` rendezvous, whose store
    lives in rank 0 and would die with it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        where = {} if store is None else {"store": store, "rank": rank, "world_size": world_size}
        dist.init_process_group(backend=backend_for(device), timeout=timedelta(seconds=timeout_s), **where)
    return DistEnv(rank, world_size, local_rank, local_world_size, device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
