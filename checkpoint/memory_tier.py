"""Host-memory checkpoint tier: each rank's latest state in its node's RAM and in a peer node's RAM.

Where the copies live, and why. Under torch elastic a restart kills every worker process, so a
copy held inside a trainer process dies with the very failure it should survive. A per-node store
daemon would outlive the workers, but it is one more process to start, supervise and reach. The
copies are therefore files on the node's tmpfs (``/dev/shm``): tmpfs pages *are* host memory
(written and read at memory speed, never touching a disk), they outlive the processes that wrote
them, and the next incarnation of the worker group on that node reads them back without any
rendezvous with a daemon. Losing a node loses its tmpfs; that is what the peer copy is for.

Placement. Ranks are node-major (``LOCAL_WORLD_SIZE`` per node). Rank r's state is written into
its own node's directory and sent over the process group (gloo, CPU bytes) to its *holder*: the
rank with the same local rank on the next node, which writes it into that node's directory. With
a single node the holder is the next rank, so a one-machine test exercises the same path (simulated
nodes use a ``{node}`` placeholder in the directory). Any one node can vanish and every rank's
state still exists once.

Files and integrity. One file per (rank, step, holder): ``rank00003.step00000120.by00005.mem``, a small JSON
header (rank, step, fingerprint, payload size, crc32) and the ``torch.save`` payload of the
rank's *local* state (DTensors as their local shards, Stateful objects as their state dicts). A
file is written under a ``.partial-`` name and renamed into place; the header's size and crc32
catch a torn or damaged copy, which is ignored. Copies only load into a job with the same
fingerprint (world size, parallel layout, config hash): local shards do not reshard; after an
elastic resize the persistent tier, which DCP reshards, is used instead.

Save (collective on a dedicated gloo group): the training loop blocks only while the state is
copied to host buffers (pinned and reused on CUDA); serialising, writing and the peer exchange run
on a background thread. When every rank has both copies of step N, the older steps are deleted, so
steady state costs two copies of the state per node plus one step in flight.

Load: every rank lists the intact copies its node's directory holds; the newest step for which
every rank's state exists somewhere is *complete*; ranks that lack their own copy receive it from
a rank that can read it. :class:`~stalwart.checkpoint.manager.CheckpointManager` compares that step
with the persistent tier and loads the newest.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map_only

from stalwart.events import EventKind, EventLog
from stalwart.files import atomic_write

logger = logging.getLogger(__name__)

TIER = "memory"
_MAGIC = b"STWMEM1\n"
_SUFFIX = ".mem"


def default_memory_dir(run_dir: str | os.PathLike) -> str:
    """A per-job directory on tmpfs (``/dev/shm``), or the temp dir where there is no tmpfs."""
    import hashlib
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    job = hashlib.sha256(os.path.abspath(os.fspath(run_dir)).encode()).hexdigest()[:12]
    return f"{base}/stalwart-{job}"


def holder_of(rank: int, world_size: int, local_world_size: int) -> int:
    """The rank whose node keeps the peer copy of ``rank``: same local rank, next node."""
    nodes = world_size // local_world_size if local_world_size and world_size % local_world_size == 0 else 1
    if nodes > 1:
        node, local = divmod(rank, local_world_size)
        return ((node + 1) % nodes) * local_world_size + local
    return (rank + 1) % world_size


@dataclass(frozen=True)
class MemoryCopy:
    rank: int
    step: int
    path: Path


def _name(rank: int, step: int, writer: int) -> str:
    return f"rank{rank:05d}.step{step:08d}.by{writer:05d}{_SUFFIX}"


def write_copy(
    directory: Path, rank: int, step: int, fingerprint: str, payload: bytes, writer: int | None = None
) -> Path:
    """Write rank ``rank``'s copy atomically (partial name, then rename); ``writer`` holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    header = json.dumps(
        {
            "rank": rank,
            "step": step,
            "fingerprint": fingerprint,
            "size": len(payload),
            "crc32": f"{zlib.crc32(payload):08x}",
        }
    ).encode()
    final = directory / _name(rank, step, rank if writer is None else writer)

    def write(f: BinaryIO) -> None:
        f.write(_MAGIC + struct.pack("<I", len(header)) + header)
        f.write(payload)

    atomic_write(final, write, durable=False)  # host memory (tmpfs): a crash loses it anyway
    return final


