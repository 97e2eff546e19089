"""The one place where parallel techniques are applied to a model, in a fixed order."""

from __future__ import annotations

import torch
from torch import nn
from stalwart.parallel.data_parallel import apply_ddp, apply_fsdp
from stalwart.parallel.dims import MeshRegistry, ParallelDims
from stalwart.parallel.tensor_parallel import apply_tp


def parallelize_model(model: nn.Module, dims: ParallelDims, mesh: MeshRegistry | None, param_dtype: torch.dtype) -> nn.Module:
    """Apply every enabled technique by mesh name, in a fixed order.

    Order matters: TP, CP, activation checkpointing, compile, then data parallelism last,
    because FSDP must wrap the already-transformed blocks. With TP the logits come back
    vocab-sharded (loss parallel): compute the loss inside ``loss_context(dims.tp > 1)``.
    """
    if mesh is None or dims.world_size == 1:
        return model
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], loss_parallel=True)
    if dims.dp_shard * dims.cp > 1:
        fsdp_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        apply_fsdp(model, fsdp_mesh, param_dtype=param_dtype, reduce_dtype=torch.float32)
    elif dims.dp_replicate > 1:
        apply_ddp(model, mesh["dp_replicate"])
    return model
