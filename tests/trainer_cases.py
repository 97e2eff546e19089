"""Rank functions that run the real Trainer for a layout (loaded by path in each rank process)."""

from __future__ import annotations

import torch
from parity import RunResult, full_state_dict

from stalwart.runtime.config import load_config
from stalwart.runtime.train import Trainer

BASE = [
    "--training.steps",
    "5",
    "--training.global_batch_size",
    "8",
    "--training.microbatch_size",
    "2",
    "--training.warmup_steps",
    "0",
    "--training.lr",
    "1e-3",
    "--model.n_layers",
    "4",
    "--data.seq_len",
    "32",
    "--data.max_tokens",
    "20000",
    "--training.threads_per_rank",
    "1",
]


def train_layout(run_dir: str, overrides: list[str]) -> RunResult:
    cfg = load_config("debug", [*BASE, "--job.run_dir", run_dir, *overrides])
    trainer = Trainer(cfg)
    trainer.run()
    params = full_state_dict_of(trainer)
    return RunResult([r.loss for r in trainer.history], [r.grad_norm for r in trainer.history], params)


def full_state_dict_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    """This rank's parameters as full tensors; pipeline ranks hold only their stages' keys."""
    out: dict[str, torch.Tensor] = {}
    for module in trainer.model_parts:
        out.update(full_state_dict(module))
    return out
