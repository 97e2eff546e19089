"""Rank functions that count the collectives of the trainer's steps (loaded by path in each rank process)."""

from __future__ import annotations

import torch.distributed as dist
from trainer_cases import BASE

from stalwart.runtime.config import load_config
from stalwart.runtime.train import Trainer

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "all_gather_object",
    "broadcast_object_list",
    "barrier",
    "all_to_all",
    "reduce",
    "gather",
    "scatter",
)


def job_wide_collectives_per_step(run_dir: str, overrides: list[str], steps: int = 3) -> list[list[str]]:
    """The c10d calls of each training step whose group spans the whole job (not parallelism's sub-groups)."""
    cfg = load_config(
        "debug",
        [
            *BASE,
            "--job.run_dir",
            run_dir,
            "--checkpoint.enabled",
            "false",
            "--health.golden_every",
            "0",
            "--health.fingerprint_every",
            "0",
            *overrides,
        ],
    )
    trainer = Trainer(cfg)
    world = dist.get_world_size()
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name: str):  # noqa: ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            group = kwargs.get("group")
            if group is None or dist.get_world_size(group) == world:
                calls.append(name)
            return originals[name](*args, **kwargs)

        return call

    per_step = []
    try:
        for name in COLLECTIVES:
            setattr(dist, name, counting(name))
        for _ in range(steps):
            before = len(calls)
            trainer.train_step(trainer.loader.next_step())
            per_step.append(calls[before:])
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        trainer.close(destroy_group=False)
    return per_step
