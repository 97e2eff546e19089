"""The one place where parallel techniques are applied to a model, in a fixed order."""

from __future__ import annotations

import torch
from torch import nn

from stalwart.parallel.activation_checkpoint import ActivationCheckpointMode, apply_ac
from stalwart.parallel.compile import apply_compile
from stalwart.parallel.context_parallel import apply_cp
from stalwart.parallel.data_parallel import apply_fsdp
from stalwart.parallel.dims import MeshRegistry, ParallelDims
from stalwart.parallel.tensor_parallel import apply_tp


def parallelize_model(
    model: nn.Module,
    dims: ParallelDims,
    mesh: MeshRegistry | None,
    param_dtype: torch.dtype,
    seq_len: int,
    for_pipeline: bool = False,
    activation_checkpoint: ActivationCheckpointMode = "none",
    activation_checkpoint_every: int = 2,
    compile_backend: str | None = None,
) -> nn.Module:
    """Apply every enabled technique by mesh name, in a fixed order.

    With CP the inputs and labels of every microbatch must be cut with ``cp_shard``; the rope
    table already holds this rank's positions.

    Order matters: TP, CP, activation checkpointing, compile, then data parallelism last,
    because FSDP must wrap the already-transformed blocks. With TP the logits come back
    vocab-sharded (loss parallel) unless ``for_pipeline``: a pipeline's last stage computes the
    loss inside the schedule, on full logits. Pipeline stages keep FSDP parameters gathered
    between microbatches (``reshard_after_forward=False``), as the schedule runs many of them.
    ``compile_backend`` None leaves the blocks eager.
    """
    distributed = mesh is not None and dims.world_size > 1
    if distributed and dims.tp > 1:
        apply_tp(model, mesh["tp"], loss_parallel=not for_pipeline)
    if distributed and dims.cp > 1:
        apply_cp(model, mesh["cp"], seq_len)
    apply_ac(model, activation_checkpoint, activation_checkpoint_every)
    if compile_backend is not None:
        apply_compile(model, compile_backend)
    if not distributed:
        return model
    if dims.dp_shard * dims.cp > 1 or dims.dp_replicate > 1:
        # Replicas go through HSDP with a shard group of one, never DDP: DDP's hooks do not see
        # DTensor parameters (TP) and miss gradients produced inside a pipeline schedule, and its C++
        # reducer keeps its process group and broadcasts the parameters on its first forward, so it
        # could not take part in an in-process re-formation (parallel/reform.py).
        fsdp_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        apply_fsdp(
            model,
            fsdp_mesh,
            param_dtype=param_dtype,
            reduce_dtype=torch.float32,
            reshard_after_forward=not for_pipeline,
        )
    return model
