"""What a resume needs, as DCP ``Stateful`` objects whose keys are the same for every layout.

Model and optimizer entries are keyed by fully-qualified parameter names, which stay unique
across pipeline stages (layers keep their global ids), so a checkpoint written with one
layout loads into another: DCP reshards the tensors. The step, the data-loader position and
the LR schedule are job-global plain objects. Training consumes no random numbers after the
seeded initialisation (no dropout), so the RNG state is job-global too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from stalwart.runtime.data.loader import GlobalBatchLoader
from stalwart.runtime.optim import OptimizersContainer

_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass
class StepCounter:
    """The number of completed optimizer steps: the trainer's and the checkpoint's one copy of it."""

    step: int = 0


def _owned(state: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k in keys}


class ModelPartsState(Stateful):
    """The parameters of this rank's model parts (several with an interleaved pipeline)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in self.parts:
            merged.update(get_model_state_dict(part))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.parts:
            set_model_state_dict(part, _owned(state_dict, set(get_model_state_dict(part))))


class OptimizersState(Stateful):
    """One optimizer per model part, flattened to parameter-name keys so it reshards too."""

    def __init__(self, parts: list[nn.Module], optimizers: OptimizersContainer) -> None:
        self.parts = parts
        self.optimizers = optimizers.optimizers

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part, opt in zip(self.parts, self.optimizers, strict=True):
            merged.update(get_optimizer_state_dict(part, opt, options=_OPTIM_OPTIONS))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, opt in zip(self.parts, self.optimizers, strict=True):
            own = set(get_optimizer_state_dict(part, opt, options=_OPTIM_OPTIONS))
            set_optimizer_state_dict(part, opt, _owned(state_dict, own), options=_OPTIM_OPTIONS)


class ProgressState(Stateful):
    """Step, data position, LR schedule and RNG: small, job-global, restored exactly."""

    def __init__(self, counter: StepCounter, loader: GlobalBatchLoader, optimizers: OptimizersContainer) -> None:
        self.counter = counter
        self.loader = loader
        self.schedulers = optimizers.schedulers

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.counter.step,
            "loader": self.loader.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counter.step = int(state_dict["step"])
        self.loader.load_state_dict(state_dict["loader"])
        # Every part's schedule is the same function of the step, and a checkpoint of another
        # pipeline layout holds a different number of them: the first one restores them all.
        for sched in self.schedulers:
            sched.load_state_dict(state_dict["schedulers"][0])
        torch.set_rng_state(state_dict["rng"])


def train_state(
    parts: list[nn.Module], optimizers: OptimizersContainer, counter: StepCounter, loader: GlobalBatchLoader
) -> dict[str, Stateful]:
    """The job's whole resumable state, keyed the same for every layout."""
    return {
        "model": ModelPartsState(parts),
        "optim": OptimizersState(parts, optimizers),
        "progress": ProgressState(counter, loader, optimizers),
    }


# ------------------------------------------------------------------- same-layout state, rank to rank


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _pack(value: Any) -> Any:
    """An optimizer state entry as CPU data: a DTensor as its local shard, a plain tensor with its device."""
    if isinstance(value, DTensor):
        return value.to_local().detach().cpu().clone()
    if isinstance(value, torch.Tensor):
        return ("tensor", value.detach().cpu().clone(), value.device.type)
    return value


def local_state(parts: list[nn.Module], optimizers: OptimizersContainer, progress: ProgressState) -> dict[str, Any]:
    """A CPU copy of this rank's share of the state, for a rank of the same layout (a replacement).

    No resharding, so no DCP planning: parameters and optimizer tensors by parameter name, as this
    rank holds them (DTensors as their local shards), the optimizers' hyper-parameters (the live
    learning rate among them) and the progress state. :func:`load_local_state` is its inverse.
    """
    names = {p: n for part in parts for n, p in part.named_parameters()}
    return {
        "params": {n: _local(p).detach().cpu().clone() for part in parts for n, p in part.named_parameters()},
        "optim": [
            {
                "state": {names[p]: {k: _pack(v) for k, v in s.items()} for p, s in opt.state.items()},
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            }
            for opt in optimizers.optimizers
        ],
        "progress": progress.state_dict(),
    }


def load_local_state(
    parts: list[nn.Module], optimizers: OptimizersContainer, progress: ProgressState, saved: dict[str, Any]
) -> None:
    """Load a :func:`local_state` of a rank of the same layout into the live objects, in place."""
    params = {n: p for part in parts for n, p in part.named_parameters()}
    missing = params.keys() - saved["params"].keys()
    if missing:
        raise KeyError(f"the peer's state lacks parameters {sorted(missing)[:3]}: not the same layout")
    with torch.no_grad():
        for name, p in params.items():
            _local(p).copy_(saved["params"][name])
        for opt, entry in zip(optimizers.optimizers, saved["optim"], strict=True):
            for group, hyper in zip(opt.param_groups, entry["groups"], strict=True):
                group.update(hyper)
            for name, state in entry["state"].items():
                p = params[name]
                live = opt.state[p]
                for key, value in state.items():
                    if isinstance(value, tuple) and len(value) == 3 and value[0] == "tensor":
                        _, tensor, device_type = value  # a plain tensor (the step count), where the peer kept it
                        live[key] = tensor.to(_local(p).device if device_type != "cpu" else "cpu")
                    elif isinstance(value, torch.Tensor):  # a DTensor's local shard, sharded like its parameter
                        target = live.get(key)
                        if target is None:
                            target = live[key] = torch.zeros_like(p, dtype=value.dtype)
                        _local(target).copy_(value)
                    else:
                        live[key] = value
    progress.load_state_dict(saved["progress"])
