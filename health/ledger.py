"""Which checkpoints are *verified*: saved at or before a step whose SDC checks passed.

A rollback after silent data corruption must land on state known to be clean. A save right after a
passing check is written verified; any other save waits for the next passing check, which then
marks it (rank 0 only, once the save has committed). Retention never deletes the newest verified
step. The ledger is given the checkpoint store's three calls it needs (:class:`VerifiableStore`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class VerifiableStore(Protocol):
    def poll(self) -> bool:
        """True when no save is in flight on this rank."""

    def committed_steps(self) -> list[int]: ...

    def mark_verified(self, step: int) -> None: ...


@dataclass
class VerificationLedger:
    store: VerifiableStore
    enabled: bool = True
    writer: bool = True  # rank 0 marks; the others only keep the books
    clean_at: int | None = None  # step of the newest passing SDC check
    unverified: list[int] = field(default_factory=list)  # saved steps awaiting a passing check
    to_mark: list[int] = field(default_factory=list)  # verified steps not yet recorded (commit pending)

    def saving(self, step: int) -> bool:
        """A save of ``step`` starts: whether it is verified already (a check passed at this very step)."""
        verified = self.enabled and self.clean_at == step
        if self.enabled and not verified:
            self.unverified.append(step)
        return verified

    def passed(self, step: int) -> None:
        """The SDC checks passed at ``step``: every save at or before it is clean."""
        self.clean_at = step
        self.to_mark += [s for s in self.unverified if s <= step]
        self.unverified = [s for s in self.unverified if s > step]

    def rolled_back(self, to_step: int) -> None:
        """The live state is ``to_step`` (a verified checkpoint) again; newer saves are moot."""
        self.unverified = [s for s in self.unverified if s <= to_step]
        self.clean_at = to_step

    def record(self) -> list[int]:
        """Mark what became verified, once no save is in flight; returns the steps marked."""
        if not self.to_mark or not self.writer or not self.store.poll():
            return []
        committed = set(self.store.committed_steps())
        marked = [s for s in self.to_mark if s in committed]
        for step in marked:
            self.store.mark_verified(step)
        self.to_mark.clear()
        return marked