def read_copy(path: Path, fingerprint: str) -> tuple[dict[str, Any], bytes]:
    """Header and payload of an intact copy; raises ValueError naming what is wrong."""
    data = path.read_bytes()
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
        raise ValueError(f"{path.name}: not a memory-tier copy (bad magic)")
    (hlen,) = struct.unpack_from("<I", data, len(_MAGIC))
    start = len(_MAGIC) + 4
    try:
        header = json.loads(data[start : start + hlen])
    except ValueError:
        raise ValueError(f"{path.name}: torn header") from None
    payload = data[start + hlen :]
    if header["fingerprint"] != fingerprint:
        raise ValueError(f"{path.name}: written by another layout or run (fingerprint {header['fingerprint']})")
    if len(payload) != header["size"]:
        raise ValueError(f"{path.name}: torn, {len(payload)} of {header['size']} payload bytes")
    if f"{zlib.crc32(payload):08x}" != header["crc32"]:
        raise ValueError(f"{path.name}: fails its crc32 check")
    return header, payload


def scan(directory: Path, fingerprint: str) -> dict[tuple[int, int], Path]:
    """Intact copies in ``directory`` as {(rank, step): path}; torn, foreign or partial ones are skipped."""
    found: dict[tuple[int, int], Path] = {}
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob(f"rank*{_SUFFIX}")):
        try:
            header, _ = read_copy(path, fingerprint)
        except (OSError, ValueError, KeyError) as e:
            logger.warning("ignoring memory-tier copy: %s", e)
            continue
        found.setdefault((int(header["rank"]), int(header["step"])), path)
    return found


def plain_state(state: dict[str, Any]) -> dict[str, Any]:
    """Stateful entries replaced by their state dicts (what DCP does before saving)."""
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}


def restore_into(state: dict[str, Any], saved: dict[str, Any]) -> None:
    """Load ``saved`` (local tensors) into ``state`` in place, the way ``dcp.load`` does."""
    for key, value in state.items():
        if key not in saved:
            raise KeyError(f"memory copy lacks state entry {key!r}")
        if isinstance(value, Stateful):
            value.load_state_dict(_restore(value.state_dict(), saved[key], key))
        else:
            state[key] = _restore(value, saved[key], key)


def _restore(target: Any, saved: Any, path: str) -> Any:
    if isinstance(target, torch.Tensor) and isinstance(saved, torch.Tensor):
        local = target.to_local() if isinstance(target, DTensor) else target
        if local.shape != saved.shape:
            raise ValueError(
                f"{path}: memory copy has shape {tuple(saved.shape)}, this rank holds {tuple(local.shape)}"
            )
        with torch.no_grad():
            local.copy_(saved)
        return target
    if isinstance(target, dict) and isinstance(saved, dict):
        if target.keys() - saved.keys():
            raise KeyError(f"{path}: memory copy lacks {sorted(map(str, target.keys() - saved.keys()))[:3]}")
        return {k: _restore(target.get(k), v, f"{path}.{k}") for k, v in saved.items()}
    if isinstance(target, (list, tuple)) and isinstance(saved, (list, tuple)) and len(target) == len(saved):
        return type(saved)(_restore(t, s, f"{path}.{i}") for i, (t, s) in enumerate(zip(target, saved)))
    return saved


def stage_tree(tree: Any) -> Any:
    """A CPU copy of every tensor in ``tree`` (DTensors as their local shards), for sending or saving."""
    return _HostStager().stage(tree)


class _HostStager:
    """Copies a state tree to host memory; on CUDA into pinned buffers allocated once and reused."""

    def __init__(self) -> None:
        self._pinned: list[torch.Tensor] = []

    def stage(self, tree: Any) -> Any:
        tensors: list[torch.Tensor] = []

        def grab(t: torch.Tensor) -> torch.Tensor:
            tensors.append(t.to_local() if isinstance(t, DTensor) else t)
            return t

        tree_map_only(torch.Tensor, grab, tree)
        on_device = any(t.device.type != "cpu" for t in tensors)
        reuse = on_device and [(b.shape, b.dtype) for b in self._pinned] == [(t.shape, t.dtype) for t in tensors]
        if on_device and not reuse:
            self._pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        copies = iter(
            [b.copy_(t.detach(), non_blocking=True) for b, t in zip(self._pinned, tensors)]
            if on_device
            else [t.detach().clone() for t in tensors]
        )
        if on_device:
            torch.accelerator.synchronize()
        return tree_map_only(torch.Tensor, lambda _: next(copies), tree)


