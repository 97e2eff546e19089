"""Analytic parameter and FLOP counts, so throughput can be reported as MFU without building a model."""

from __future__ import annotations

from stalwart.model.args import ModelArgs


def _layer_params(args: ModelArgs) -> int:
    q_and_o = 2 * args.dim * args.n_heads * args.head_dim
    k_and_v = 2 * args.dim * args.n_kv_heads * args.head_dim
    swiglu = 3 * args.dim * args.ffn_hidden_dim
    norms = 2 * args.dim
    return q_and_o + k_and_v + swiglu + norms


def _embedding_params(args: ModelArgs) -> int:
    return args.vocab_size * args.dim


def count_params(args: ModelArgs) -> int:
    """Total parameters; a tied embedding/output matrix is counted once."""
    output = 0 if args.tie_embeddings else _embedding_params(args)
    return _embedding_params(args) + args.n_layers * _layer_params(args) + args.dim + output


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6*N' for the matmuls plus 12*L*H*Dh*S for attention scores.

    N' excludes the input embedding lookup (a gather, not a matmul) but keeps the
    output projection; with tied embeddings the shared matrix counts once, as the
    output projection.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    matmul_params = count_params(args) - (0 if args.tie_embeddings else _embedding_params(args))
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return float(6 * matmul_params + attention)


def mfu(tokens_per_second: float, args: ModelArgs, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved training FLOP/s over `peak_flops` (same device count)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive (FLOP/s of the devices measured), got {peak_flops}")
    return tokens_per_second * flops_per_token(args, seq_len) / peak_flops
