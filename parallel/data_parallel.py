"""Data parallelism: FSDP2 through ``fully_shard``; replicas are HSDP (a shard group of one for plain DP)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> None:
    """Shard every transformer block, then the root (embedding, norm, output) over ``mesh``.

    ``mesh`` is 1-D (``dp_shard_cp``) for FSDP or 2-D (``dp_replicate``, ``dp_shard_cp``) for
    HSDP. Master weights stay fp32; ``param_dtype`` is the compute dtype (bf16 on GPU).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root keeps its parameters gathered after forward: backward needs them right away.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
