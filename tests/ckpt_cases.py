"""Rank functions for test_checkpoint.py (loaded by path in each rank process)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh

from stalwart.checkpoint.manager import CheckpointManager
from stalwart.model.args import get_flavor
from stalwart.parallel.data_parallel import apply_fsdp
from stalwart.runtime.train import build_model

SEED = 7


def _train_one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tokens = torch.arange(32).reshape(2, 16) % 200
    model(tokens).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _full(value: torch.Tensor) -> torch.Tensor:
    return (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()


def save_fsdp(url: str, model_config: dict | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """FSDP2 on every rank: sync save of step 1, async save of step 2 while training goes on.

    Returns the full parameters and Adam moments as of step 2, for comparison with a load on a
    different world size.
    """
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard_cp",))
    model = build_model(get_flavor("debug"), torch.device("cpu"), SEED)
    apply_fsdp(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(url)
    layout = {"dp_shard": dist.get_world_size()}
    for step in (1, 2):
        _train_one_step(model, optimizer)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        manager.save(
            step,
            {"model": model_sd, "optim": optim_sd, "step": step},
            layout=layout,
            async_=step == 2,
            model=model_config,
        )
    expected = {
        "model": {k: _full(v) for k, v in model.state_dict().items()},
        "exp_avg": {fqn: _full(st["exp_avg"]) for fqn, st in optim_sd["state"].items()},
    }
    _train_one_step(model, optimizer)  # training collectives while the async save is in flight
    assert manager.wait() == 2
    manager.close()
    return expected
