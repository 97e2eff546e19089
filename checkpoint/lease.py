"""The run's lease: one job at a time commits into a checkpoint root, and a late writer of an older job never can.

Two jobs on one run directory (a rerun beside orphans of the last one, a copied command) would
interleave their commits and resume from each other's steps. The lease makes that impossible:

- **Records.** The root holds ``lease/epoch-<N>.json``, one per holder, created exclusively
  (``O_EXCL`` locally, ``If-None-Match: *`` on S3): of two jobs racing for epoch N+1 one wins.
  The newest epoch is the lease. Its record names the job, the owner process (host, pid, start
  time), when it was last renewed, its time to live, and whether it was released.
- **Holding.** Rank 0 of a job takes the lease at start-up and renews it every ``ttl/3`` seconds
  (rewriting its own record). A second *job* finding a live lease refuses with one line naming
  the holder. The same job (a world restart, a replacement node) takes the next epoch at once.
  A lease is free when released (a job that ended), expired (no renewal for ``ttl`` seconds: its
  holder froze, or its host is gone), or held by a process of this host that no longer runs.
- **Fencing.** Every commit marker carries its writer's epoch, and rank 0 checks that its epoch
  is still the newest before writing one. A job taking over records the commits it inherits
  (``fence``): readers (:class:`~stalwart.checkpoint.catalog.CheckpointCatalog`) accept a marker
  only when it is of the current epoch or inherited, so a commit by an older epoch that raced past
  the check is ignored and later cleaned up, never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import psutil

from stalwart.checkpoint.catalog import CheckpointError
from stalwart.checkpoint.storage import Storage
from stalwart.errors import UserError
from stalwart.jobenv import JOB_ID_ENV

log = logging.getLogger(__name__)

LEASE_DIR = "lease"
DEFAULT_TTL_S = 30.0
_RECORD = re.compile(r"^epoch-(\d{8,})\.json$")


class LeaseHeld(UserError):
    """Another job holds the run's lease; the message names it and what to do."""


class LeaseLost(CheckpointError, UserError):
    """Another job took the lease over: this one must not commit, and stops."""


def job_id(env: dict[str, str] | None = None) -> str:
    """This job's identity, the same in every rank and incarnation of one job, different between jobs.

    ``stalwart launch`` exports ``$STALWART_JOB_ID`` (rendezvous id and endpoint); torchrun (and
    ``stalwart train --nproc-per-node``, which runs torchrun's agent) gives a fresh run id per
    invocation; a lone process is its own job.
    """
    env = os.environ if env is None else env
    if env.get(JOB_ID_ENV):
        return env[JOB_ID_ENV]
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchelastic:{env['TORCHELASTIC_RUN_ID']}"
    return f"process:{socket.gethostname()}:{os.getpid()}"


@dataclass
class LeaseRecord:
    epoch: int
    job: str
    host: str
    pid: int
    pid_started: float
    acquired_at: float
    renewed_at: float
    ttl_s: float
    released: bool = False
    fence: list[str] = field(default_factory=list)  # committed directories of older epochs this epoch accepts

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord:
        raw = json.loads(data)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def describe(self) -> str:
        return f"job {self.job!r} (pid {self.pid} on {self.host}, epoch {self.epoch})"


def record_name(epoch: int) -> str:
    return f"{LEASE_DIR}/epoch-{epoch:08d}.json"


def current_record(storage: Storage) -> LeaseRecord | None:
    """The newest lease record under ``storage``'s root, None when the root never had a lease.

    An unreadable newest record (torn by hand, foreign) is still the newest epoch: it fences
    everything older, and counts as expired for taking it over.
    """
    epochs = sorted(int(m.group(1)) for m in map(_RECORD.match, storage.list_dir(LEASE_DIR)) if m)
    if not epochs:
        return None
    try:
        return LeaseRecord.from_json(storage.read_bytes(record_name(epochs[-1])))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return LeaseRecord(epochs[-1], "(unreadable record)", "", 0, 0.0, 0.0, 0.0, 0.0)


def is_live(record: LeaseRecord, now: float | None = None) -> bool:
    """Whether the holder of ``record`` may still be working: not released, renewed within its ttl, not dead here."""
    now = time.time() if now is None else now
    if record.released or now - record.renewed_at > record.ttl_s:
        return False
    if record.host == socket.gethostname():
        try:
            holder = psutil.Process(record.pid)
            return abs(holder.create_time() - record.pid_started) < 1e-3 and holder.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    return True


