"""The trainer's side of healthd: non-blocking heartbeats and a stack-dump signal handler.

Training never depends on the daemon: ``beat()`` only stores the latest state, a background thread
sends it (every ``interval_s`` and at once on a phase change), and an unreachable daemon is retried
quietly forever. The daemon tells progress from resends by the ``ts`` of the last ``beat()``.

Create the client after any ``fork()`` of the trainer (data loader workers use their own process
start method) or set ``GRPC_ENABLE_FORK_SUPPORT=1``: gRPC's threads do not survive a fork.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TextIO

import grpc

from stalwart.health.hang import Phase
from stalwart.health.proto import healthd_pb2, healthd_pb2_grpc
from stalwart.health.security import TokenError, heartbeat_key, read_token
from stalwart.jobenv import TOKEN_FILE_ENV

log = logging.getLogger(__name__)

STACK_DUMP_SIGNAL = signal.SIGUSR1
_PROTO_PHASE = {p: healthd_pb2.Phase.Value(p.value) for p in Phase}


def faulthandler_path(run_dir: str | Path, rank: int, pid: int) -> Path:
    """Where a rank's SIGUSR1 stack dump goes; healthd reads it when py-spy cannot be used."""
    return Path(run_dir) / "health" / f"faulthandler-rank{rank}-pid{pid}.txt"


_dump_file: TextIO | None = None


def install_stack_dump_handler(path: str | Path) -> Path:
    """Make SIGUSR1 append every thread's Python stack to ``path`` (for healthd's hang dumps).

    Works for a rank stuck in Python or in a C call that releases the GIL; a SIGSTOPped or fully
    wedged process cannot run it, which is why healthd prefers ``py-spy dump`` (ptrace, from outside).
    """
    global _dump_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _dump_file is not None:
        faulthandler.unregister(STACK_DUMP_SIGNAL)
        _dump_file.close()
    _dump_file = open(path, "a", encoding="utf-8")
    faulthandler.register(STACK_DUMP_SIGNAL, file=_dump_file, all_threads=True, chain=False)
    return path


def job_heartbeat_key() -> str:
    """The heartbeat key of the job token in ``$STALWART_TOKEN_FILE``; "" (healthd will refuse) without one."""
    try:
        return heartbeat_key(read_token(None))
    except TokenError as e:
        log.warning("no job token for heartbeats (%s); healthd will refuse them", e)
        return ""


class HeartbeatClient:
    """Sends this rank's (step, phase, progress time) to the node's healthd; see the module docstring."""

    def __init__(
        self,
        address: str,
        rank: int,
        local_rank: int,
        interval_s: float = 0.5,
        rpc_timeout_s: float = 2.0,
        auth: str | None = None,
    ) -> None:
        """``auth`` is the job's heartbeat key; None derives it from the job token in ``$STALWART_TOKEN_FILE``."""
        self.address = address
        self.auth = job_heartbeat_key() if auth is None else auth
        self.rank = rank
        self.local_rank = local_rank
        self.interval_s = interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._state = (0, Phase.INIT, time.time(), 0.0)
        self._stop_requested = False
        self.sent = 0
        self.failures = 0
        self._channel = grpc.insecure_channel(address)
        self._stub = healthd_pb2_grpc.NodeHealthStub(self._channel)
        self._thread = threading.Thread(target=self._run, name="healthd-heartbeat", daemon=True)
        self._thread.start()

    def beat(self, step: int, phase: Phase | str = Phase.STEP, step_seconds: float = 0.0) -> None:
        """Record progress; returns at once (the send happens on the background thread)."""
        phase = Phase(phase)
        with self._lock:
            changed = phase != self._state[1]
            self._state = (int(step), phase, time.time(), float(step_seconds))
        if changed:
            self._wake.set()

    @property
    def stop_requested(self) -> bool:
        """True once healthd answered STOP (node unhealthy): stop at the next safe point."""
        return self._stop_requested

    def quarantine(self, fault: str, reason: str, token: str) -> bool:
        """Ask healthd to take this node out (mutating: needs the job token); False if it could not."""
        request = healthd_pb2.QuarantineRequest(token=token, rank=self.rank, fault=fault, reason=reason[:200])
        try:
            self._stub.Quarantine(request, timeout=self.rpc_timeout_s)
        except grpc.RpcError as e:
            log.error(
                "healthd at %s refused or missed the quarantine of rank %d (%s: %s)",
                self.address,
                self.rank,
                e.code(),
                e.details(),
            )
            return False
        return True

    def _run(self) -> None:
        while not self._closed.is_set():
            self._send()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _send(self) -> None:
        with self._lock:
            step, phase, ts, step_seconds = self._state
        request = healthd_pb2.HeartbeatRequest(
            rank=self.rank,
            local_rank=self.local_rank,
            pid=os.getpid(),
            step=step,
            phase=_PROTO_PHASE[phase],
            ts=ts,
            step_seconds=step_seconds,
            auth=self.auth,
        )
        try:
            reply = self._stub.Heartbeat(request, timeout=self.rpc_timeout_s)
        except grpc.RpcError as e:
            self.failures += 1
            if e.code() == grpc.StatusCode.UNAUTHENTICATED and self.failures == 1:
                log.error(
                    "healthd at %s refuses rank %d's heartbeats (%s): it cannot detect a hang of this rank; give the "
                    "rank the job's token file ($%s)",
                    self.address,
                    self.rank,
                    e.details(),
                    TOKEN_FILE_ENV,
                )
            elif self.failures == 1 or self.failures % 100 == 0:
                log.info("healthd at %s unreachable (%s); training continues, retrying", self.address, e.code())
            return
        self.sent += 1
        if reply.action == healthd_pb2.STOP:
            self._stop_requested = True

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=self.rpc_timeout_s + 1)
        self._channel.close()

    def __enter__(self) -> HeartbeatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
