"""The job's event log: one JSON-lines schema for every process of stalwart.

Goodput reports are a pure function of this log, so every state change that costs or earns
wall-clock time is an event. Each process appends to its own file under ``RUN/events/`` (no
cross-process locking). A process that dies loses at most one flush interval of events, and none
from before a checkpoint commit: the checkpoint manager flushes before it writes the marker.

Schema (version 1). Every line is a JSON object with these common keys:

========== ================================================================================
``v``      schema version (1)
``ts``     wall-clock time, seconds since the epoch (``time.time()``); goodput corrects clock
           skew between hosts with the per-process ``clock`` events below
``kind``   one of :class:`EventKind`
``role``   ``trainer``, ``agent``, ``healthd``, ``controller`` or ``cli``
``host``   host name; ``node`` is the node rank when known
``pid``    process id; ``rank`` the global rank for trainer processes (else null)
``attempt`` restart count of the worker group (``TORCHELASTIC_RESTART_COUNT``), 0 at first
========== ================================================================================

Kind-specific keys (all optional unless noted):

- ``job_start`` / ``job_end``: ``config`` (dict), ``steps`` (target), ``status`` ("ok", "failed",
  "preempted", "fenced": another job took the run's lease over, "stopped_by_healthd").
- ``worker_start`` / ``worker_stop``: ``world_size``, ``layout`` (parallel degrees),
  ``exit_code``, ``reason``.
- ``init_done``: start-up finished (process group, model, data, optimizer ready), ``seconds``.
- ``step_begin``: ``step``. ``step_end``: ``step``, ``tokens`` (whole job), ``loss``,
  ``grad_norm``, ``lr``, ``step_seconds``, ``data_seconds`` (time blocked on the loader),
  ``tokens_per_second``, ``mfu``.
- ``ckpt_stage`` / ``ckpt_commit`` / ``ckpt_load`` / ``ckpt_fail``: ``step``, ``blocking_seconds``,
  ``seconds``, ``bytes``, ``tier``, ``reason``.
- ``fault_detected``: ``fault`` (type), ``target`` (rank / node / gpu), ``detector``,
  ``last_progress_ts`` (when the victim last made progress), ``detail``. The controller records its
  straggler strikes so too (``fault="straggler"``). ``goodput/incidents.py`` reads these and the
  events that follow them into one incident per root cause.
- ``fault_injected``: ``fault``, ``target`` — ground truth for chaos tests.
- ``rollback``: ``from_step``, ``to_step``, ``reason``.
- ``node_excluded`` / ``node_joined``: ``node``, ``reason``.
- ``reform_begin`` (every surviving rank, in-process recovery): ``step`` (the last completed step, which
  training returns to), ``generation`` (the one that failed), ``reason``.
- ``reform_end``: ``step`` (where training continues), ``generation`` (the new one), ``seconds`` (from
  ``reform_begin``), ``phases`` (seconds per phase: ``release``, ``form``, ``state``), ``source`` (where the
  replacements' state came from: ``peer``, ``memory``, storage scheme, or ``none``), ``bytes``,
  ``replaced`` (the global ranks that joined new), ``newcomer`` (true on a replacement rank).
- ``rank_replaced`` (agent): ``replaced_rank``, ``local_rank``, ``exit_code``, ``old_pid``, ``new_pid``,
  ``generation`` (the one the lost rank trained in), ``spare`` (true when a warm spare took over),
  ``seconds`` (the agent's own share: from noticing the loss to the new process started).
- ``reform_failed`` (rank): ``generation``, ``reason``: the in-process recovery gave up and the rank
  exits for a whole-world restart.
- ``workers_killed`` (healthd): ``pids``, ``ranks``, ``reason`` — the rank processes it SIGKILLed
  (after a hang or a GPU fault, or on a ``KillWorkers`` request), so that their exits read as
  consequences, not faults.
- ``rollback_ordered`` (controller): ``to_step``, ``reason``, ``request`` (the order's id, which
  the trainers' ``ckpt_load`` and ``rollback`` events repeat as ``rollback_request``).
- ``worker_start`` (trainer) also carries ``node_id``; a preempted trainer's ``worker_stop`` carries
  ``signalled_ts`` (when SIGTERM arrived). The agent's ``rank_exit`` carries ``exit_code`` and
  ``failures`` (every failed local rank's ``exit_code`` and ``pid``).
- ``clock``: ``mono`` (``time.monotonic()`` at ``ts``) for skew estimation.
- ``events_dropped``: the process's event writes failed (a full disk) and were retried:
  ``write_failures`` (failed writes so far), ``dropped`` (events given up for good so far);
  written once the disk takes writes again.
"""

