"""The project's one training loss, correct for plain logits and for vocab-sharded DTensor logits.

With tensor parallelism and ``loss_parallel`` the output projection leaves the logits sharded on
the vocabulary dimension (``Shard(-1)``); torch's ``loss_parallel()`` context then computes the
cross-entropy with per-shard softmax statistics instead of all-gathering the full logits. The
same function serves every layout so the trainer never branches on the parallelism.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

# fp32 elements of one chunk's logits (1 GiB): 2,048 tokens of Llama 3's 128,256-id vocabulary.
CHUNK_ELEMENTS = 2**28


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
    if not isinstance(logits, DTensor) and logits.dtype != torch.float32:
        return chunked_cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))
    if isinstance(loss, DTensor):
        # A replicated DTensor: every TP rank already holds the full value. ``to_local`` is
        # differentiable and hands a replicated gradient back to the sharded computation.
        loss = loss.to_local()
    return loss


def chunked_cross_entropy(logits: Tensor, labels: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """Mean cross-entropy in fp32 of low-precision logits [tokens, vocab], one chunk of tokens at a time.

    Upcasting bf16 logits of a 128K vocabulary whole costs 2 x 4 bytes per logit (the fp32 copy and the
    log-softmax autograd keeps): 17 GB for 4 x 4096 tokens. Each chunk here is recomputed in backward
    (activation checkpointing), so autograd keeps only the bf16 logits and fp32 lives one chunk at a time.
    Same value as the whole-vocabulary loss up to fp32 summation order; ``ignore_index`` (-100) is honoured.
    """
    tokens = max(1, chunk_elements // logits.shape[-1])
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], tokens):
        piece = slice(start, start + tokens)
        total = total + checkpoint(_summed_cross_entropy, logits[piece], labels[piece], use_reentrant=False)
    return total / (labels != -100).sum()


def _summed_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum")
