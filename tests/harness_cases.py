"""Rank functions for test_dist_harness.py (loaded by path in each rank process)."""

import torch
import torch.distributed as dist


def allreduce_rank() -> float:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank one")
    dist.barrier()
