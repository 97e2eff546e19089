"""The one place where parallel techniques are applied to a model, in a fixed order."""

from __future__ import annotations

import torch
from torch import nn
from stalwart.parallel.data_parallel import apply_ddp, apply_fsdp
from stalwart.parallel.dims import MeshRegistry, ParallelDims


def parallelize_model(model: nn.Module, dims: ParallelDims, mesh: MeshRegistry | None, param_dtype: torch.dtype) -> nn.Module:
    """Apply data parallelism (FSDP/HSDP when sharding, else replication) by mesh name.

    Order matters and is fixed here: TP, CP, activation checkpointing, compile, then FSDP last,
    because FSDP must wrap the already-transformed blocks.
    """
    if mesh is None or dims.world_size == 1:
        return model
    if dims.dp_shard * dims.cp > 1:
        fsdp_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        apply_fsdp(model, fsdp_mesh, param_dtype=param_dtype, reduce_dtype=torch.float32)
    elif dims.dp_replicate > 1:
        apply_ddp(model, mesh["dp_replicate"])
    return model
