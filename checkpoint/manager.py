"""Save, commit, verify, load and prune sharded checkpoints of one job.

Protocol of one save of step N (every rank calls :meth:`CheckpointManager.save`):

1. rank 0 draws a fresh directory name ``step-N.tmp-<id>`` and broadcasts it;
2. all ranks write their shards there with ``torch.distributed.checkpoint`` (``dcp.save``, or
   ``dcp.async_save`` which stages a CPU copy and writes on a background thread). DCP's save is
   collective and returns only after every rank's shards and the DCP ``.metadata`` are written;
3. rank 0 checksums every file, writes ``manifest.json``, then the ``COMMITTED`` marker
   (create-if-absent), and on local disk renames the directory to ``step-N``;
4. rank 0 prunes old steps and stale temporary directories.

With ``lease_ttl_s`` set, rank 0 holds the run's lease (:mod:`stalwart.checkpoint.lease`) from
construction to :meth:`close`: a second job refuses to start (:class:`LeaseHeld`), and the marker
of step 3 is written only while the lease is still this job's and names its epoch; a job that
lost the lease gets :class:`LeaseLost` on every rank at its next save (or ``wait``) and stops.

With a :class:`~stalwart.checkpoint.memory_tier.MemoryTier` attached, ``load("latest")`` and
``load(N)`` take the newest complete copy among the host-memory tier and this persistent tier
(``ckpt_load`` events say which in ``tier``); ``latest-verified`` reads only the persistent tier,
the memory tier holds no verified steps. :meth:`CheckpointManager.rollback` is the entry point the
health side uses after silent data corruption or a loss spike.

A crash anywhere before 3 leaves an uncommitted directory that no reader looks at. Loading picks
the newest committed step whose files match their manifest; a damaged step is skipped with a
``ckpt_fail`` event naming the file, and the previous committed step is loaded instead.

Collectives: construction (creates a dedicated gloo group), ``save``, ``wait`` and ``load`` must be
called by every rank in the same order. ``poll``, ``committed_steps``, ``latest`` and ``prune`` are
local; ``mark_verified`` and ``prune`` write only on rank 0.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import BlockingAsyncStager

from stalwart.checkpoint import naming
from stalwart.checkpoint.catalog import CheckpointCatalog, CheckpointError, NoCheckpointError
from stalwart.checkpoint.lease import LeaseHeld, LeaseLost, RunLease
from stalwart.checkpoint.manifest import MANIFEST_NAME, CheckpointManifest, compute_files
from stalwart.checkpoint.memory_tier import TIER as MEMORY_TIER
from stalwart.checkpoint.memory_tier import MemoryTier
from stalwart.checkpoint.storage import Storage
from stalwart.events import ABANDONED_SAVE, EventKind, EventLog

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "CheckpointManager", "LeaseHeld", "LeaseLost", "NoCheckpointError", "storage_reader"]

# DCP's CheckpointException derives from BaseException; catch it explicitly next to Exception.
_SAVE_ERRORS = (Exception, CheckpointException)
_FENCED = "fenced: "  # a commit error that means the run lease is lost (it stops the job on every rank)


@dataclass
class _PendingSave:
    step: int
    started: float
    future: Future[str | None]  # resolves to rank 0's commit error (None = committed)


class CheckpointManager:
    """Checkpoints of one job under ``base_url`` (a path, ``file://`` or ``s3://bucket/prefix``).

    ``keep_last`` newest steps and every ``keep_every``-th step survive pruning, as do the newest
    verified step and any step being loaded. ``checksum`` is ``"crc32"`` (fast) or ``"sha256"``.
    ``cache_staging`` keeps one staging copy of the state between async saves (pinned memory on
    GPU hosts: allocating it costs seconds, reusing it is cheap); it holds a full CPU copy of this
    rank's state for the life of the manager. It is ignored on hosts without an accelerator.
    """

    def __init__(
        self,
        base_url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        keep_last: int = 3,
        keep_every: int = 0,
        process_group: dist.ProcessGroup | None = None,
        events: EventLog | None = None,
        checksum: str = "crc32",
        thread_count: int = 1,
        cache_staging: bool = False,
        memory: MemoryTier | None = None,
        lease_ttl_s: float | None = None,
        joining: bool = False,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: keep at least the newest checkpoint (keep_last >= 1)")
        self.storage = Storage(base_url, storage_options)
        self.catalog = CheckpointCatalog(self.storage, threads=max(4, thread_count))
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.events = events
        self.checksum = checksum
        self.thread_count = thread_count
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed and process_group is None:
            # Saves run collectives on a background thread; a dedicated CPU group keeps them off the
            # training group (sharing it with an in-flight async save can hang).
            process_group = dist.new_group(backend="gloo")
        self.pg = process_group
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        # The cached copy is pinned memory, which needs an accelerator; without one a fresh copy
        # per save is cheap anyway.
        self._stager = BlockingAsyncStager(cache_staged_state_dict=cache_staging and torch.accelerator.is_available())
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit")
        self._pending: _PendingSave | None = None
        self._loading: set[int] = set()
        self.memory = memory
        self.last_load_tier: str | None = None  # where the last load came from: "memory" or storage.scheme
        self.lease: RunLease | None = None
        if lease_ttl_s is not None:
            self._take_lease(lease_ttl_s, collective=not joining)

    # ---------------------------------------------------------------------------------- lease

    def _take_lease(self, ttl_s: float, collective: bool = True) -> None:
        """Rank 0 takes the run's lease; every rank raises :class:`LeaseHeld` when another live job holds it.

        A rank joining a running world in a lost rank's place (``collective`` false) cannot broadcast:
        its peers are not in this call. As rank 0 it takes the lease alone (the same job: the next
        epoch); any other rank leaves it to the rank 0 that holds it.
        """
        if not collective and self.rank != 0:
            return
        answer: tuple[str, str] | None = None
        if self.rank == 0:
            lease = RunLease(self.storage, ttl_s=ttl_s)
            try:
                record = lease.acquire(inherited=lambda: self.catalog.committed_dirs().values())
            except LeaseHeld as e:
                answer = ("held", str(e))
            except Exception as e:
                answer = ("error", f"cannot take the run lease under {self.storage.base_url}: {_describe(e)}")
            else:
                self.lease, answer = lease, ("ok", str(record.epoch))
                lease.start_renewing()
        kind, detail = self._broadcast(answer) if collective else answer
        if kind == "held":
            raise LeaseHeld(detail)
        if kind == "error":
            raise CheckpointError(f"{detail}; retry when the store is reachable")

    # ----------------------------------------------------------------------------------- save

    def rank_key(self, name: str) -> str:
        """State-dict key for per-rank objects (RNG state): DCP reshards tensors, not objects."""
        return f"{name}.rank{self.rank}"

    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        layout: dict[str, Any] | None = None,
        config_hash: str = "",
        verified: bool = False,
        async_: bool = False,
        model: dict[str, Any] | None = None,
        tokenizer: str = "",
    ) -> None:
        """Save ``state`` as step ``step``; collective. Finishes the previous async save first.

        Sync mode returns once the step is committed (or raises :class:`CheckpointError` on
        every rank). Async mode returns after staging a CPU copy; the state may be mutated right
        away. Call :meth:`wait` to learn whether it committed; a failed async save found by the
        next ``save`` is logged (and was reported as ``ckpt_fail``) and does not stop this one.
        """
        try:
            self.wait()
        except LeaseLost:
            raise
        except CheckpointError as e:  # reported (ckpt_fail, one line) when it failed
            logger.info("%s; saving step %d anyway", e, step)
        self._flush_events()  # the step's own events (step_end) reach the log before it can be committed
        started = time.monotonic()
        token = self._broadcast(uuid.uuid4().hex[:12] if self.rank == 0 else None)
        tmp = naming.tmp_name(step, token)
        meta = dict(
            layout=dict(layout or {}),
            config_hash=config_hash,
            verified=verified,
            model=dict(model or {}),
            tokenizer=tokenizer,
        )
        writer = self._writer(tmp)
        try:
            if async_:
                upload = dcp.async_save(
                    state,
                    storage_writer=writer,
                    process_group=self.pg,
                    async_stager=self._stager,
                    no_dist=not self.distributed,
                )
            else:
                dcp.save(state, storage_writer=writer, process_group=self.pg, no_dist=not self.distributed)
        except _SAVE_ERRORS as e:
            reason = self._write_failure(tmp, e)
            self._fail(step, reason)
            self._discard_failed(tmp)
            raise CheckpointError(
                f"checkpoint step {step} was not saved: {reason}; the previous committed step is intact", reason
            ) from e
        blocking = time.monotonic() - started
        self._emit(
            EventKind.CKPT_STAGE,
            step=step,
            blocking_seconds=blocking,
            bytes=_local_bytes(state),
            tier=self.storage.scheme,
        )
        if async_:
            future = self._committer.submit(self._finish_async, upload, step, tmp, meta, started)
            self._pending = _PendingSave(step, started, future)
        else:
            error = self._commit_on_rank0(step, tmp, meta, started)
            self._raise_if_failed(step, self._broadcast(error))

    @property
    def is_loading(self) -> bool:
        """A load is writing into the live state right now (it is half old, half new until it returns)."""
        return bool(self._loading)

    def poll(self) -> bool:
        """True when no save is in flight on this rank (local, non-blocking)."""
        return self._pending is None or self._pending.future.done()

    def wait(self) -> int | None:
        """Finish the in-flight async save; collective. Returns its step, None if none was pending.

        Raises :class:`CheckpointError` on every rank when the save did not commit.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        error = pending.future.result()
        self._raise_if_failed(pending.step, self._broadcast(error))
        return pending.step

    def abandon(self, timeout_s: float = 10.0) -> None:
        """Give up the in-flight save after a peer was lost; local, never raises.

        Its collectives fail with the lost peer, so its commit never happens; the previous committed
        step is intact. The memory tier's in-flight copy is given up the same way.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                error = pending.future.result(timeout=timeout_s)
            except BaseException as e:  # noqa: BLE001 (DCP's CheckpointException is a BaseException)
                error = str(e)
            self._fail(pending.step, f"{ABANDONED_SAVE} ({error or 'in flight'})")
        if self.memory is not None:
            self.memory.abandon(timeout_s)

    def _finish_async(self, upload: Future, step: int, tmp: str, meta: dict[str, Any], started: float) -> str | None:
        try:
            upload.result()
        except _SAVE_ERRORS as e:
            reason = self._write_failure(tmp, e)
            self._fail(step, reason)
            self._discard_failed(tmp)
            return reason
        return self._commit_on_rank0(step, tmp, meta, started)

    def _commit_on_rank0(self, step: int, tmp: str, meta: dict[str, Any], started: float) -> str | None:
        """Manifest, marker, rename, prune; returns why the commit failed (None = committed)."""
        if self.rank != 0:
            return None
        try:
            sizes = self.storage.walk_files(tmp)
            if ".metadata" not in sizes:
                raise CheckpointError(f"DCP wrote no .metadata under {self.storage.url(tmp)}")
            files = compute_files(
                sizes, lambda rel: self.storage.open_read(f"{tmp}/{rel}"), self.checksum, max(4, self.thread_count)
            )
            manifest = CheckpointManifest(
                step=step, world_size=self.world_size, files=files, checksum=self.checksum, **meta
            )
            self.storage.write_bytes(f"{tmp}/{MANIFEST_NAME}", manifest.to_json().encode())
            self._flush_events()  # nothing the log said before the commit may be lost after it
            if self.lease is not None:
                self.lease.check()  # a job that lost the run to another never commits into it
            marker = {"step": step, "dir": tmp, "committed_at": time.time(), "epoch": self.lease and self.lease.epoch}
            self.storage.write_bytes(f"{tmp}/{naming.COMMIT_MARKER}", json.dumps(marker).encode(), exclusive=True)
            if self.storage.is_local:
                self._rename_committed(step, tmp)
        except LeaseLost as e:
            self._fail(step, f"not committed: {e}")
            return _FENCED + str(e)
        except _SAVE_ERRORS as e:
            condition = self.storage.local_condition()
            reason = f"committing {self.storage.url(tmp)} failed: {_describe(e)}" + (
                f" ({condition})" if condition else ""
            )
            self._fail(step, reason)
            self._discard_failed(tmp)
            return reason
        self._emit(
            EventKind.CKPT_COMMIT,
            step=step,
            seconds=time.monotonic() - started,
            bytes=manifest.total_bytes,
            tier=self.storage.scheme,
        )
        self._flush_events()
        logger.info(
            "checkpoint step %d committed under %s (%d bytes)", step, self.storage.base_url, manifest.total_bytes
        )
        try:
            self.prune()
        except Exception as e:  # a failed prune costs space, never the new checkpoint
            logger.warning("pruning checkpoints under %s failed: %s", self.storage.base_url, _describe(e))
        return None

    def _rename_committed(self, step: int, tmp: str) -> None:
        """Give a committed local directory its final name; an older copy of the step moves aside."""
        final = naming.final_name(step)
        if self.storage.exists(final):
            aside = naming.tmp_name(step, uuid.uuid4().hex[:12])  # still committed, but older
            self.storage.rename_dir(final, aside)
            self.storage.rename_dir(tmp, final)
            self.catalog.uncommit(aside)  # marker first: a crash here never leaves a committed copy with holes
        else:
            self.storage.rename_dir(tmp, final)

    def _raise_if_failed(self, step: int, error: str | None) -> None:
        if error is not None and error.startswith(_FENCED):
            raise LeaseLost(f"checkpoint step {step} was not committed: {error.removeprefix(_FENCED)}")
        if error is not None:
            raise CheckpointError(
                f"checkpoint step {step} did not commit: {error}; the previous committed step is intact", error
            )

    # ---------------------------------------------------------------------------------- query

    def committed_steps(self) -> list[int]:
        """Every committed step, oldest first (intactness is checked only on load)."""
        return self.catalog.committed_steps()

    def manifest(self, step: int) -> CheckpointManifest:
        return self.catalog.manifest(step)

    def latest(self, verified_only: bool = False) -> int | None:
        """The newest committed (or verified) step, None when there is none."""
        return self.catalog.latest(verified_only)

    def mark_verified(self, step: int) -> None:
        """Record that ``step`` passed an SDC check (rank 0 writes); retention keeps the newest such step."""
        if self.rank == 0:
            self.catalog.mark_verified(step)

    def step_dir(self, step: int) -> str:
        """The directory (relative to the root) of committed ``step``."""
        return self.catalog.step_dir(step)

    def reader(self, step: int) -> dcp.StorageReader:
        """A DCP reader of committed ``step`` (its ``.metadata`` lists every tensor's shape and dtype)."""
        return self._reader(self.step_dir(step))

    def verify(self, step: int) -> list[str]:
        """Every file of committed ``step`` that does not match its manifest, one line each; [] = intact."""
        self._loading.add(step)
        try:
            return self.catalog.verify(step)
        finally:
            self._loading.discard(step)

    # ----------------------------------------------------------------------------------- load

    def load(
        self, state: dict[str, Any], step: int | str = "latest", *, verified_only: bool = False, **details: Any
    ) -> int:
        """Load a committed step into ``state`` in place; collective. Returns the step loaded.

        ``step`` is ``"latest"``, ``"latest-verified"`` or a step number (that step, or the
        newest intact one before it when it is damaged). Rank 0 checks every file against the
        manifest first; a damaged step is skipped with a ``ckpt_fail`` event. Raises
        :class:`NoCheckpointError` on every rank when nothing intact is left. ``verified_only``
        takes only SDC-verified steps; ``details`` go into the ``ckpt_load`` event.
        """
        if step not in ("latest", "latest-verified") and not isinstance(step, int):
            raise ValueError(f"step={step!r}: use 'latest', 'latest-verified' or a step number")
        self.wait()
        started = time.monotonic()
        in_memory = None if verified_only else self._memory_candidate(step)
        if in_memory is not None and (
            isinstance(step, int) or not self._broadcast(self._stored_newer_on_rank0(in_memory))
        ):
            if self._load_memory(state, in_memory):
                return in_memory
            in_memory = None
        choice = self._broadcast(self._choose_on_rank0(step, verified_only) if self.rank == 0 else None)
        # The newest stored step was damaged and an older one chosen: the memory copy may be newer.
        if (
            in_memory is not None
            and (choice[0] != "ok" or choice[1] < in_memory)
            and self._load_memory(state, in_memory)
        ):
            return in_memory
        if choice[0] == "none":
            raise NoCheckpointError(choice[1])
        if choice[0] == "error":
            raise CheckpointError(choice[1])
        _, chosen, name, nbytes = choice
        self._loading.add(chosen)
        try:
            dcp.load(state, storage_reader=self._reader(name), process_group=self.pg, no_dist=not self.distributed)
        except _SAVE_ERRORS as e:
            self._fail(chosen, f"loading {self.storage.url(name)} failed: {_describe(e)}")
            raise CheckpointError(
                f"loading checkpoint step {chosen} from {self.storage.url(name)} failed: {_describe(e)}; "
                f"check that the model/optimizer state matches the checkpoint's (same keys and shapes)"
            ) from None
        finally:
            self._loading.discard(chosen)
        self._emit(
            EventKind.CKPT_LOAD,
            step=chosen,
            seconds=time.monotonic() - started,
            bytes=nbytes,
            tier=self.storage.scheme,
            **details,
        )
        self.last_load_tier = self.storage.scheme
        return chosen

    def _memory_candidate(self, request: int | str) -> int | None:
        """The memory tier's newest complete step that satisfies ``request``; collective."""
        if self.memory is None or request == "latest-verified":
            return None
        newest = self.memory.newest_complete()
        if isinstance(request, int):
            return request if newest == request else None
        return newest

    def _stored_newer_on_rank0(self, step: int) -> bool | None:
        """Whether storage holds a committed step newer than ``step`` (rank 0; None elsewhere)."""
        if self.rank != 0:
            return None
        try:
            newest = self.latest()
        except Exception:  # an unreachable store: the memory copy is what there is
            return False
        return newest is not None and newest > step

    def _load_memory(self, state: dict[str, Any], step: int) -> bool:
        """Load ``step`` from the memory tier; False (on every rank) sends the caller to storage."""
        try:
            self.memory.load(state, step)
        except Exception as e:
            logger.warning("%s; loading from %s instead", e, self.storage.base_url)
            self._emit(EventKind.CKPT_FAIL, step=step, reason=str(e), tier=MEMORY_TIER)
            return False
        self.last_load_tier = MEMORY_TIER
        return True

    def rollback(
        self,
        state: dict[str, Any],
        to: int | str = "latest-verified",
        *,
        reason: str,
        from_step: int | None = None,
        verified_only: bool = False,
        **details: Any,
    ) -> int:
        """Load ``to`` into ``state`` (collective), flag newer steps rolled back, record a ``rollback`` event.

        The health side calls this after silent data corruption, the trainer for a controller's
        rollback order; ``to`` is ``"latest-verified"`` (the default), ``"latest"`` or a step number,
        ``from_step`` the step training had reached; ``details`` go into both events. Returns the step.
        """
        step = self.load(state, step=to, verified_only=verified_only, **details)
        if self.memory is not None:
            self.memory.discard()  # newer host-memory copies hold the state being rolled back
        if self.rank == 0:
            superseded = self.catalog.mark_rolled_back(after=step)
            self._emit(
                EventKind.ROLLBACK,
                from_step=from_step,
                to_step=step,
                reason=reason,
                tier=self.last_load_tier,
                superseded=superseded,
                **details,
            )
        logger.warning("rolled back to step %d (%s) from %s: %s", step, self.last_load_tier, from_step, reason)
        return step

    def _choose_on_rank0(self, request: int | str, verified_only: bool = False) -> tuple:
        """("ok", step, directory, bytes), ("none", why) or ("error", why); never raises.

        Rank 0 must not raise here: the other ranks wait in the broadcast of its answer. An
        unreachable store is an "error", not "none": the caller must not start from scratch then.
        """
        try:
            choice = self.catalog.choose(request, on_damage=self._fail, verified_only=verified_only)
        except Exception as e:
            return (
                "error",
                f"cannot read checkpoints under {self.storage.base_url}: {_describe(e)}; retry when the store is "
                "reachable",
            )
        if choice.step is None:
            return "none", choice.why
        return "ok", choice.step, choice.name, choice.bytes

    # ---------------------------------------------------------------------------------- prune

    def prune(self) -> list[str]:
        """Delete steps retention does not keep and stale temporary directories; rank 0 only.

        Never deletes the newest verified step, a step this process is loading, or a temporary
        directory newer than the newest committed step (it may be a save in flight). Returns the
        deleted directory names.
        """
        if self.rank != 0:
            return []
        return self.catalog.prune(self.keep_last, self.keep_every, protected=set(self._loading))

    # -------------------------------------------------------------------------------- helpers

    def close(self) -> None:
        """Finish the in-flight save (collective) and release the background thread."""
        try:
            self.wait()
        finally:
            self._committer.shutdown(wait=True)
            self._stager.close()
            if self.memory is not None:
                self.memory.close()
            if self.lease is not None:
                self.lease.close(release=True)  # the job ended here: the next one may take the run at once

    def _writer(self, rel: str) -> dcp.StorageWriter:
        if self.storage.is_local:
            return dcp.FileSystemWriter(self.storage.path(rel), thread_count=self.thread_count)
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(self.storage.url(rel), thread_count=self.thread_count, **self.storage.storage_options)

    def _reader(self, rel: str) -> dcp.StorageReader:
        return storage_reader(self.storage, rel)

    def _broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (identity without a process group)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def _fail(self, step: int, reason: str) -> None:
        """A ``ckpt_fail`` event from every rank; the console line from rank 0 only (the job's one line)."""
        logger.log(logging.ERROR if self.rank == 0 else logging.INFO, "checkpoint step %d: %s", step, reason)
        self._emit(EventKind.CKPT_FAIL, step=step, reason=reason, tier=self.storage.scheme)

    def _write_failure(self, tmp: str, e: BaseException) -> str:
        """Why writing the shards of ``tmp`` failed, with what the local file system shows (full, read-only)."""
        condition = self.storage.local_condition()
        return f"writing shards to {self.storage.url(tmp)} failed: {_describe(e)}" + (
            f" ({condition})" if condition else ""
        )

    def _discard_failed(self, tmp: str) -> None:
        """Rank 0 deletes what a failed save left (its shards fill a full disk); never raises.

        Every rank is past its writes when a failure is known (DCP gathers them), so nothing writes there
        any more. A leftover that cannot be deleted now (read-only storage) goes with the next prune.
        """
        if self.rank != 0:
            return
        try:
            # A marker there (the rename after it failed) makes it a committed step: never ours to delete.
            if self.storage.exists(tmp) and not self.storage.exists(f"{tmp}/{naming.COMMIT_MARKER}"):
                self.storage.delete_tree(tmp)
        except Exception as e:
            logger.info("could not delete the failed save's %s yet (%s); a later prune will", tmp, _describe(e))

    def _flush_events(self) -> None:
        if self.events is not None:
            self.events.flush()

    def _emit(self, kind: EventKind, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(kind, **fields)


def storage_reader(storage: Storage, rel: str) -> dcp.StorageReader:
    """A DCP reader of the step directory ``rel`` under ``storage`` (local disk or fsspec)."""
    if storage.is_local:
        return dcp.FileSystemReader(storage.path(rel))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(storage.url(rel), **storage.storage_options)


def _describe(e: BaseException) -> str:
    """One line naming the root cause; DCP wraps each rank's error in a CheckpointException."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _) = next(iter(sorted(e.failures.items(), key=lambda kv: kv[0])))
        return f"rank {rank}: {_describe(inner)}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def _local_bytes(state: Any) -> int:
    """Bytes of tensor data this rank holds in ``state`` (a DTensor counts its local shard)."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_local_bytes(v) for v in state)
    return 0  # Stateful objects are not expanded here: their state_dict() can be costly
