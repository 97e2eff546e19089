"""The periodic silent-data-corruption checks of a training job: parameter fingerprints and the golden workload.

Every rank calls :meth:`SdcMonitor.check` at the same steps (the checks are collectives) and gets
the same answer: a :class:`SdcFinding` naming the faulty ranks, or the suspects when no majority
decides, or None. The monitor is given what it compares (the named local parameters and the
replica group's collectives), never the trainer; :mod:`stalwart.health.sdc` holds the pure pieces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from stalwart.events import EventKind
from stalwart.health.sdc import all_finite, fingerprint_and_nonfinite, golden_workload, odd_ones_out

log = logging.getLogger(__name__)

NamedTensors = Callable[[], Iterable[tuple[str, torch.Tensor]]]
NONFINITE = "nonfinite"  # the fingerprint pass found NaN/Inf parameters: a bad state, not a bad device


@dataclass(frozen=True)
class SdcFinding:
    """Ranks that hold or compute wrong numbers; ``suspects`` when the check could not tell which."""

    layer: str  # "fingerprint", "golden", "fingerprint+golden", "replay", or NONFINITE (no rank to blame)
    faulty: tuple[int, ...] = ()
    suspects: tuple[int, ...] = ()
    params: tuple[str, ...] = ()  # first mismatching parameters (fingerprint layer, this replica group)


class Collectives(Protocol):
    """The job-wide and replica-group collectives the checks use (gloo on CPU tensors)."""

    world_size: int

    def gather_world(self, row: torch.Tensor) -> list[torch.Tensor]: ...

    def gather_replicas(self, row: torch.Tensor) -> list[torch.Tensor]: ...

    def replica_ranks(self) -> list[int]:
        """Global ranks of this rank's replica group, in group order."""

    def max_world(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over every rank."""


class SdcMonitor:
    """Fingerprints across replicas every ``fingerprint_every`` steps, the golden workload every ``golden_every``.

    ``replicas`` is False when the job has no data-parallel replicas (then fingerprints are off).
    The first golden result is this rank's reference: later results that differ from it name the
    rank even when every rank changed alike.
    """

    def __init__(
        self,
        parameters: NamedTensors,
        collectives: Collectives,
        device: torch.device,
        *,
        replicas: bool,
        fingerprint_every: int,
        golden_every: int,
    ) -> None:
        self.parameters = parameters
        self.comm = collectives
        self.device = device
        self.fingerprint_every = fingerprint_every if replicas else 0
        self.golden_every = golden_every
        self.golden_reference: torch.Tensor | None = None

    def due(self, step: int) -> bool:
        return bool(
            (self.fingerprint_every and step % self.fingerprint_every == 0)
            or (self.golden_every and step % self.golden_every == 0)
        )

    def check(self, step: int, force: bool = False) -> SdcFinding | None:
        """Run the checks due at ``step`` (every enabled one when ``force``); collective."""
        due_fp = bool(self.fingerprint_every) and (force or step % self.fingerprint_every == 0)
        due_golden = bool(self.golden_every) and (force or step % self.golden_every == 0)
        finding = self.fingerprint_check() if due_fp else None
        if finding is None and due_golden:
            return self.golden_check()
        if finding is not None and finding.suspects:
            # Two replicas cannot outvote each other: the golden workload names the one that computes wrong.
            golden = self.golden_check()
            named = tuple(r for r in (golden.faulty if golden else ()) if r in finding.suspects)
            if named:
                return SdcFinding("fingerprint+golden", faulty=named, params=finding.params)
        return finding

    def fingerprint_check(self) -> SdcFinding | None:
        """Compare this replica group's parameter fingerprints; suspects of all groups, job-wide."""
        named = list(self.parameters())
        local, nonfinite = fingerprint_and_nonfinite(p for _, p in named)
        rows = self.comm.gather_replicas(local)
        vote = odd_ones_out(rows)
        params: tuple[str, ...] = ()
        if not vote.agree:
            bad = vote.odd[0]
            good = next((i for i in range(len(rows)) if i not in vote.odd), (bad + 1) % len(rows))
            differing = (rows[good] != rows[bad]).any(dim=1).nonzero().flatten().tolist()
            params = tuple(named[i][0] for i in differing[:4])
        flags = torch.zeros(self.comm.world_size + 1, dtype=torch.int32)  # per rank, then "some rank is NaN/Inf"
        group = self.comm.replica_ranks()
        for i in vote.odd:
            flags[group[i]] = 1 if vote.undetermined else 2
        flags[-1] = int(nonfinite > 0)
        *flags, any_nonfinite = self.comm.max_world(flags).tolist()  # merged over every replica group
        if any_nonfinite:  # replicas that agree on NaN agree on a bad state: no hardware to blame, roll back
            return SdcFinding(NONFINITE)
        faulty = tuple(r for r, f in enumerate(flags) if f == 2)
        suspects = tuple(r for r, f in enumerate(flags) if f == 1)
        if not faulty and not suspects:
            return None
        return SdcFinding("fingerprint", faulty=faulty, suspects=suspects, params=params)

    def parameters_finite(self) -> bool:
        """Whether every rank's parameters are finite; collective (a pass over the weights: for rollbacks only)."""
        flags = torch.tensor([0 if all_finite(p for _, p in self.parameters()) else 1], dtype=torch.int32)
        return not bool(self.comm.max_world(flags).item())

    def golden_check(self) -> SdcFinding | None:
        """Golden workload on every rank: odd ones out by majority, or a change since the first run."""
        result = golden_workload(self.device)
        if self.golden_reference is None:
            self.golden_reference = result
        changed = not torch.equal(result, self.golden_reference)
        rows = self.comm.gather_world(torch.cat([result.flatten(), torch.tensor([int(changed)])]))
        vote = odd_ones_out([r[:-1] for r in rows])
        faulty = {r for r, row in enumerate(rows) if row[-1]} | (set() if vote.undetermined else set(vote.odd))
        if faulty:
            return SdcFinding("golden", faulty=tuple(sorted(faulty)))
        if vote.undetermined:
            return SdcFinding("golden", suspects=vote.odd)
        return None


class EventSink(Protocol):
    def emit(self, kind: str, **fields: object) -> object: ...

    def flush(self) -> None: ...


class FindingReporter:
    """Turns a finding into ``fault_detected`` events and a quarantine request.

    Each faulty rank reports itself (its host, node and device are known only there) and asks its
    healthd to take the node out; suspects without a faulty rank are reported once, by rank 0.
    """

    def __init__(
        self,
        events: EventSink,
        rank: int,
        where: dict[str, object],
        *,
        is_main: bool,
        quarantine: Callable[[str], object] | None = None,
    ) -> None:
        self.events = events
        self.rank = rank
        self.where = where
        self.is_main = is_main
        self.quarantine = quarantine

    def report(self, step: int, finding: SdcFinding, what: str) -> None:
        detail: dict[str, object] = {"step": step, "layer": finding.layer, "params": list(finding.params)}
        if self.rank in finding.faulty:
            self.events.emit(
                EventKind.FAULT_DETECTED,
                fault="sdc",
                target=f"rank{self.rank}",
                detector=f"sdc-{finding.layer}",
                detail={**detail, **self.where},
            )
            self.events.flush()
            log.error(
                "sdc: %s found this rank (%d, %s) holding or computing wrong numbers; quarantining",
                what,
                self.rank,
                self.where,
            )
            if self.quarantine is None:
                log.error("no healthd attached: take rank %d's device out of service by hand (%s)", self.rank, what)
            else:
                self.quarantine(f"sdc: {what}")
        elif not finding.faulty and self.is_main:
            targets = ",".join(f"rank{r}" for r in finding.suspects)
            self.events.emit(
                EventKind.FAULT_DETECTED,
                fault="sdc",
                target=targets,
                detector=f"sdc-{finding.layer}",
                detail={**detail, "undetermined": True},
            )
            log.error(
                "sdc: %s: ranks %s disagree and no majority names one; rolling back without quarantine",
                what,
                list(finding.suspects),
            )