from __future__ import annotations

import atexit
import enum
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
FLUSH_INTERVAL_ENV = "STALWART_EVENTS_FLUSH_S"  # seconds between background flushes (tests lengthen it)


def flush_interval_s() -> float:
    """Read when a log starts flushing, not at import: a process forked after the import has its own."""
    return float(os.environ.get(FLUSH_INTERVAL_ENV) or 1.0)


MAX_UNWRITTEN_BYTES = 16 << 20  # events waiting for a full disk; beyond this the oldest are dropped


# The start of a ``ckpt_fail`` reason for a save an in-process recovery gave up (a peer was lost while it
# was in flight): the loss's consequence, never a storage incident of its own.
ABANDONED_SAVE = "abandoned: a peer rank was lost during the save"


class EventKind(str, enum.Enum):
    JOB_START = "job_start"
    JOB_END = "job_end"
    WORKER_START = "worker_start"
    WORKER_STOP = "worker_stop"
    INIT_DONE = "init_done"
    STEP_BEGIN = "step_begin"
    STEP_END = "step_end"
    CKPT_STAGE = "ckpt_stage"
    CKPT_COMMIT = "ckpt_commit"
    CKPT_LOAD = "ckpt_load"
    CKPT_FAIL = "ckpt_fail"
    FAULT_DETECTED = "fault_detected"
    FAULT_INJECTED = "fault_injected"
    ROLLBACK = "rollback"
    NODE_EXCLUDED = "node_excluded"
    NODE_JOINED = "node_joined"
    REFORM_BEGIN = "reform_begin"
    REFORM_END = "reform_end"
    REFORM_FAILED = "reform_failed"
    RANK_REPLACED = "rank_replaced"
    WORKERS_KILLED = "workers_killed"
    ROLLBACK_ORDERED = "rollback_ordered"
    CLOCK = "clock"
    EVENTS_DROPPED = "events_dropped"


_COMMON_KEYS = frozenset({"v", "ts", "kind", "role", "host", "node", "pid", "rank", "attempt"})


