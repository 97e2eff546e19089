"""The CLI overrides of a tiny debug-model run, shared by the system tests that start ``stalwart`` processes."""

from __future__ import annotations

TINY_RUN: dict[str, object] = {
    "model.n_layers": 1,
    "data.seq_len": 32,
    "data.max_tokens": 20000,
    "training.global_batch_size": 8,
    "training.microbatch_size": 4,
    "training.threads_per_rank": 1,
    "health.golden_every": 0,
}


def tiny_overrides(**changes: object) -> list[str]:
    """``--key value`` flags of :data:`TINY_RUN` with ``changes`` (``section__key=value``; ``None`` drops a key)."""
    values = {**TINY_RUN, **{key.replace("__", "."): value for key, value in changes.items()}}
    return [flag for key, value in values.items() if value is not None for flag in (f"--{key}", str(value))]
