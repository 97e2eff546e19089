"""Llama 3 decoder as in Meta's reference implementation, shaped for later parallelism.

Nothing here knows about parallelism; the code only keeps the seams that the
parallel plans need: head counts inferred with `-1` (tensor parallelism shards
heads), the attention kernel as a replaceable `core` submodule (context
parallelism), explicit rope `positions` (non-contiguous sequence chunks), layers in
a `ModuleDict` and optional `tok_embeddings`/`norm`/`output` (pipeline stages).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stalwart.model.args import ModelArgs
from stalwart.model.rope import apply_rotary_emb, precompute_rope_cache

_BASE_INIT_STD = 0.02
_TRUNC_CUTOFF = 3.0


def _trunc_normal_(weight: Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-_TRUNC_CUTOFF * std, b=_TRUNC_CUTOFF * std)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, cast back before the learned scale (as Meta does)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class CausalAttentionCore(nn.Module):
    """Causal scaled-dot-product attention over already-rotated q/k/v.

    Contract (relied on by context parallelism, which swaps `block.attention.core`
    for a module that all-gathers k/v along the sequence before attending):

    - ``q``: [bs, n_heads_local, S, head_dim]; ``k``, ``v``: [bs, n_kv_heads_local, S, head_dim],
      i.e. *before* grouped-query repetition; rotary embeddings are already applied.
    - The core repeats each kv head ``n_heads_local // n_kv_heads_local`` times
      (consecutive query heads share a kv head) and applies a causal mask.
    - Returns [bs, n_heads_local, S, head_dim].
    """

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n_rep = q.shape[1] // k.shape[1]
        k = repeat_kv(k, n_rep)
        v = repeat_kv(v, n_rep)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[bs, n_kv, S, D] -> [bs, n_kv * n_rep, S, D], each kv head repeated consecutively."""
    if n_rep == 1:
        return x
    bs, n_kv, seqlen, head_dim = x.shape
    return x[:, :, None].expand(bs, n_kv, n_rep, seqlen, head_dim).reshape(bs, n_kv * n_rep, seqlen, head_dim)


class Attention(nn.Module):
    """Grouped-query self-attention; head counts come from tensor shapes so TP can shard them."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.core = CausalAttentionCore()

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        """rope holds at least one row per position of x; the first ``seqlen`` rows are used."""
        bs, seqlen, _ = x.shape
        if rope.shape[0] < seqlen:
            raise ValueError(
                f"sequence length {seqlen} exceeds the {rope.shape[0]} rope rows given (max_seq_len or positions); "
                "raise ModelArgs.max_seq_len (dataclasses.replace) or shorten the sequence"
            )
        rope = rope[:seqlen]
        q = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        q = apply_rotary_emb(q, rope)
        k = apply_rotary_emb(k, rope)
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))

    def init_weights(self, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            _trunc_normal_(linear.weight, _BASE_INIT_STD)
        _trunc_normal_(self.wo.weight, out_std)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, out_std: float) -> None:
        _trunc_normal_(self.w1.weight, _BASE_INIT_STD)
        _trunc_normal_(self.w2.weight, out_std)
        _trunc_normal_(self.w3.weight, out_std)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention then SwiGLU."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        """Residual-output projections get a depth-scaled std so deep stacks start stable."""
        out_std = _BASE_INIT_STD / math.sqrt(2 * (self.layer_id + 1))
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(out_std)
        self.feed_forward.init_weights(out_std)


class Transformer(nn.Module):
    """Llama 3 decoder. Pipeline stages may delete layers or set the ends to None."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, eps=args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope_cache: Tensor
        self.init_buffers()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the output projection when `tie_embeddings`.

        Device moves (`to_empty`, `.to`) replace parameters one module at a time and
        so break sharing; `init_weights` calls this again to restore it.
        """
        if self.args.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def init_buffers(self) -> None:
        """(Re)compute the fp32 rope table on the buffer's current device (it is not checkpointed)."""
        existing = getattr(self, "rope_cache", None)
        device = existing.device if existing is not None else None
        args = self.args
        cache = precompute_rope_cache(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling)
        self.register_buffer("rope_cache", cache.to(device), persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter and buffer in place, e.g. after `to_empty` from meta.

        `seed` seeds torch's global RNG (all devices), so every rank draws the same
        values and sharded initialisation stays consistent.
        """
        if seed is not None:
            torch.manual_seed(seed)
        self.tie_weights()
        self.init_buffers()
        if self.tok_embeddings is not None:
            _trunc_normal_(self.tok_embeddings.weight, _BASE_INIT_STD)
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not self._output_is_tied():
            _trunc_normal_(self.output.weight, self.args.dim**-0.5)

    def _output_is_tied(self) -> bool:
        return (
            self.tok_embeddings is not None
            and self.output is not None
            and (self.output.weight is self.tok_embeddings.weight)
        )

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """tokens [bs, S] int64 (or hidden states [bs, S, dim] on a stage without embeddings).

        positions [S] int64 picks the rope rows for each sequence slot; without them every
        attention layer takes the first S rows of the table, S being the sequence length it
        sees (so a layer whose input was sharded along the sequence still gets the full rows).
        Returns logits [bs, S, vocab] or hidden states on a stage without `output`.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:
            rope = self.rope_cache
        else:
            if positions.ndim != 1:
                raise ValueError(
                    f"positions must be a 1-D tensor of sequence positions, got shape {tuple(positions.shape)}"
                )
            rope = self.rope_cache[positions]
        for layer in self.layers.values():
            h = layer(h, rope)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h
