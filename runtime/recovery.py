"""In-process recovery: the survivors of a lost rank re-form the world without leaving their processes.

The trainer hands a step's failure here when a collective failed because a peer is gone
(:func:`~stalwart.parallel.reform.is_peer_failure`). Then, on every surviving rank:

1. **release**: the step is abandoned (gradients dropped, FSDP resharded, pipeline buffers cleared,
   the loader rewound to the last completed optimizer step); an in-flight checkpoint save is given
   up; every process group is destroyed;
2. **form**: the world re-forms on a fresh prefix of the job's store (the next *generation*): the
   default group, then the same groups in the same order as at start-up, which gives them the same
   names, and every object that cached an old group is pointed at its successor
   (:class:`~stalwart.parallel.reform.GroupSlots`); the replacement rank, started by the launcher
   with the same global rank, joins the same generation;
3. **state**: the ranks compare what they hold. Survivors must agree on the last completed step;
   each newcomer receives the whole local state (parameters, optimizer, step, loader position,
   schedule) from a survivor holding the same shard (a data-parallel replica). Without such a peer,
   or when survivors disagree, every rank loads the newest intact checkpoint (host-memory tier
   first, then persistent storage), collectively.

Each recovery records ``reform_begin`` / ``reform_end`` (phases, state source, bytes); one that
cannot complete raises :class:`~stalwart.parallel.reform.ReformError` and the rank exits with
:data:`EXIT_WORLD_RESTART`, so that the launcher restarts the whole world as before.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stalwart.checkpoint.checkpointer import Checkpointer
from stalwart.events import EventKind, EventLog
from stalwart.health.client import HeartbeatClient
from stalwart.health.hang import Phase
from stalwart.jobenv import REPLACEMENT_ENV
from stalwart.parallel.reform import GroupSlots, JobStore, ReformError, is_peer_failure

log = logging.getLogger(__name__)

EXIT_WORLD_RESTART = 76  # a rank that could not recover in place: the launcher restarts the world
__all__ = ["EXIT_WORLD_RESTART", "InProcessRecovery", "ReformError", "is_peer_failure", "replaced_generation"]


def replaced_generation() -> int | None:
    """The generation a lost rank trained in, when this process was started to replace it."""
    value = os.environ.get(REPLACEMENT_ENV)
    return int(value) if value not in (None, "") else None


@dataclass
class Completed:
    """The last optimizer step every piece of live state agrees on, and the loader position after it."""

    step: int = 0
    loader: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StateSource:
    source: str  # "peer", "memory", a storage scheme, or "none" (no one needed state)
    bytes: int = 0
    step: int = 0
    replaced: tuple[int, ...] = ()  # the global ranks that joined new


class InProcessRecovery:
    """One per rank under a launcher that provides a job store (``$STALWART_JOB_STORE``).

    ``create_groups`` re-creates, in start-up order, every group beyond the default one;
    ``group_roots`` returns the objects that may cache process groups; ``shard`` is this rank's
    position in the layout without the replica dimension (ranks with equal ``shard`` hold equal state);
    ``abandon_step`` drops a half-done step's buffers; ``restore_completed`` rewinds the counter and
    loader to :attr:`completed`.
    """

    def __init__(
        self,
        job_store: JobStore,
        *,
        rank: int,
        world_size: int,
        backend: str,
        generation: int,
        pack_state: Callable[[], dict[str, Any]],
        unpack_state: Callable[[dict[str, Any]], None],
        events: EventLog,
        create_groups: Callable[[], None],
        group_roots: Callable[[], Iterable[Any]],
        shard: Callable[[], tuple[int, ...]],
        abandon_step: Callable[[], None],
        restore_completed: Callable[[Completed], None],
        load_committed: Callable[[], int | None],
        checkpointer: Checkpointer | None = None,
        heartbeat: HeartbeatClient | None = None,
        max_reformations: int = 10,
        timeout_s: float = 60.0,
        before_forming: Callable[[int], None] = lambda step: None,
    ) -> None:
        self.store = job_store
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.generation = generation
        self.pack_state = pack_state
        self.unpack_state = unpack_state
        self.events = events
        self.create_groups = create_groups
        self.group_roots = group_roots
        self.shard = shard
        self.abandon_step = abandon_step
        self.restore_completed = restore_completed
        self.checkpointer = checkpointer
        self.load_committed = load_committed  # the trainer's own resume: a pending rollback order first
        self.heartbeat = heartbeat
        self.max_reformations = max_reformations
        self.timeout_s = timeout_s
        self.before_forming = before_forming  # fault injection's hook: a second fault while recovering
        self.completed = Completed()
        self.reformations = 0
        job_store.record(rank, generation)

    # --------------------------------------------------------------------------------- survivors

    def recover(self, error: BaseException, step: int) -> int:
        """Re-form after ``error`` hit step ``step``; returns the step training continues after.

        Raises :class:`ReformError` when the recovery cannot happen in place.
        """
        if self.reformations >= self.max_reformations:
            raise ReformError(f"{self.reformations} in-process recoveries already (recovery.max_reformations)")
        self.reformations += 1
        started = time.monotonic()
        reason = _one_line(error)
        failed = self.generation
        self.events.emit(EventKind.REFORM_BEGIN, step=self.completed.step, generation=failed, reason=reason)
        self.events.flush()
        if self.heartbeat is not None:
            self.heartbeat.beat(self.completed.step, Phase.INIT)  # the recovery's own, longer hang limit
        log.warning("rank %d: step %d failed (%s); re-forming in place", self.rank, step, reason)
        log.debug("the failure", exc_info=error)
        slots = GroupSlots(self.group_roots())
        self.abandon_step()
        self.restore_completed(self.completed)
        if self.checkpointer is not None:
            self.checkpointer.abandon()
        traceback.clear_frames(error.__traceback__)  # the failed step's frames hold groups and work too
        slots.release()
        if "nccl" in self.backend:  # NCCL communicators blocked on the lost peer are aborted, not waited out
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                abort()
        dist.destroy_process_group()
        # Reference counting alone left groups alive (held in cycles) in 2-core CI runs, so peers blocked
        # on this rank waited out the group timeout: collect, so that their sockets close now.
        gc.collect()
        released = time.monotonic()
        self.before_forming(self.completed.step)
        self._form(self.store.advance(failed))
        rebound = slots.rebind()
        formed = time.monotonic()
        try:
            source = self.sync_state(newcomer=False)
        except Exception as e:  # a second fault while the state moves: this generation is broken too
            raise ReformError(f"bringing generation {self.generation} to one state failed: {_one_line(e)}") from e
        self._finish(started, released, formed, source, newcomer=False, rebound=rebound)
        return self.completed.step

    def _form(self, generation: int) -> None:
        try:
            dist.init_process_group(
                self.backend,
                store=self.store.prefix(generation),
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=self.timeout_s),
            )
            self.create_groups()
        except Exception as e:  # the store, or a second fault while forming
            raise ReformError(f"forming generation {generation} failed: {_one_line(e)}") from e
        self.generation = generation
        self.store.record(self.rank, generation)

    # --------------------------------------------------------------------------------- newcomers

    def join_as_replacement(self) -> StateSource:
        """On a rank started to replace a lost one, once everything is built: receive the state."""
        started = time.monotonic()
        source = self.sync_state(newcomer=True)
        self._finish(started, started, started, source, newcomer=True, rebound=0)
        return source

    # ------------------------------------------------------------------------------------ state

    def sync_state(self, newcomer: bool) -> StateSource:
        """Agree on the state after a formation and bring every newcomer up to it; collective."""
        mine = (-1 if newcomer else self.completed.step, self.shard())
        rows: list[Any] = [None] * self.world_size
        dist.all_gather_object(rows, mine)
        steps = {r: s for r, (s, _) in enumerate(rows) if s >= 0}
        newcomers = sorted(r for r, (s, _) in enumerate(rows) if s < 0)
        if not newcomers and len(set(steps.values())) <= 1:
            return StateSource("none", 0, self.completed.step)
        replaced = tuple(newcomers)
        donors = {n: next((r for r in sorted(steps) if rows[r][1] == rows[n][1]), None) for n in newcomers}
        if len(set(steps.values())) > 1 or not steps or any(d is None for d in donors.values()):
            why = (
                "survivors disagree on the last step"
                if len(set(steps.values())) > 1
                else "no peer holds the same shard"
            )
            return self._load_everywhere(why, replaced)
        nbytes = 0
        for newcomer_rank in newcomers:
            nbytes += self._transfer(donors[newcomer_rank], newcomer_rank)
        return StateSource("peer", nbytes, self.completed.step, replaced)

    def _transfer(self, donor: int, newcomer: int) -> int:
        """The donor's whole local state to the newcomer (gloo point-to-point, CPU bytes)."""
        if self.rank == donor:
            buffer = io.BytesIO()
            torch.save(self.pack_state(), buffer)
            payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
            dist.send(torch.tensor([payload.numel()], dtype=torch.int64), dst=newcomer)
            dist.send(payload, dst=newcomer)
            return payload.numel()
        if self.rank == newcomer:
            size = torch.zeros(1, dtype=torch.int64)
            dist.recv(size, src=donor)
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
            dist.recv(payload, src=donor)
            saved = torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=False)
            self.unpack_state(saved)
            self.completed.step = int(saved["progress"]["step"])
            self.completed.loader = dict(saved["progress"]["loader"])
            return payload.numel()
        return 0  # a bystander

    def _load_everywhere(self, why: str, replaced: tuple[int, ...]) -> StateSource:
        if self.checkpointer is None:
            raise ReformError(f"{why}, and checkpoints are disabled: nothing to restore the replacement from")
        log.warning("rank %d: %s; every rank loads the newest intact checkpoint", self.rank, why)
        step = self.load_committed()
        if step is None:
            raise ReformError(f"{why}, and no checkpoint is committed yet")
        self.completed.step = step
        self.completed.loader = {}
        return StateSource(self.checkpointer.last_load_tier or "storage", 0, step, replaced)

    def _finish(
        self, started: float, released: float, formed: float, source: StateSource, *, newcomer: bool, rebound: int
    ) -> None:
        now = time.monotonic()
        self.events.emit(
            EventKind.REFORM_END,
            step=source.step,
            generation=self.generation,
            seconds=now - started,
            phases={"release": released - started, "form": formed - released, "state": now - formed},
            source=source.source,
            bytes=source.bytes,
            newcomer=newcomer,
            rebound_groups=rebound,
            replaced=list(source.replaced),
        )
        self.events.flush()
        # The heartbeat stays in the recovery's phase until the first step after it ends (the trainer's
        # next beat): that step waits for every newcomer to finish restoring, and must not look hung.
        log.warning(
            "rank %d: re-formed as generation %d in %.2fs (state from %s, %d bytes)",
            self.rank,
            self.generation,
            now - started,
            source.source,
            source.bytes,
        )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
