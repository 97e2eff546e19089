"""The anomaly guard: a NaN/Inf or a loss / grad-norm spike is replayed to tell bad data from bad hardware.

It runs between backward and the optimizer step. The loss and grad norm it sees are job-wide (every
rank holds the same values), so every rank reaches the same decision without a collective of its
own; only a replay communicates. A replay recomputes the step from the same, not yet updated,
state on this rank and on a data-parallel neighbour:

- the recomputation differs (or the replayed grad norm does) → bad hardware: the update is
  skipped and the caller forces the SDC checks at once (a rank that could not reproduce its own
  step is named);
- every recomputation reproduces the anomaly → bad data: the update is skipped, the batch dropped;
- unless the parameters themselves hold NaN/Inf (checked during every replay, given the
  parameters): then every batch reproduces it, the state is bad, not the data, and the caller
  must roll back to a finite checkpoint (:class:`NonFiniteState` when there is none).

The guard is given the step functions it needs (:class:`ReplaySteps`), never the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from stalwart.errors import UserError
from stalwart.health.sdc import ReplayOutcome, SpikeDetector, Verdict, all_finite, close_enough, replay_verdict

REPLAY_RTOL = 1e-5  # recomputations on GPU may reorder reductions; a hardware fault is far larger

Batch = list[tuple[torch.Tensor, torch.Tensor]]


class ReplaySteps(Protocol):
    """What a replay needs from the training step; every call is collective where training's is."""

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """This rank's loss of ``batch`` (gradients accumulate)."""

    def unclipped_grad_norm(self) -> float:
        """The job-wide norm of the current gradients, without clipping."""

    def zero_grad(self) -> None: ...

    def neighbour_batch(self, batch: Batch) -> tuple[Batch, int] | None:
        """The next data-parallel rank's batch and its global rank, or None without data parallelism."""


Gather = Callable[[torch.Tensor], list[torch.Tensor]]  # every rank's row, in rank order (collective)


class NonFiniteState(UserError):
    """The model state became NaN/Inf and no committed finite state could be restored; the message says what to do."""


@dataclass(frozen=True)
class Anomaly:
    """A step the guard held back: why, and what the replay concluded."""

    reason: str
    outcome: ReplayOutcome
    state_finite: bool | None = None  # the parameters were checked during the replay (None: not checked)

    @property
    def bad_data(self) -> bool:
        return self.outcome.verdict == Verdict.BAD_DATA

    @property
    def bad_state(self) -> bool:
        return self.outcome.verdict == Verdict.BAD_STATE


class AnomalyGuard:
    """One per rank. ``check`` returns None for a normal step (apply the update) or the :class:`Anomaly`."""

    def __init__(
        self,
        steps: ReplaySteps,
        gather: Gather,
        spike_factor: float = 10.0,
        parameters: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        self.steps = steps
        self.gather = gather
        self.spikes = SpikeDetector(factor=spike_factor)
        self.parameters = parameters  # this rank's parameters, to tell a NaN state from NaN data
        self._state_finite: bool | None = None

    def check(self, batch: Batch, local_loss: torch.Tensor, loss: float, grad_norm: float) -> Anomaly | None:
        """``loss`` and ``grad_norm`` are the job-wide values (a NaN on any rank makes the mean NaN)."""
        reason = self.spikes.check(loss=loss, grad_norm=grad_norm)
        if reason is None:
            self.spikes.accept(loss=loss, grad_norm=grad_norm)
            return None
        outcome = self.replay(batch, local_loss, grad_norm)
        return Anomaly(reason, outcome, self._state_finite)

    def replay(self, batch: Batch, local_loss: torch.Tensor, grad_norm: float) -> ReplayOutcome:
        """Recompute the step here and on a data-parallel neighbour; collective (every rank runs the same passes)."""
        s = self.steps
        s.zero_grad()
        replay_loss = s.forward_backward(batch)
        replay_norm = s.unclipped_grad_norm()
        s.zero_grad()
        neighbour = s.neighbour_batch(batch)
        other = s.forward_backward(neighbour[0]).item() if neighbour is not None else float("nan")
        s.zero_grad()
        owner = neighbour[1] if neighbour is not None else -1
        nonfinite = 0.0 if self.parameters is None or all_finite(self.parameters()) else 1.0
        row = [local_loss.item(), replay_loss.item(), other, owner, nonfinite]
        rows = self.gather(torch.tensor(row, dtype=torch.float64))
        bad_state = tuple(j for j, r in enumerate(rows) if r[4] > 0)
        self._state_finite = None if self.parameters is None else not bad_state
        if bad_state:
            return ReplayOutcome(
                Verdict.BAD_STATE,
                bad_state,
                f"the parameters hold NaN/Inf on ranks {list(bad_state)}: the state is bad",
            )
        original = [r[0].item() for r in rows]
        same = [r[1].item() for r in rows]
        others: list[float | None] = [None] * len(rows)
        for r in rows:
            if r[3] >= 0:
                others[int(r[3])] = r[2].item()
        outcome = replay_verdict(original, same, others if neighbour is not None else None, rtol=REPLAY_RTOL)
        if outcome.verdict == Verdict.BAD_DATA and not close_enough(grad_norm, replay_norm, REPLAY_RTOL):
            return ReplayOutcome(
                Verdict.BAD_HARDWARE, (), f"the replayed grad norm {replay_norm:.6g} differs from {grad_norm:.6g}"
            )
        return outcome
