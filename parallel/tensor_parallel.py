"""Tensor parallelism with sequence parallelism and loss parallelism, the TorchTitan plan.

Between blocks the residual stream is a DTensor sharded on the sequence (``Shard(1)``): norms run
on sequence shards (``SequenceParallel``), attention and the MLP all-gather the sequence, shard
heads / hidden width column-wise and reduce-scatter back to sequence shards in ``wo`` / ``w2``.
The output projection shards the vocabulary; with ``loss_parallel`` the logits stay sharded and
``stalwart.parallel.loss.cross_entropy_loss`` consumes them under ``loss_context(True)``.

As in TorchTitan, the residual stream between modules is the plain local shard: pipeline stages
send and receive plain tensors, and attention takes its rope rows from the full sequence it sees
after ``PrepareModuleInput`` has gathered it. Layout checks live in ``ParallelDims.validate_model``
and run before any process group exists.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from stalwart.model.llama import Transformer


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool = True) -> None:
    """Shard ``model`` in place over the 1-D ``tp_mesh``; call before FSDP and before building the optimizer.

    ``loss_parallel=True`` leaves the logits as a vocab-sharded DTensor (``Shard(-1)``) that must
    go through ``cross_entropy_loss`` inside ``loss_context(True)``; ``False`` returns full
    plain-tensor logits (all-gathered over TP). Tied embeddings stay tied: both ends shard the
    ``[vocab, dim]`` matrix on the vocabulary, so one DTensor parameter serves both.
    """
    tied = model._output_is_tied()
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=True
        )
    if model.norm is not None:
        top_plan["norm"] = SequenceParallel()
    if model.output is not None:
        top_plan["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    # src_data_rank=None: every rank holds the same initial weights (same seed), so each takes its own
    # shard without a broadcast; a replacement rank can then build its model while its peers are busy.
    parallelize_module(model, tp_mesh, top_plan, src_data_rank=None)

    for block in model.layers.values():
        block_plan = {
            "attention_norm": SequenceParallel(),
            # Second argument: the rope rows, a plain tensor every rank computes in full.
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1), use_local_output=True),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1), use_local_output=True),
        }
        parallelize_module(block, tp_mesh, block_plan, src_data_rank=None)

    if tied:
        # parallelize_module replaced each module's weight with its own DTensor copy; share one again.
        model.tie_weights()
