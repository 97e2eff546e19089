"""Rank functions for test_context_parallel.py (loaded by path in each rank process)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from parity import SEED, RunResult, debug_args, make_batches, parallel_run

from stalwart.model.llama import CausalAttentionCore
from stalwart.parallel.context_parallel import ContextParallelAttention, apply_cp, cp_positions, cp_shard
from stalwart.parallel.data_parallel import apply_fsdp
from stalwart.parallel.dims import ParallelDims
from stalwart.parallel.tensor_parallel import apply_tp
from stalwart.runtime.train import build_model


def attention_vs_full(seq_len: int = 16, n_heads: int = 4, n_kv_heads: int = 2) -> dict[str, float]:
    """Max abs error of the local output and q/k/v gradients against full causal attention."""
    rank, cp = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, n_heads, seq_len, 8, generator=g, requires_grad=True)
    k = torch.randn(2, n_kv_heads, seq_len, 8, generator=g, requires_grad=True)
    v = torch.randn(2, n_kv_heads, seq_len, 8, generator=g, requires_grad=True)
    w = torch.randn(2, n_heads, seq_len, 8, generator=g)
    full = CausalAttentionCore()(q, k, v)
    (full * w).sum().backward()

    local = [t.detach().clone().requires_grad_() for t in cp_shard([q, k, v], rank, cp, seq_dim=2)]
    (w_local,) = cp_shard([w], rank, cp, seq_dim=2)
    out = ContextParallelAttention(dist.group.WORLD, rank, cp)(*local)
    (out * w_local).sum().backward()

    def err(got: torch.Tensor, want: torch.Tensor) -> float:
        (want_local,) = cp_shard([want], rank, cp, seq_dim=2)
        return (got - want_local).abs().max().item()

    return {
        "out": err(out, full.detach()),
        "dq": err(local[0].grad, q.grad),
        "dk": err(local[1].grad, k.grad),
        "dv": err(local[2].grad, v.grad),
    }


def cp_parity(dp_shard: int, cp: int, seq_len: int, tp: int = 1, steps: int = 5, batch: int = 4) -> RunResult:
    """Train the debug model with TP (if tp > 1), then CP over cp, then FSDP over dp_shard×cp.

    Each rank feeds its dp row slice, cp-sharded along the sequence, so the returned losses are
    this rank's local means; their average over all ranks (equal token counts) is the global
    loss. FSDP averages gradients over dp_shard_cp, which makes them the global-mean gradients.
    """
    dims = ParallelDims.resolve(1, dp_shard, cp, tp, 1, dist.get_world_size())
    mesh = dims.build_mesh("cpu")
    args = debug_args()
    model = build_model(args, torch.device("cpu"), SEED)
    if tp > 1:
        apply_tp(model, mesh["tp"], loss_parallel=True)
    apply_cp(model, mesh["cp"])
    apply_fsdp(model, mesh["dp_shard_cp"])

    dp_rank, cp_rank = mesh["dp"].get_local_rank(), mesh["cp"].get_local_rank()
    positions = cp_positions(seq_len, cp_rank, cp)
    local_batches = [
        tuple(cp_shard([inputs.chunk(dims.dp)[dp_rank], labels.chunk(dims.dp)[dp_rank]], cp_rank, cp))
        for inputs, labels in make_batches(args.vocab_size, steps=steps, batch=batch, seq_len=seq_len)
    ]
    return parallel_run(model, local_batches, loss_parallel=tp > 1, forward=lambda m, x: m(x, positions=positions))
