"""``torch.compile`` per transformer block.

Blocks are compiled one by one (not the whole model) so that every block reuses the same
compiled graph, compile time stays flat in depth, and FSDP can still hook each block for its
all-gather and reduce-scatter. ``nn.Module.compile`` compiles in place: parameter names, and with
them checkpoints, are unchanged.
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, backend: str = "inductor", fullgraph: bool = True) -> None:
    """Compile each block of ``model.layers`` (after TP/CP/AC, before FSDP wraps them)."""
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=fullgraph)
