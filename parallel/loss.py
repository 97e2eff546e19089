"""The project's one training loss, correct for plain logits and for vocab-sharded DTensor logits.

With tensor parallelism and ``loss_parallel`` the output projection leaves the logits sharded on
the vocabulary dimension (``Shard(-1)``); torch's ``loss_parallel()`` context then computes the
cross-entropy with per-shard softmax statistics instead of all-gathering the full logits. The
same function serves every layout so the trainer never branches on the parallelism.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor


def loss_context(enabled: bool) -> AbstractContextManager[None]:
    """``loss_parallel()`` when the logits are vocab-sharded, else a no-op.

    Both the forward loss computation and its ``backward()`` must run inside this context.
    """
    if enabled:
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return contextlib.nullcontext()


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over all tokens, in fp32; logits [bs, S, vocab], labels [bs, S].

    Always returns a plain tensor scalar, so callers can accumulate and all-reduce it. Vocab-sharded
    DTensor logits must be passed inside ``loss_context(True)`` (forward and backward); the result is
    then replicated over the TP ranks and its local value is the global loss.
    """
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))
    if isinstance(loss, DTensor):
        # A replicated DTensor: every TP rank already holds the full value. ``to_local`` is
        # differentiable and hands a replicated gradient back to the sharded computation.
        loss = loss.to_local()
    return loss