class EventLog:
    """Buffered, thread-safe appender for one process; flushed every second, before each commit and at exit.

    A write that fails (a full disk, an I/O error) keeps its bytes and is retried at the next flush,
    counted in ``write_failures``; the writer thread never dies of it. When more than
    ``max_unwritten_bytes`` wait, the oldest whole lines are dropped and counted in ``dropped``. Once
    a write succeeds again the log records an ``events_dropped`` event with both counts, so the
    goodput report can say how many events it never saw.
    """

    def __init__(
        self,
        run_dir: str | Path,
        role: str,
        rank: int | None = None,
        node: int | None = None,
        *,
        max_unwritten_bytes: int = MAX_UNWRITTEN_BYTES,
    ) -> None:
        self.role = role
        self.rank = rank
        self.node = node
        self.host = socket.gethostname()
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.max_unwritten_bytes = max_unwritten_bytes
        events_dir = Path(run_dir) / "events"
        events_dir.mkdir(parents=True, exist_ok=True)
        who = f"{role}-r{rank}" if rank is not None else role
        self.path = events_dir / f"{who}-{self.host}-{os.getpid()}.jsonl"
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._buffer: list[str] = []
        self._unwritten = b""  # bytes a failed write left behind; may start in the middle of a line
        self._mid_line = False  # the file ends inside a line (a write stopped part-way)
        self.write_failures = 0
        self.dropped = 0
        self._reported = (0, 0)  # (write_failures, dropped) already recorded in the log
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically, name="event-flush", daemon=True)
        self._flusher.start()
        atexit.register(self.close)
        self.emit(EventKind.CLOCK, mono=time.monotonic())

    def emit(self, kind: EventKind | str, **fields: Any) -> dict[str, Any]:
        node = fields.pop("node", self.node)  # an event about another node (the controller's node_excluded) names it
        clash = _COMMON_KEYS.intersection(fields)
        if clash:
            raise ValueError(f"event fields {sorted(clash)} are reserved by the common schema")
        record = {
            "v": SCHEMA_VERSION,
            "ts": time.time(),
            "kind": EventKind(kind).value,
            "role": self.role,
            "host": self.host,
            "node": node,
            "pid": os.getpid(),
            "rank": self.rank,
            "attempt": self.attempt,
            **fields,
        }
        line = json.dumps(record, separators=(",", ":"), default=str)
        with self._lock:
            self._buffer.append(line)
        return record

    def flush(self) -> bool:
        """Write what is buffered; True when nothing is left unwritten. Never raises for a write error."""
        with self._lock:
            return self._flush_locked()

    def flush_soon(self) -> None:
        """Flush from a signal handler: at once if the lock is free, else the writer thread does it next.

        A handler runs between two bytecodes of the main thread, which may hold the lock (inside
        ``emit``): blocking on it there would deadlock.
        """
        if self._lock.acquire(blocking=False):
            try:
                self._flush_locked()
            finally:
                self._lock.release()
        else:
            self._wake.set()

    def _flush_locked(self) -> bool:
        if self._fd is None:
            return not self._buffer
        data = self._unwritten + ("\n".join(self._buffer) + "\n" if self._buffer else "").encode()
        self._buffer.clear()
        self._unwritten = self._write(data)
        if not self._unwritten and (self.write_failures, self.dropped) != self._reported:
            # The disk takes writes again: record what the log went through on the way.
            self._reported = (self.write_failures, self.dropped)
            self._unwritten = self._write((self._trouble_line() + "\n").encode())
        return not self._unwritten

    def _write(self, data: bytes) -> bytes:
        """Append ``data``; returns what could not be written (bounded by :meth:`_trim`)."""
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as e:
            self.write_failures += 1
            if self.write_failures == 1 or self.write_failures % 100 == 0:
                print(
                    f"stalwart: cannot write events to {self.path} ({e.strerror or e}); retrying, "
                    f"{len(data) - written} bytes wait (write failures so far: {self.write_failures})",
                    file=sys.stderr,
                    flush=True,
                )
        if written:
            self._mid_line = not data[:written].endswith(b"\n")
        return self._trim(data[written:])

    def _trim(self, rest: bytes) -> bytes:
        """Bound what waits: keep the end of a line the file has started, drop the oldest whole lines."""
        if len(rest) <= self.max_unwritten_bytes:
            return rest
        head = b""
        if self._mid_line:
            cut = rest.find(b"\n") + 1
            head, rest = rest[:cut], rest[cut:]
        while len(head) + len(rest) > self.max_unwritten_bytes and rest:
            cut = rest.find(b"\n") + 1 or len(rest)
            rest = rest[cut:]
            self.dropped += 1
        return head + rest

    def _trouble_line(self) -> str:
        record = {
            "v": SCHEMA_VERSION,
            "ts": time.time(),
            "kind": EventKind.EVENTS_DROPPED.value,
            "role": self.role,
            "host": self.host,
            "node": self.node,
            "pid": os.getpid(),
            "rank": self.rank,
            "attempt": self.attempt,
            "dropped": self.dropped,
            "write_failures": self.write_failures,
        }
        return json.dumps(record, separators=(",", ":"), default=str)

    def _flush_periodically(self) -> None:
        interval_s = flush_interval_s()
        while not self._stop.is_set():
            self._wake.wait(interval_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception as e:  # the writer must outlive anything: a lost thread loses every later event
                print(f"stalwart: event flush failed ({type(e).__name__}: {e}); retrying", file=sys.stderr)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            self._flush_locked()
            if self._fd is not None:
                if self._unwritten:
                    lost = self._unwritten.count(b"\n")
                    print(
                        f"stalwart: {lost} events never reached {self.path} (the disk refused them)",
                        file=sys.stderr,
                        flush=True,
                    )
                os.close(self._fd)
                self._fd = None


# Types of the keys the readers compute with; a line whose key has another type is damaged, not used.
_INT_KEYS = frozenset(
    {"v", "pid", "attempt", "step", "steps", "tokens", "bytes", "generation", "world_size", "exit_code"}
)
_NUMBER_KEYS = frozenset(
    {
        "seconds",
        "blocking_seconds",
        "step_seconds",
        "data_seconds",
        "tokens_per_second",
        "loss",
        "grad_norm",
        "lr",
        "mfu",
        "mono",
        "signalled_ts",
        "last_progress_ts",
    }
)
_TEXT_KEYS = frozenset({"role", "host", "status", "reason", "tier", "fault", "detector", "source"})
_KINDS = frozenset(k.value for k in EventKind)
TS_RANGE = (0.0, 1e11)  # seconds since the epoch: 1970 to year ~5138; anything else is damage


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def event_damage(record: Any) -> str | None:
    """Why ``record`` (one parsed line) breaks the schema above; None when it is a usable event.

    Missing optional keys are fine; a key present with the wrong type is not (``"step": "7"`` would
    make arithmetic nonsense downstream). ``None`` is allowed for optional numbers (``mfu`` on CPU).
    """
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    kind, ts = record.get("kind"), record.get("ts")
    if not isinstance(kind, str) or kind not in _KINDS:
        return f"kind {kind!r} is not an event kind"
    if not _is_number(ts) or not TS_RANGE[0] <= ts <= TS_RANGE[1]:  # NaN fails the range too
        return f"ts {ts!r} is not a time in seconds since the epoch"
    for key, value in record.items():
        if value is None:
            continue
        if key in _INT_KEYS and not _is_int(value):
            return f"{key} {value!r} is not an integer"
        if key in _NUMBER_KEYS and not (_is_number(value) and value == value):
            return f"{key} {value!r} is not a number"
        if key in _TEXT_KEYS and not isinstance(value, str):
            return f"{key} {value!r} is not a string"
    return None


def read_events(run_dir: str | Path, damaged: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every well-formed event of a run, file by file; torn, foreign or mistyped lines are skipped.

    A process killed mid-write can leave a partial last line; that line is dropped, not fatal. Each
    skipped line is named in ``damaged`` when given ("events/x.jsonl line 7: ts 1e300 is not a time
    ..."), so reports can say what they did not use. Callers sort by ``ts`` when they need one timeline.
    """
    events_dir = Path(run_dir) / "events"
    for path in sorted(events_dir.glob("*.jsonl")):
        try:
            f = open(path, encoding="utf-8", errors="replace")
        except OSError as e:
            if damaged is not None:
                damaged.append(f"{path.parent.name}/{path.name}: unreadable ({e.strerror or e})")
            continue
        with f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):  # JSONDecodeError, or nesting deeper than the parser goes
                    why: str | None = "not JSON (a torn or foreign line)"
                else:
                    why = event_damage(record)
                if why is None:
                    yield record
                elif damaged is not None and line.strip():
                    damaged.append(f"{path.parent.name}/{path.name} line {number}: {why}")