@dataclass
class _Pending:
    step: int
    future: Future[None]


class MemoryTier:
    """The host-memory tier of one job; every method except ``poll`` is collective.

    ``directory`` may hold ``{node}`` (the node index), which lets one machine simulate several
    nodes in tests; on a real cluster each host's ``/dev/shm`` is its own anyway.
    """

    def __init__(
        self,
        directory: str,
        fingerprint: str,
        *,
        events: EventLog | None = None,
        local_world_size: int | None = None,
    ) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        lws = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        self.local_world_size = lws if self.world_size % lws == 0 else self.world_size
        self.node = self.rank // self.local_world_size
        self.directory = Path(directory.format(node=self.node))
        self.fingerprint = fingerprint
        self.events = events
        self.holder = holder_of(self.rank, self.world_size, self.local_world_size)
        self.source = next(
            r for r in range(self.world_size) if holder_of(r, self.world_size, self.local_world_size) == self.rank
        )
        # Its own group: the exchange runs on a background thread next to training and DCP saves.
        self.pg = dist.new_group(backend="gloo") if self.distributed else None
        self._stager = _HostStager()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-memory")
        self._pending: _Pending | None = None
        self._survey: list[list[tuple[int, int]]] = []

    # ------------------------------------------------------------------------------- save

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Stage ``state`` to host memory (blocking), then write and replicate it in the background."""
        self.wait()
        started = time.monotonic()
        staged = self._stager.stage(plain_state(state))
        blocking = time.monotonic() - started
        nbytes = sum(t.numel() * t.element_size() for t in _tensors(staged))
        self._emit(EventKind.CKPT_STAGE, step=step, blocking_seconds=blocking, bytes=nbytes, tier=TIER)
        self._pending = _Pending(step, self._worker.submit(self._write_and_replicate, step, staged, started))

    def poll(self) -> bool:
        return self._pending is None or self._pending.future.done()

    def wait(self) -> int | None:
        """Finish the in-flight save; its failure was already reported, training goes on."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        pending.future.result()
        return pending.step

    def abandon(self, timeout_s: float = 10.0) -> None:
        """Give up the in-flight save after a peer was lost (its exchange fails with the peer); never raises."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.future.result(timeout=timeout_s)
            except Exception as e:
                logger.warning("memory-tier save of step %d abandoned: %s", pending.step, e)

    def _write_and_replicate(self, step: int, staged: Any, started: float) -> None:
        payload, ok = b"", True
        try:
            buffer = io.BytesIO()
            torch.save(staged, buffer)
            payload = buffer.getvalue()
            write_copy(self.directory, self.rank, step, self.fingerprint, payload)
        except Exception as e:  # collectives below still run, so that no rank waits forever
            ok = False
            self._fail(step, f"writing the host copy under {self.directory} failed: {e}")
        sizes = self._all_gather([len(payload) if ok else -1])
        if self.holder != self.rank:
            received = self._exchange(payload, sizes)
            if received is not None:
                try:
                    write_copy(self.directory, self.source, step, self.fingerprint, received, writer=self.rank)
                except Exception as e:
                    ok = False
                    self._fail(step, f"writing the peer copy of rank {self.source} under {self.directory} failed: {e}")
        results = self._all_gather([1 if ok and sizes[self.source][0] >= 0 else 0])
        if all(r[0] for r in results):
            self._drop_older_than(step)
            if self.rank == 0:
                total = sum(s[0] for s in sizes)
                self._emit(EventKind.CKPT_COMMIT, step=step, seconds=time.monotonic() - started, bytes=total, tier=TIER)

    def _exchange(self, payload: bytes, sizes: list[list[int]]) -> bytes | None:
        """Send this rank's payload to its holder and receive its source's; skips failed sides."""
        ops = []
        if sizes[self.rank][0] >= 0:
            ops.append(dist.P2POp(dist.isend, _as_tensor(payload), self.holder, group=self.pg))
        incoming = None
        if sizes[self.source][0] >= 0:
            incoming = torch.empty(sizes[self.source][0], dtype=torch.uint8)
            ops.append(dist.P2POp(dist.irecv, incoming, self.source, group=self.pg))
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        return incoming.numpy().tobytes() if incoming is not None else None

    def _drop_older_than(self, step: int) -> None:
        """Every rank has both copies of ``step``: other steps on this node go (one rank per node)."""
        if self.rank % self.local_world_size != 0:
            return
        for path in self.directory.glob(f"rank*{_SUFFIX}*"):
            if f".step{step:08d}." not in path.name or ".partial-" in path.name:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------- load

    def newest_complete(self) -> int | None:
        """The newest step whose every rank's copy is intact somewhere; collective."""
        self.wait()
        self._survey = self._all_gather_object(sorted(scan(self.directory, self.fingerprint)))
        return _newest_complete(self._survey, self.world_size)

    def load(self, state: dict[str, Any], step: int) -> int:
        """Load ``step`` (from :meth:`newest_complete`'s survey) into ``state``; returns bytes received.

        Raises on every rank when any rank failed, so the caller can fall back together.
        """
        started = time.monotonic()
        readable = {rank: {tuple(c) for c in copies} for rank, copies in enumerate(self._survey)}
        local = scan(self.directory, self.fingerprint)
        received, error = 0, None
        payload: bytes | None = None
        if (self.rank, step) in local:
            try:
                payload = read_copy(local[(self.rank, step)], self.fingerprint)[1]
            except (OSError, ValueError, KeyError) as e:
                error = f"rank {self.rank}: its copy vanished since the survey: {e}"
        for owner in range(self.world_size):
            if (owner, step) in readable[owner]:
                continue
            sender = min(r for r, copies in readable.items() if (owner, step) in copies)
            if self.rank == sender:
                try:
                    data = _as_tensor(read_copy(local[(owner, step)], self.fingerprint)[1])
                except (OSError, ValueError, KeyError) as e:  # gone since the survey: tell the owner
                    data, error = None, f"rank {self.rank}: the copy of rank {owner} vanished: {e}"
                dist.send(torch.tensor([data.numel() if data is not None else -1]), owner, group=self.pg)
                if data is not None:
                    dist.send(data, owner, group=self.pg)
            elif self.rank == owner:
                size = torch.zeros(1, dtype=torch.int64)
                dist.recv(size, sender, group=self.pg)
                if size.item() >= 0:
                    data = torch.empty(int(size.item()), dtype=torch.uint8)
                    dist.recv(data, sender, group=self.pg)
                    payload, received = data.numpy().tobytes(), int(size.item())
        try:
            if error is None:
                if payload is None:
                    raise ValueError(f"no copy of step {step} reached this rank")
                restore_into(state, torch.load(io.BytesIO(payload), weights_only=False))
        except Exception as e:
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        errors = [e for e in self._all_gather_object(error) if e]
        if errors:
            raise RuntimeError(f"memory-tier copy of step {step} did not load: {errors[0]}")
        self._emit(
            EventKind.CKPT_LOAD,
            step=step,
            seconds=time.monotonic() - started,
            bytes=len(payload or b""),
            peer_bytes=received,
            tier=TIER,
        )
        return received

    def discard(self) -> None:
        """Release this node's host memory (the job is done); one rank per node deletes."""
        self.wait()
        if self.rank % self.local_world_size == 0:
            for path in self.directory.glob(f"rank*{_SUFFIX}*"):
                path.unlink(missing_ok=True)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._worker.shutdown(wait=True)

    # ----------------------------------------------------------------------------- helpers

    def _all_gather(self, values: list[int]) -> list[list[int]]:
        if not self.distributed:
            return [values]
        parts = [torch.zeros(len(values), dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(parts, torch.tensor(values, dtype=torch.int64), group=self.pg)
        return [p.tolist() for p in parts]

    def _all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def _fail(self, step: int, reason: str) -> None:
        logger.error("memory checkpoint step %d: %s", step, reason)
        self._emit(EventKind.CKPT_FAIL, step=step, reason=reason, tier=TIER)

    def _emit(self, kind: EventKind, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(kind, **fields)


def _newest_complete(survey: list[list[tuple[int, int]]], world_size: int) -> int | None:
    """The newest step held for every rank 0..world_size-1 by some rank's node."""
    held: dict[int, set[int]] = {}
    for copies in survey:
        for rank, step in copies:
            held.setdefault(step, set()).add(rank)
    complete = [step for step, ranks in held.items() if ranks >= set(range(world_size))]
    return max(complete) if complete else None


def _tensors(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map_only(torch.Tensor, lambda t: found.append(t) or t, tree)
    return found


def _as_tensor(payload: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
