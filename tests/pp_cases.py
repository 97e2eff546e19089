"""Rank functions for test_pipeline.py (loaded by path in each rank process)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from parity import MAX_GRAD_NORM, SEED, debug_args, full_state_dict, make_batches, make_optimizer

from stalwart.parallel.data_parallel import apply_fsdp
from stalwart.parallel.dims import ParallelDims
from stalwart.parallel.loss import cross_entropy_loss
from stalwart.parallel.pipeline import (
    build_pipeline_stages,
    build_schedule,
    clip_grad_norm_pp,
    pipeline_step,
    stage_roles,
)
from stalwart.runtime.train import build_model


def train_pp(schedule: str, pp: int, dp_shard: int, n_microbatches: int, batch: int, steps: int, n_layers: int) -> dict:
    """Train with pp × dp_shard (FSDP per stage module) and return what parity needs from this rank."""
    device = torch.device("cpu")
    dims = ParallelDims.resolve(1, dp_shard, 1, 1, pp, dist.get_world_size())
    mesh = dims.build_mesh("cpu")
    args = debug_args(n_layers)
    model = build_model(args, device, SEED)

    def fsdp(part: torch.nn.Module) -> torch.nn.Module:
        # Re-gathering parameters for every microbatch would multiply the all-gathers: keep them.
        apply_fsdp(part, mesh["dp_shard_cp"], reshard_after_forward=False)
        return part

    stages, parts = build_pipeline_stages(
        model, mesh["pp"], schedule, device, parallelize_fn=fsdp if dp_shard > 1 else None
    )
    del model
    pp_schedule = build_schedule(stages, n_microbatches, cross_entropy_loss, schedule)
    has_first, has_last = stage_roles(stages)
    params = [p for part in parts for p in part.parameters()]
    optimizer = make_optimizer(params)
    dp_mesh = mesh["dp"]
    local = batch // dp_mesh.size()
    rows = slice(dp_mesh.get_local_rank() * local, (dp_mesh.get_local_rank() + 1) * local)
    losses, norms = [], []
    for inputs, labels in make_batches(args.vocab_size, steps, batch):
        loss = pipeline_step(pp_schedule, inputs[rows], labels[rows], has_first, has_last)
        norm = clip_grad_norm_pp(params, MAX_GRAD_NORM, mesh["pp"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        norms.append(norm.item())
        if has_last:
            if dp_mesh.size() > 1:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=dp_mesh.get_group())
            losses.append(loss.item())
        else:
            assert loss is None
    state: dict[str, torch.Tensor] = {}
    for part in parts:
        part_state = full_state_dict(part)
        assert not state.keys() & part_state.keys(), (
            f"stages on one rank share FQNs: {state.keys() & part_state.keys()}"
        )
        state.update(part_state)
    return {
        "pp_rank": mesh["pp"].get_local_rank(),
        "stage_ids": [s.stage_index for s in stages],
        "has_first": has_first,
        "has_last": has_last,
        "losses": losses,
        "norms": norms,
        "params": state,
    }


def train_pp_schedules(schedules: list[str], **kwargs) -> dict[str, dict]:
    """``train_pp`` for several schedules in one process group: process start-up dominates test time."""
    return {schedule: train_pp(schedule=schedule, **kwargs) for schedule in schedules}
