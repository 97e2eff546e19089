"""AdamW and the learning-rate schedule: linear warmup, then cosine, linear or constant decay."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from stalwart.runtime.config import TrainingConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: TrainingConfig, device: torch.device
) -> torch.optim.AdamW:
    """Fused AdamW on CUDA (one kernel for all parameters), foreach on CPU."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        list(params),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused,
        foreach=not fused,
    )


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based count of completed steps)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.decay == "constant":
        return 1.0
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


class OptimizersContainer:
    """One AdamW and one LR schedule per model part, stepped together.

    One optimizer per part because optimizer state dicts are keyed by the part's parameter names,
    which is what lets a checkpoint reshard across pipeline layouts (see :mod:`stalwart.runtime.train_state`).
    """

    def __init__(self, parts: list[torch.nn.Module], cfg: TrainingConfig, device: torch.device) -> None:
        self.optimizers = [build_optimizer(part.parameters(), cfg, device) for part in parts]
        self.schedulers = [build_lr_scheduler(opt, cfg) for opt in self.optimizers]

    @property
    def lr(self) -> float:
        """The learning rate the next update uses."""
        return self.schedulers[0].get_last_lr()[0]

    def step(self, apply_update: bool = True) -> None:
        """Apply the update (unless the step was dropped) and advance the schedule either way."""
        for opt, sched in zip(self.optimizers, self.schedulers, strict=True):
            if apply_update:
                opt.step()
            sched.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
