"""Rank functions for test_tensor_parallel.py: TP (and DP × TP) training vs. the single-process reference.

Each function trains the parallel model and, in the same process, the plain reference on the same
seed and batches, and returns both ``RunResult``s so the test process does the comparison. Several
variants share one process group to save process start-ups on the shared test machine.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from parity import SEED, RunResult, debug_args, make_batches, parallel_run, reference_run
from torch.distributed.tensor import DTensor

from stalwart.model.llama import Transformer
from stalwart.parallel.data_parallel import apply_fsdp
from stalwart.parallel.dims import ParallelDims
from stalwart.parallel.tensor_parallel import apply_tp
from stalwart.runtime.train import build_model


def _placements(model: Transformer) -> dict[str, tuple]:
    return {name: tuple(p.placements) for name, p in model.named_parameters() if isinstance(p, DTensor)}


def _logits_layout(model: Transformer, inputs: torch.Tensor) -> tuple[str, tuple, tuple[int, ...]]:
    with torch.no_grad():
        logits = model(inputs)
    if isinstance(logits, DTensor):
        return "dtensor", tuple(logits.placements), tuple(logits.to_local().shape)
    return "tensor", (), tuple(logits.shape)


def tp_variants_vs_reference(dp_shard: int, tp: int, variants: list[dict]) -> list[dict]:
    """For each variant (``loss_parallel``, ``tie_embeddings``): dp_shard × tp training and the reference.

    With ``dp_shard > 1`` TP is applied first, then FSDP over ``dp_shard_cp``; each dp rank trains
    on its half of every global batch.
    """
    mesh = ParallelDims.resolve(1, dp_shard, 1, tp, 1, dist.get_world_size()).build_mesh("cpu")
    dp_mesh = mesh["dp_shard_cp"] if dp_shard > 1 else None
    references: dict[bool, RunResult] = {}
    out = []
    for variant in variants:
        tied, loss_parallel = variant.get("tie_embeddings", False), variant["loss_parallel"]
        args = dataclasses.replace(debug_args(n_layers=2), tie_embeddings=tied)
        batches = make_batches(args.vocab_size)
        model = build_model(args, torch.device("cpu"), SEED)
        apply_tp(model, mesh["tp"], loss_parallel=loss_parallel)
        placements = _placements(model)
        layout = _logits_layout(model, batches[0][0])
        if dp_mesh is not None:
            apply_fsdp(model, dp_mesh)
        got = parallel_run(model, batches, loss_parallel=loss_parallel, dp_mesh=dp_mesh)
        if tied not in references:
            references[tied] = reference_run(args, batches)
        out.append(
            {
                "got": got,
                "ref": references[tied],
                "placements": placements,
                "logits": layout,
                "still_tied": model.output.weight is model.tok_embeddings.weight,
            }
        )
    return out
