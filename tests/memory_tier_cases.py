"""Rank functions for test_memory_tier.py: FSDP state in the host-memory tier across "nodes"."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh

from stalwart.checkpoint.manager import CheckpointManager
from stalwart.checkpoint.memory_tier import MemoryTier
from stalwart.events import EventLog
from stalwart.model.args import get_flavor
from stalwart.parallel.data_parallel import apply_fsdp
from stalwart.runtime.train import build_model


def _fsdp(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard_cp",))
    model = build_model(get_flavor("debug"), torch.device("cpu"), seed)
    apply_fsdp(model, mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tokens = (torch.arange(32).reshape(2, 16) + dist.get_rank()) % 200
    model(tokens).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _manager(url: str, memory_dir: str, run_dir: str) -> CheckpointManager:
    events = EventLog(run_dir, role="trainer", rank=dist.get_rank())
    return CheckpointManager(url, events=events, memory=MemoryTier(memory_dir, "fp-test", events=events))


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def save(url: str, memory_dir: str, run_dir: str) -> dict[int, dict[str, torch.Tensor]]:
    """Step 1 to storage, steps 2 and 3 to the memory tier; the full weights as of steps 1 and 3."""
    model, optimizer = _fsdp(seed=1)
    manager = _manager(url, memory_dir, run_dir)
    full = {}
    for step in (1, 2, 3):
        _step(model, optimizer)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "progress": {"step": step, "rank": dist.get_rank()}}
        full[step] = _full(model)
        if step == 1:
            manager.save(step, state)
        else:
            manager.memory.save(step, state)
    _step(model, optimizer)  # training goes on while the copy is written and replicated
    manager.memory.wait()
    manager.close()
    manager.events.close()
    return {1: full[1], 3: full[3]}


def load(url: str, memory_dir: str, run_dir: str) -> dict:
    """A fresh incarnation: load the newest complete copy among the tiers."""
    model, optimizer = _fsdp(seed=2)
    manager = _manager(url, memory_dir, run_dir)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "progress": {"step": 0, "rank": -1}}
    step = manager.load(state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out = {"step": step, "tier": manager.last_load_tier, "progress": state["progress"], "full": _full(model)}
    manager.close()
    manager.events.close()
    return out
