"""Activation checkpointing per transformer block: trade recomputation for activation memory.

Modes (``training.activation_checkpoint``):

- ``full``: every block keeps only its input; the whole block is recomputed in backward.
- ``selective-layer``: every ``every``-th block is checkpointed in full, the others keep all
  activations (a memory/compute dial with whole-block granularity).
- ``selective-op``: every block is checkpointed, but the outputs of the expensive ops (matmuls,
  attention kernels) are saved, so backward recomputes only the cheap elementwise ops and norms.

The blocks are wrapped in place (``checkpoint_wrapper``, non-reentrant). The wrapper's name never
reaches a checkpoint: ``get_model_state_dict`` strips it, so a checkpoint written with one mode
loads with any other.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from torch import nn

ActivationCheckpointMode = Literal["none", "full", "selective-layer", "selective-op"]

# The ops whose outputs selective-op AC keeps: recomputing them would cost as much as the forward,
# or (collectives under TP/CP) repeat the communication. Not every build has every kernel.
_SAVED_OP_NAMES = (
    ("aten", "mm"),
    ("aten", "addmm"),
    ("aten", "bmm"),
    ("aten", "_scaled_dot_product_flash_attention"),
    ("aten", "_scaled_dot_product_efficient_attention"),
    ("aten", "_scaled_dot_product_cudnn_attention"),
    ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
    ("_c10d_functional", "reduce_scatter_tensor"),
    ("_c10d_functional", "all_gather_into_tensor"),
)
_SAVED_OPS: frozenset[Any] = frozenset(
    getattr(getattr(torch.ops, ns), name).default
    for ns, name in _SAVED_OP_NAMES
    if hasattr(getattr(torch.ops, ns), name)
)


def _save_expensive_ops(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _wrap(block: nn.Module, selective_ops: bool) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kwargs: dict[str, Any] = {"preserve_rng_state": False}
    if selective_ops:
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _save_expensive_ops)
    return checkpoint_wrapper(block, **kwargs)


def apply_ac(model: nn.Module, mode: ActivationCheckpointMode, every: int = 2) -> None:
    """Wrap ``model.layers`` blocks according to ``mode`` (``every`` applies to selective-layer).

    A pipeline stage holds only some of the layers; the counting for ``selective-layer`` uses the
    global layer index (the ModuleDict key), so the same blocks are checkpointed in any layout.
    """
    if mode == "none":
        return
    if mode not in ("full", "selective-layer", "selective-op"):
        raise ValueError(f"activation_checkpoint={mode!r}; choose none, full, selective-layer or selective-op")
    if mode == "selective-layer" and every < 1:
        raise ValueError(f"activation_checkpoint_every={every} must be >= 1 (1 checkpoints every block)")
    for name, block in list(model.layers.items()):
        if mode == "selective-layer" and int(name) % every != 0:
            continue
        model.layers[name] = _wrap(block, selective_ops=mode == "selective-op")
