"""Rank functions for test_tensor_parallel.py: TP (and DP × TP) training vs. the single-process reference.

Each function trains the parallel model and, in the same process, the plain reference on the same
seed and batches, and returns both ``RunResult``s so the test process does the comparison.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from parity import RunResult, debug_args, full_state_dict, make_batches, parallel_run, reference_run
from stalwart.parallel.data_parallel import apply_fsdp
from stalwart.parallel.dims import ParallelDims
from stalwart.parallel.tensor_parallel import apply_tp
from stalwart.runtime.train import build_model
from parity import SEED


def tp_vs_reference(dp_shard: int, tp: int, loss_parallel: bool, tie_embeddings: bool = False) -> dict[str, RunResult]:
    """Train dp_shard × tp (FSDP over dp when dp_shard > 1) and the reference; both results."""
    args = dataclasses.replace(debug_args(n_layers=2), tie_embeddings=tie_embeddings)
    batches = make_batches(args.vocab_size)
    mesh = ParallelDims.resolve(1, dp_shard, 1, tp, 1, dist.get_world_size()).build_mesh("cpu")
    model = build_model(args, torch.device("cpu"), SEED)
    apply_tp(model, mesh["tp"], loss_parallel=loss_parallel)
    dp_mesh = mesh["dp_shard_cp"] if dp_shard > 1 else None
    if dp_mesh is not None:
        apply_fsdp(model, dp_mesh)
    got = parallel_run(model, batches, loss_parallel=loss_parallel, dp_mesh=dp_mesh)
    if tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight, "apply_tp broke the embedding tie"
    return {"got": got, "ref": reference_run(args, batches)}