class RunLease:
    """Rank 0's hold on a checkpoint root (see the module docstring). ``acquire`` first, ``close`` at the end."""

    def __init__(self, storage: Storage, job: str | None = None, ttl_s: float = DEFAULT_TTL_S) -> None:
        if not ttl_s > 0:
            raise ValueError(f"lease ttl_s={ttl_s}: must be positive")
        self.storage = storage
        self.job = job or job_id()
        self.ttl_s = ttl_s
        self.record: LeaseRecord | None = None
        self.lost: str | None = None  # why the lease is gone, once another epoch is seen
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def epoch(self) -> int | None:
        return None if self.record is None else self.record.epoch

    def acquire(self, inherited: Callable[[], Iterable[str]]) -> LeaseRecord:
        """Take the next epoch unless another live job holds the lease (:class:`LeaseHeld`).

        ``inherited()`` lists the committed directories that count now (read under the old epoch):
        they become this epoch's fence.
        """
        for _ in range(5):
            current = current_record(self.storage)
            if current is not None and current.job != self.job and is_live(current):
                raise LeaseHeld(refusal(self.storage, current))
            me = psutil.Process()
            now = time.time()
            record = LeaseRecord(
                epoch=(current.epoch if current else 0) + 1,
                job=self.job,
                host=socket.gethostname(),
                pid=os.getpid(),
                pid_started=me.create_time(),
                acquired_at=now,
                renewed_at=now,
                ttl_s=self.ttl_s,
                fence=sorted(inherited()),
            )
            try:
                self.storage.write_bytes(record_name(record.epoch), record.to_json(), exclusive=True)
            except FileExistsError:
                continue  # another job took this epoch first: look again
            self.record = record
            log.info("run lease: epoch %d for job %s under %s", record.epoch, self.job, self.storage.base_url)
            return record
        raise LeaseHeld(
            f"could not take the lease of {self.storage.base_url}: other jobs keep taking it; is another "
            "job starting on this run directory?"
        )

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this lease's epoch is still the newest (read from storage)."""
        if self.record is None:
            raise LeaseLost("no run lease held; acquire it before committing")
        current = current_record(self.storage)
        if current is None or current.epoch != self.record.epoch:
            self.lost = (
                f"{self.storage.base_url} was taken over by {current.describe() if current else 'nobody (lease gone)'}"
                f"; this job held epoch {self.record.epoch} and must not commit. Stop the other job, or give this one "
                "its own job.run_dir"
            )
            raise LeaseLost(self.lost)

    def renew(self) -> None:
        """Extend the lease (check first: never overwrite a newer holder's claim by renewing an old one)."""
        self.check()
        assert self.record is not None
        self.record.renewed_at = time.time()
        self.storage.write_bytes(record_name(self.record.epoch), self.record.to_json())

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="run-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost as e:
                log.error("run lease lost: %s", e)
                return
            except Exception as e:  # storage unreachable: keep trying; past the ttl another job may take over
                log.warning("run lease renewal under %s failed (%s); retrying", self.storage.base_url, e)

    def close(self, release: bool = True) -> None:
        """Stop renewing; ``release`` lets the next job take over at once (a job that ended)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not release or self.record is None or self.lost:
            return
        try:
            self.check()
            self.record.released = True
            self.storage.write_bytes(record_name(self.record.epoch), self.record.to_json())
        except Exception as e:  # lost, or storage gone: the ttl frees it
            log.info("run lease of %s not released (%s); it expires after %.0f s", self.storage.base_url, e, self.ttl_s)


def refusal(storage: Storage, holder: LeaseRecord) -> str:
    """The one line a second job on a live run gets."""
    age = max(0.0, time.time() - holder.renewed_at)
    return (
        f"{storage.base_url} is in use by {holder.describe()}, renewed {age:.0f} s ago; stop that job first, give "
        f"this one another job.run_dir (or checkpoint.url), or wait: a holder that is gone frees it within "
        f"{holder.ttl_s:.0f} s"
    )


def refuse_if_held(url: str, storage_options: dict | None = None, job: str | None = None) -> None:
    """Refuse early (:class:`LeaseHeld`) when a live job other than ``job`` holds the lease of ``url``.

    What launchers call before they start any rank: a check, not a claim (rank 0 claims).
    """
    storage = Storage(url, storage_options)
    current = current_record(storage)
    if current is not None and current.job != (job or job_id()) and is_live(current):
        raise LeaseHeld(refusal(storage, current))
