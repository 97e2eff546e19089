"""Rank functions for the SDC tests (loaded by path in each rank process by tests/dist_harness.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from stalwart.health import sdc
from stalwart.runtime.config import load_config
from stalwart.runtime.train import Trainer

SMALL = [
    "--training.warmup_steps",
    "0",
    "--training.lr",
    "1e-3",
    "--model.n_layers",
    "2",
    "--data.seq_len",
    "32",
    "--data.max_tokens",
    "20000",
    "--training.threads_per_rank",
    "1",
    "--training.microbatch_size",
    "2",
]


def golden_vote(bad_rank: int) -> sdc.Vote:
    """Every rank runs the golden workload; ``bad_rank``'s softmax returns one flipped bit (bad arithmetic)."""
    if dist.get_rank() == bad_rank:
        softmax = torch.softmax

        def faulty_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
            out = softmax(x, dim=dim).contiguous()
            sdc.flip_bit(out, out.numel() // 3, 7)
            return out

        torch.softmax = faulty_softmax
    result = sdc.golden_workload(torch.device("cpu"))
    return sdc.odd_ones_out(sdc.all_gather_rows(result))


def train(run_dir: str, overrides: list[str], corrupt_step: int = 0, corrupt: str = "") -> list[float]:
    """Run the real trainer; optionally corrupt one step on purpose. Returns this rank's losses.

    ``corrupt="data"``: every rank's batch of ``corrupt_step`` gets labels the model finds absurd
    (a reproducible spike). ``corrupt="hardware"``: rank 1's first forward pass of that step returns
    scaled logits (a transient compute fault that a recomputation does not reproduce).
    """
    trainer = Trainer(load_config("debug", [*SMALL, "--job.run_dir", run_dir, *overrides]))
    if corrupt == "data":
        next_step = trainer.loader.next_step

        def poisoned() -> list[tuple[torch.Tensor, torch.Tensor]]:
            batches = next_step()
            if trainer.step == corrupt_step:
                batches = [(x, torch.full_like(y, trainer.model_args.vocab_size - 1)) for x, y in batches]
            return batches

        trainer.loader.next_step = poisoned
    elif corrupt == "hardware" and dist.get_rank() == 1:
        fired = []

        def glitch(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if trainer.step == corrupt_step and not fired:
                fired.append(True)
                return output * 1e4
            return None

        trainer.model_parts[0].register_forward_hook(glitch)
    try:
        trainer.run()
    finally:
        trainer.close(destroy_group=False)  # the harness owns the process group
    return [r.loss for r in trainer.history]
