"""A stateful data loader whose position is job-global, so resumes are exact at any DP degree.

The sample order depends only on (seed, epoch); the position counts samples consumed by the
whole job. Each optimizer step covers global positions [p, p + global_batch_size) and rank r
takes the r-th contiguous 1/dp_size of it. Because neither the order nor the position depends
on dp_size, a job checkpointed at dp=4 and resumed at dp=2 consumes exactly the samples an
uninterrupted run would have: none skipped, none repeated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["SampleSource", "GlobalBatchLoader"]

Microbatch = tuple[Tensor, Tensor]


class SampleSource(Protocol):
    """Anything indexable into (inputs, labels) pairs of equal shape, e.g. `PackedDataset`."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]: ...


class GlobalBatchLoader:
    """Yields this rank's microbatches for one optimizer step at a time; see module docstring."""

    STATE_VERSION = 1
    _ORDER_CACHE_EPOCHS = 2  # a step straddles at most two epochs when global batch <= dataset size

    def __init__(
        self,
        dataset: SampleSource,
        global_batch_size: int,
        microbatch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        sizes = {"global_batch_size": global_batch_size, "microbatch_size": microbatch_size, "dp_size": dp_size}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        per_step = dp_size * microbatch_size
        if global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by "
                f"dp_size*microbatch_size={per_step} (dp={dp_size} × microbatch={microbatch_size}); "
                f"choose a global batch that is a multiple of {per_step}"
            )
        if len(dataset) < 1:
            raise ValueError("the dataset has no samples; use a larger corpus or a smaller seq_len")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.microbatch_size = microbatch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.local_batch_size = global_batch_size // dp_size
        self.grad_accum_steps = global_batch_size // per_step
        self.position = 0
        self.last_fetch_seconds = 0.0  # time spent in the last next_step(); the trainer books stalls as badput
        self.total_fetch_seconds = 0.0
        self._orders: dict[int, np.ndarray] = {}

    @property
    def dataset_len(self) -> int:
        return len(self.dataset)

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be consumed."""
        return self.position // self.dataset_len

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample order of `epoch`: a pure function of (seed, epoch), independent of rank and dp_size."""
        order = self._orders.get(epoch)
        if order is None:
            n = self.dataset_len
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if len(self._orders) >= self._ORDER_CACHE_EPOCHS:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = order
        return order

    def global_sample_ids(self, start: int, count: int) -> np.ndarray:
        """Dataset indices at global positions [start, start + count), crossing epochs as needed."""
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.dataset_len)
        ids = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            ids[mask] = self.epoch_order(int(e))[offsets[mask]]
        return ids

    def sample_ids_for_step(self) -> list[list[int]]:
        """Dataset indices this rank gets from the next `next_step()`, one list per microbatch."""
        start = self.position + self.dp_rank * self.local_batch_size
        ids = self.global_sample_ids(start, self.local_batch_size)
        return ids.reshape(self.grad_accum_steps, self.microbatch_size).tolist()

    def _collate(self, ids: list[int]) -> Microbatch:
        samples = [self.dataset[i] for i in ids]
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    def next_step(self) -> list[Microbatch]:
        """This rank's `grad_accum_steps` (inputs, labels) microbatches of [microbatch_size, seq_len].

        Every rank advances by the global batch, keeping the position identical job-wide.
        """
        t0 = time.perf_counter()
        batches = [self._collate(ids) for ids in self.sample_ids_for_step()]
        self.position += self.global_batch_size
        self.last_fetch_seconds = time.perf_counter() - t0
        self.total_fetch_seconds += self.last_fetch_seconds
        return batches

    def __iter__(self) -> Iterator[list[Microbatch]]:
        """Endless: epochs roll over; stop by step count, not by exhaustion."""
        while True:
            yield self.next_step()

    def skip(self, n_samples: int) -> None:
        """Advance the global position without loading (e.g. to step past data behind a loss spike).

        Call with the same n on every rank, like everything that moves the position.
        """
        if n_samples < 0:
            raise ValueError(
                f"skip(n_samples={n_samples}) must be >= 0; the loader cannot rewind, load a state_dict instead"
            )
        self.position += n_samples

    def state_dict(self) -> dict[str, Any]:
        """Job-global (identical on every rank), so any one rank's copy restores all ranks at any DP degree."""
        return {
            "position": int(self.position),
            "seed": int(self.seed),
            "shuffle": bool(self.shuffle),
            "global_batch_size": int(self.global_batch_size),
            "dataset_len": int(self.dataset_len),
            "version": self.STATE_VERSION,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; refuse if the sample order would differ from the checkpointed run.

        A different global_batch_size (or dp_size / microbatch_size) is allowed: the position is
        counted in samples, so the resumed run continues at exactly the next unconsumed sample.
        """
        version = state.get("version")
        if version != self.STATE_VERSION:
            raise ValueError(
                f"data loader state has version={version!r}, this loader reads version={self.STATE_VERSION}; "
                "resume with the stalwart release that wrote the checkpoint"
            )
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"data loader state was saved with seed={state['seed']} but this loader has "
                f"seed={self.seed}; set the data seed back to {state['seed']} (the sample order depends on it) "
                "or start a fresh run"
            )
        if bool(state.get("shuffle", self.shuffle)) != self.shuffle:
            raise ValueError(
                f"data loader state was saved with shuffle={state['shuffle']} but this loader has "
                f"shuffle={self.shuffle}; restore the original shuffle setting or start a fresh run"
            )
        if int(state["dataset_len"]) != self.dataset_len:
            raise ValueError(
                f"the data changed under a resume: the checkpoint saw {state['dataset_len']} samples, "
                f"now there are {self.dataset_len}; restore the original corpus, tokenizer, seq_len and "
                "max_tokens, or start a fresh run"
            )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"data loader state has negative position={position}; the checkpoint is corrupt")
        self.position = position
