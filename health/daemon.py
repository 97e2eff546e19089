"""healthd: the per-node health daemon (gRPC ``NodeHealth`` + ``grpc.health.v1``).

It receives rank heartbeats, detects hangs with :class:`~stalwart.health.hang.HangDetector`, probes
the GPUs and the host, and protects its node without waiting for anyone: on a hang it dumps every
local rank's Python stacks, SIGKILLs the worker group (the elastic agent restarts it) and records a
``fault_detected`` event; on a fatal GPU fault it marks the node UNHEALTHY (``RUN/health/node-<n>.unhealthy``
for the launcher, STOP in heartbeat replies), kills the workers and records the event. The job
controller may read its status but is never needed for any of this; with ``controller`` set, a
background thread pushes the status there every ``report_interval_s`` (at once after a fault) and
keeps retrying while the controller is down.

Trust model: status is open to whoever reaches the socket (bind to loopback or a ``unix:`` socket,
which is made mode 0600); the mutating calls, ``KillWorkers`` and ``Quarantine``, need the job
token; a heartbeat needs the job's heartbeat key (:func:`~stalwart.health.security.heartbeat_key`
of the token, which the launcher hands its ranks through ``$STALWART_TOKEN_FILE``). A heartbeat
without it is refused, counted (``refused_heartbeats`` in the status) and logged, and registers
nothing: only the job's own ranks can be declared hung. Even then the daemon only kills a pid that
runs as its user (any pid when it is root), is not the daemon or one of its ancestors, descends
from ``worker_ancestor`` when that is set (the launcher sets itself), and still has the start
time it had when it first beat (no pid-reuse kills).
"""

from __future__ import annotations

import concurrent.futures
import hmac
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stalwart.events import EventKind, EventLog
from stalwart.files import atomic_write
from stalwart.health.client import faulthandler_path
from stalwart.health.controller_client import ControllerClient
from stalwart.health.hang import HangConfig, HangDetector, Phase
from stalwart.health.probes import FaultInjectionProbe, GpuIssue, GpuProbe, GpuReport, HostProbe, HostReport
from stalwart.health.proto import healthd_pb2, healthd_pb2_grpc
from stalwart.health.security import TlsConfig, heartbeat_key, quiet_malformed_requests

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20
MAX_RANKS = 4096
# A beat's age at arrival is trusted up to this much; a wall-clock step between beat() and receipt
# can then shift one progress stamp by at most this, never stall detection.
MAX_BEAT_AGE_S = 5.0
SERVICE_NAME = "stalwart.health.NodeHealth"
_PHASE_FROM_PROTO = {healthd_pb2.Phase.Value(p.value): p for p in Phase}


@dataclass
class _Rank:
    rank: int
    local_rank: int
    pid: int
    create_time: float
    step: int = 0
    phase: Phase = Phase.INIT
    beat_ts: float = -math.inf  # the trainer's wall-clock time of its last beat(), as sent
    progress_mono: float = 0.0  # the same moment on this daemon's monotonic clock
    step_seconds: float = 0.0
    heard_mono: float = 0.0


class HealthDaemon:
    """One per node; ``start()`` returns the bound address (``host:port`` or ``unix:PATH``)."""

    def __init__(
        self,
        run_dir: str | Path,
        token: str,
        bind: str = "127.0.0.1:0",
        node: str | int = "0",
        hang_config: HangConfig | None = None,
        check_interval_s: float = 0.5,
        probe_interval_s: float = 1.0,
        expected_gpus: int | None = None,
        worker_ancestor: int | None = None,
        stack_dump_timeout_s: float = 10.0,
        max_workers: int = 8,
        controller: str | None = None,
        controller_tls: TlsConfig | None = None,
        report_interval_s: float = 1.0,
        hang_kill: str = "group",
    ) -> None:
        if hang_kill not in ("group", "culprit"):
            raise ValueError(f"hang_kill={hang_kill!r}: use 'group' or 'culprit'")
        if not token:
            raise ValueError(
                "healthd needs a non-empty job token (KillWorkers is refused without one); pass --token-file with a "
                "random secret"
            )
        self.run_dir = Path(run_dir)
        self.health_dir = self.run_dir / "health"
        self.health_dir.mkdir(parents=True, exist_ok=True)
        self._token = token.encode()
        self._heartbeat_key = heartbeat_key(token).encode()
        self.refused_heartbeats = 0
        self._refused_by_peer: dict[str, int] = {}
        self.bind = bind
        self.node = str(node)
        self.node_label = f"node{self.node}" if self.node.isdigit() else self.node  # "node3" for a bare node rank
        self.detector = HangDetector(hang_config)
        self.check_interval_s = check_interval_s
        self.probe_interval_s = probe_interval_s
        self.worker_ancestor = worker_ancestor
        self.stack_dump_timeout_s = stack_dump_timeout_s
        self.gpu_probe = GpuProbe(expected_gpus)
        self.host_probe = HostProbe(self.run_dir)
        self.fault_probe = FaultInjectionProbe(self.run_dir, str(node))
        self.events = EventLog(self.run_dir, role="healthd", node=self.node)
        self.marker_path = self.health_dir / f"node-{node}.unhealthy"
        self.controller = controller
        self.controller_tls = controller_tls
        self.report_interval_s = report_interval_s
        self.reporter: ControllerClient | None = None
        # "culprit": kill only the stopped rank (in-process recovery re-forms the rest); a hang without
        # a culprit on this node is given one more limit, then the ranks still stuck are killed after all
        # (not those that moved on meanwhile, e.g. into the recovery: they re-form around the others).
        self.hang_kill = hang_kill
        self._escalate_at: float | None = None
        self._escalate_ranks: dict[int, float] = {}  # rank -> its progress mark when declared hung
        self._culprit_killed_at: float | None = None  # ranks stalling right after it are blocked on the culprit

        self._lock = threading.RLock()
        self._ranks: dict[int, _Rank] = {}
        self._gpu_report = GpuReport(present=False, reason="not probed yet")
        self._injected: list[GpuIssue] = []
        self._host: HostReport | None = None
        self._reported_faults: set[tuple[int, str, int]] = set()
        self._unhealthy_reasons: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ancestors = {p.pid for p in psutil.Process().parents()} | {os.getpid()}

        self._health = health.HealthServicer()
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="healthd-rpc"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 16 * MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=4 * max_workers,
        )
        quiet_malformed_requests()
        healthd_pb2_grpc.add_NodeHealthServicer_to_server(_Servicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.address = ""

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> str:
        try:
            port = self._server.add_insecure_port(self.bind)
        except RuntimeError:  # grpc reports bind failures (address in use, bad path) this way
            port = 0
        if port == 0:
            self.events.close()
            raise OSError(
                f"healthd could not bind {self.bind!r} (in use or not writable); pick a free port, port 0, or a "
                "writable unix:PATH"
            )
        self._server.start()
        if self.bind.startswith("unix:"):
            socket_path = self.bind.removeprefix("unix:").removeprefix("//")
            os.chmod(socket_path, 0o600)
            self.address = self.bind
        else:
            self.address = f"{self.bind.rsplit(':', 1)[0]}:{port}"
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for target, name in ((self._monitor_loop, "healthd-hang"), (self._probe_loop, "healthd-probe")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.controller:  # pushes status every interval, at once on a fault; never needed to protect the node
            self.reporter = ControllerClient(
                self.controller,
                token=self._token.decode(),
                tls=self.controller_tls,
                node_status=self.status,
                interval_s=self.report_interval_s,
            )
        info = {"address": self.address, "pid": os.getpid(), "node": self.node}
        atomic_write(self.health_dir / f"healthd-node{self.node}.json", json.dumps(info))
        log.info("healthd node %s serving on %s", self.node, self.address)
        return self.address

    def stop(self, grace_s: float = 1.0) -> None:
        self._stop.set()
        if self.reporter is not None:
            self.reporter.close()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait()
        for thread in self._threads:
            thread.join(timeout=self.stack_dump_timeout_s + 2)
        self.events.close()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> HealthDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- RPC handlers

    def heartbeat(self, request: healthd_pb2.HeartbeatRequest) -> int:
        """Record a heartbeat; returns the action. Raises ValueError for a request it must refuse."""
        phase = _PHASE_FROM_PROTO.get(request.phase)
        if phase is None:
            raise ValueError(f"unknown phase {request.phase}")
        if not 0 <= request.rank < (1 << 24) or request.local_rank < 0:
            raise ValueError(f"rank {request.rank} / local_rank {request.local_rank} out of range")
        if not math.isfinite(request.ts) or not math.isfinite(request.step_seconds):
            raise ValueError("ts and step_seconds must be finite")
        now, now_mono = time.time(), time.monotonic()
        with self._lock:
            entry = self._ranks.get(request.rank)
            if entry is None or entry.pid != request.pid:
                if entry is None and len(self._ranks) >= MAX_RANKS:
                    raise ValueError(f"more than {MAX_RANKS} ranks on one node")
                create_time = self._check_worker_pid(request.pid)
                if entry is not None:
                    log.info("rank %d now has pid %d (was %d): new worker group", request.rank, request.pid, entry.pid)
                self.detector.forget(request.rank)
                entry = self._ranks[request.rank] = _Rank(request.rank, request.local_rank, request.pid, create_time)
            # Progress is a newer beat() timestamp; resends of the same beat are not. Detection runs
            # on the monotonic clock (the beat's age is taken from the shared wall clock, bounded), so
            # a wall-clock step can neither postpone nor fake a hang.
            if request.ts > entry.beat_ts or phase != entry.phase:
                age = min(max(now - request.ts, 0.0), MAX_BEAT_AGE_S)
                progress = max(now_mono - age, entry.progress_mono + 1e-6)
                self.detector.observe(request.rank, phase, progress)
                self._escalate_ranks.pop(request.rank, None)  # progress again: this one recovered without a kill
                entry.beat_ts, entry.progress_mono = request.ts, progress
                entry.step, entry.phase, entry.step_seconds = request.step, phase, request.step_seconds
            entry.heard_mono = now_mono
            return healthd_pb2.STOP if self._unhealthy_reasons else healthd_pb2.CONTINUE

    def _check_worker_pid(self, pid: int) -> float:
        if pid <= 0 or pid in self._ancestors:
            raise ValueError(f"pid {pid} cannot be a worker of this node")
        try:
            proc = psutil.Process(pid)
            if os.geteuid() != 0 and proc.uids().real != os.geteuid():
                raise ValueError(f"pid {pid} runs as another user than healthd")
            if self.worker_ancestor is not None and self.worker_ancestor not in {p.pid for p in proc.parents()}:
                raise ValueError(f"pid {pid} is not a descendant of the worker launcher {self.worker_ancestor}")
            return proc.create_time()
        except psutil.Error as e:
            raise ValueError(f"pid {pid} is not a live process: {e}") from e

    def status(self) -> healthd_pb2.NodeStatus:
        now, now_mono = time.time(), time.monotonic()
        with self._lock:
            state, reasons = self._state()
            msg = healthd_pb2.NodeStatus(
                node=str(self.node),
                state=state,
                reasons=reasons,
                ts=now,
                host_name=self.events.host,
                address=self.address,
                refused_heartbeats=self.refused_heartbeats,
            )
            for rank in sorted(self._ranks):
                e = self._ranks[rank]
                msg.ranks.add(
                    rank=e.rank,
                    local_rank=e.local_rank,
                    pid=e.pid,
                    step=e.step,
                    phase=healthd_pb2.Phase.Value(e.phase.value),
                    last_heartbeat_age_s=now_mono - e.heard_mono,
                    last_progress_age_s=now_mono - e.progress_mono,
                    limit_s=self.detector.limit(rank) if rank in self.detector.ranks() else 0.0,
                    step_seconds=e.step_seconds,
                )
            msg.gpu.present = self._gpu_report.present
            msg.gpu.reason = self._gpu_report.reason
            issues_by_gpu: dict[int, list[GpuIssue]] = {}
            for issue in self._injected:
                issues_by_gpu.setdefault(issue.gpu, []).append(issue)
            for gpu in self._gpu_report.gpus:
                g = msg.gpu.gpus.add(index=gpu.index, name=gpu.name, uuid=gpu.uuid)
                for issue in gpu.issues + issues_by_gpu.pop(gpu.index, []):
                    g.issues.add(kind=issue.kind, fatal=issue.fatal, code=issue.code, detail=issue.detail)
            for index, issues in sorted(issues_by_gpu.items()):
                g = msg.gpu.gpus.add(index=index, name="(fault injection)")
                for issue in issues:
                    g.issues.add(kind=issue.kind, fatal=issue.fatal, code=issue.code, detail=issue.detail)
            if self._host is not None:
                msg.host.mem_available_bytes = self._host.mem_available_bytes
                msg.host.disk_free_bytes = self._host.disk_free_bytes
        return msg

    def _state(self) -> tuple[int, list[str]]:
        if self._unhealthy_reasons:
            return healthd_pb2.UNHEALTHY, list(self._unhealthy_reasons)
        warnings = [
            f"gpu{i.gpu}: {i.kind} {i.detail}" for i in self._gpu_report.issues() + self._injected if not i.fatal
        ]
        return (healthd_pb2.DEGRADED, warnings) if warnings else (healthd_pb2.HEALTHY, [])

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._token)

    def heartbeat_authentic(self, auth: str) -> bool:
        return hmac.compare_digest(auth.encode(), self._heartbeat_key)

    def refuse_heartbeat(self, peer: str, request: healthd_pb2.HeartbeatRequest) -> None:
        """Count an unauthenticated heartbeat; one log line for a peer's first, then for every 100th."""
        with self._lock:
            self.refused_heartbeats += 1
            seen = self._refused_by_peer[peer] = self._refused_by_peer.get(peer, 0) + 1
        if seen == 1 or seen % 100 == 0:
            log.warning(
                "refused heartbeat #%d from %s (rank %d, pid %d): no valid heartbeat key; it registers nothing and "
                "cannot get any process declared hung (%d refused in all)",
                seen,
                peer,
                request.rank,
                request.pid,
                self.refused_heartbeats,
            )

    # ---------------------------------------------------------------- detection

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            try:
                self.check_once()
            except Exception:
                log.exception("healthd hang check failed; continuing")

    def check_once(self) -> None:
        """One hang-detection pass: drop exited ranks, then act on ranks past their limit."""
        with self._lock:
            for rank, entry in list(self._ranks.items()):
                if not _same_process(entry.pid, entry.create_time):
                    log.info("rank %d (pid %d) exited; the elastic agent handles that", rank, entry.pid)
                    del self._ranks[rank]
                    self.detector.forget(rank)
            hangs = self.detector.check(time.monotonic())
            stuck: list[int] = []
            if not hangs and self._escalate_at is not None and time.monotonic() >= self._escalate_at:
                stuck = sorted(  # declared hung and no progress since: what the recovery did not release
                    rank
                    for rank, mark in self._escalate_ranks.items()
                    if rank in self._ranks and self._ranks[rank].progress_mono <= mark
                )
                self._escalate_at, self._escalate_ranks = None, {}
        if hangs:
            self._on_hangs(hangs)
        elif stuck:
            killed = self.kill_ranks(stuck, "hang without a culprit on this node outlived the recovery window")
            log.error(
                "no progress since the hang was declared and no culprit found here: killed ranks %s (%s)", stuck, killed
            )

    def _on_hangs(self, hangs: list) -> None:
        with self._lock:
            ranks = list(self._ranks.values())
        names = ", ".join(f"rank{h.rank} ({h.phase.value}, {h.waited_s:.1f}s > {h.limit_s:.1f}s)" for h in hangs)
        log.error("hang detected: %s; dumping stacks of %d local ranks and killing the worker group", names, len(ranks))
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.3f}"[1:]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(ranks))) as pool:
            dumps = list(pool.map(lambda e: (e, self._dump_stacks(e)), ranks))
        stack_files = []
        for entry, text in dumps:
            path = self.health_dir / f"stacks-{stamp}-rank{entry.rank}.txt"
            atomic_write(path, text)
            stack_files.append(str(path))
        # A rank whose process is stopped is the hang; the others wait on it. The
        # culprit's own limit may not have run out yet (its limits differ), so every local rank is looked at.
        culprits = self._hang_culprits([e.rank for e in ranks])
        found = {h.rank: (h.phase, h.last_progress_ts, h.limit_s, h.waited_s) for h in hangs}
        now = time.monotonic()
        for rank in culprits.keys() - found.keys():
            with self._lock:
                if rank not in self.detector.ranks():
                    continue
                phase, last = self.detector.last_progress(rank)
                found[rank] = (phase, last, self.detector.limit(rank), now - last)
        if self.hang_kill == "group":
            killed = self.kill_workers(f"hang: {names}")
        elif culprits:
            killed = self.kill_ranks(sorted(culprits), f"hang: {names}")  # the survivors re-form in place
            self._culprit_killed_at = time.monotonic()
        else:
            killed = []  # blocked on a culprit elsewhere (or the one just killed here): they re-form
        blocked = [h for h in hangs if h.rank not in culprits]
        if self.hang_kill != "group" and blocked:  # one more limit to move on, or they are killed after all
            self._escalate_at = time.monotonic() + max(h.limit_s for h in blocked)
            with self._lock:
                self._escalate_ranks.update(
                    {h.rank: self._ranks[h.rank].progress_mono for h in blocked if h.rank in self._ranks}
                )
        # Ranks that stall within a limit of this node killing a culprit were waiting on that culprit.
        after_kill = (
            not culprits
            and self._culprit_killed_at is not None
            and time.monotonic() - self._culprit_killed_at < max(h.limit_s for h in hangs)
        )
        for rank, (phase, last, limit, waited) in sorted(found.items()):
            # Without a culprit on this node every hung rank is reported as ``hang`` (culprit_found_here
            # false); the incidents read them as blocked on the cause another node found
            # (goodput/incidents.py), or as the hang's suspects when nobody found one.
            fault = "hang_blocked" if (culprits and rank not in culprits) or after_kill else "hang"
            self.events.emit(
                EventKind.FAULT_DETECTED,
                fault=fault,
                target=f"rank{rank}",
                detector="healthd",
                last_progress_ts=_wall(last),
                detail={
                    "phase": phase.value,
                    "limit_s": round(limit, 3),
                    "waited_s": round(waited, 3),
                    "killed_pids": killed,
                    "stacks": stack_files,
                    "why": culprits.get(rank, "no progress; its process is running (blocked or wedged)"),
                    "culprit_found_here": bool(culprits) or after_kill,
                },
            )
        self.events.flush()

    def _hang_culprits(self, ranks: list[int]) -> dict[int, str]:
        """The local ranks that are themselves stuck, with why; the rest are blocked on them.

        Every rank of a synchronous job stops progressing when one hangs; the process state tells
        the one that was stopped from those waiting for it.
        """
        out = {}
        with self._lock:
            entries = {rank: self._ranks.get(rank) for rank in ranks}
        for rank, entry in entries.items():
            if entry is None:
                continue
            # Only a stopped process is a sure culprit: a rank blocked in a collective that holds the
            # GIL also stops sending heartbeat messages, so silence alone names no one.
            if _status(entry.pid) in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                out[rank] = "process stopped (SIGSTOP or a debugger)"
        return out

    def _dump_stacks(self, entry: _Rank) -> str:
        header = (
            f"# healthd stack dump: rank {entry.rank} (local {entry.local_rank}) pid {entry.pid}, "
            f"phase {entry.phase.value}, step {entry.step}\n"
        )
        py_spy = _find_py_spy()
        notes = []
        if py_spy:
            stopped = _status(entry.pid) == psutil.STATUS_STOPPED
            # A stopped process cannot be re-suspended by ptrace; --nonblocking reads its memory directly.
            attempts = [["--nonblocking"]] if stopped else [[], ["--nonblocking"]]
            for extra in attempts:
                cmd = [py_spy, "dump", "--pid", str(entry.pid), *extra]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=self.stack_dump_timeout_s)
                except subprocess.TimeoutExpired:
                    notes.append(f"{' '.join(cmd)}: timed out after {self.stack_dump_timeout_s}s")
                    continue
                if out.returncode == 0:
                    return header + f"# method: py-spy {' '.join(cmd[1:])}\n" + out.stdout
                notes.append(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()[-500:]}")
        else:
            notes.append("py-spy not found (pip install py-spy; in containers grant CAP_SYS_PTRACE)")
        if _status(entry.pid) == psutil.STATUS_STOPPED:
            notes.append("process is stopped (SIGSTOP): it cannot run its SIGUSR1 faulthandler")
            return header + "# method: none\n" + "".join(f"# {n}\n" for n in notes)
        path = faulthandler_path(self.run_dir, entry.rank, entry.pid)
        before = path.stat().st_size if path.exists() else 0
        try:
            os.kill(entry.pid, signal.SIGUSR1)
        except OSError as e:
            notes.append(f"SIGUSR1 failed: {e}")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and (not path.exists() or path.stat().st_size == before):
            time.sleep(0.05)
        time.sleep(0.1)  # let faulthandler finish writing all threads
        text = path.read_text(errors="replace")[before:] if path.exists() else ""
        if not text:
            notes.append(f"no faulthandler output in {path} (the trainer must call install_stack_dump_handler)")
        return header + "# method: SIGUSR1 faulthandler\n" + "".join(f"# {n}\n" for n in notes) + text

    def kill_workers(self, reason: str) -> list[int]:
        """SIGKILL every known rank process (verified against pid reuse); returns the pids killed."""
        with self._lock:
            ranks = list(self._ranks)
        return self.kill_ranks(ranks, reason)

    def kill_ranks(self, ranks: list[int], reason: str) -> list[int]:
        """SIGKILL these local ranks' processes (verified against pid reuse); returns the pids killed."""
        with self._lock:
            entries = [self._ranks.pop(rank) for rank in ranks if rank in self._ranks]
            for entry in entries:
                self.detector.forget(entry.rank)
        killed = []
        for entry in entries:
            if not _same_process(entry.pid, entry.create_time):
                continue
            try:
                os.kill(entry.pid, signal.SIGKILL)
                killed.append(entry.pid)
            except OSError as e:
                log.warning("could not kill rank %d pid %d: %s", entry.rank, entry.pid, e)
        log.warning("killed worker pids %s: %s", killed, reason)
        if killed:
            ranks = sorted(e.rank for e in entries if e.pid in killed)
            self.events.emit(EventKind.WORKERS_KILLED, pids=killed, ranks=ranks, reason=reason[:500])
            self.events.flush()
        return killed

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.probe_once()
            except Exception:
                log.exception("healthd probe failed; continuing")
            self._stop.wait(self.probe_interval_s)

    def probe_once(self) -> None:
        """Probe GPUs (real and injected) and the host; a new fatal GPU issue takes the node out."""
        report = self.gpu_probe.probe()
        injected = self.fault_probe.probe()
        with self._lock:
            pids = [e.pid for e in self._ranks.values()]
        host = self.host_probe.probe(pids)
        with self._lock:
            self._gpu_report, self._injected, self._host = report, injected, host
        new = []
        for issue in report.fatal() + [i for i in injected if i.fatal]:
            key = (issue.gpu, issue.kind, issue.code)
            if key not in self._reported_faults:
                self._reported_faults.add(key)
                new.append(issue)
        if new:
            self._on_gpu_faults(new)

    def _on_gpu_faults(self, issues: list[GpuIssue]) -> None:
        reasons = [f"gpu{i.gpu}: {i.kind} {i.code}: {i.detail}" for i in issues]
        log.error("node %s UNHEALTHY: %s", self.node, "; ".join(reasons))
        with self._lock:
            self._unhealthy_reasons.extend(reasons)
            last_progress = max((_wall(e.progress_mono) for e in self._ranks.values()), default=None)
            all_reasons = list(self._unhealthy_reasons)
        atomic_write(
            self.marker_path,
            json.dumps(
                {"node": self.node, "ts": time.time(), "reasons": all_reasons, "issues": [asdict(i) for i in issues]}
            ),
        )
        killed = self.kill_workers("gpu fault: " + "; ".join(reasons))
        for issue in issues:
            self.events.emit(
                EventKind.FAULT_DETECTED,
                fault="gpu",
                target=f"{self.node_label}/gpu{issue.gpu}",
                detector="healthd",
                last_progress_ts=last_progress,
                detail={"kind": issue.kind, "code": issue.code, "detail": issue.detail, "killed_pids": killed},
            )
        self.events.flush()
        if self.reporter is not None:
            self.reporter.wake()

    def quarantine(self, rank: int, fault: str, reason: str) -> int:
        """A rank's report that its device must not train (SDC): UNHEALTHY, no kill; the trainer stops itself.

        The rank records the ``fault_detected`` event itself; this only takes the node out.
        """
        why = f"rank{rank}: {fault}: {reason}"
        log.error("node %s UNHEALTHY: %s", self.node, why)
        with self._lock:
            self._unhealthy_reasons.append(why)
            all_reasons = list(self._unhealthy_reasons)
        atomic_write(
            self.marker_path,
            json.dumps(
                {
                    "node": self.node,
                    "ts": time.time(),
                    "reasons": all_reasons,
                    "issues": [{"rank": rank, "kind": fault, "detail": reason}],
                }
            ),
        )
        if self.reporter is not None:
            self.reporter.wake()
        return healthd_pb2.UNHEALTHY


class _Servicer(healthd_pb2_grpc.NodeHealthServicer):
    """Thin gRPC adapter: validation errors become status codes, never a dead server."""

    def __init__(self, daemon: HealthDaemon) -> None:
        self.daemon = daemon

    def Heartbeat(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not self.daemon.heartbeat_authentic(request.auth):
            self.daemon.refuse_heartbeat(context.peer(), request)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "heartbeats need the job's heartbeat key (its token file)")
        try:
            return healthd_pb2.HeartbeatReply(action=self.daemon.heartbeat(request))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.daemon.status()

    def KillWorkers(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not self.daemon.check_token(request.token):
            log.warning("refused unauthenticated KillWorkers from %s (reason %r)", context.peer(), request.reason[:200])
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "KillWorkers needs the job token")
        killed = self.daemon.kill_workers(f"KillWorkers from {context.peer()}: {request.reason[:200]}")
        return healthd_pb2.KillReply(killed_pids=killed)

    def Quarantine(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not self.daemon.check_token(request.token):
            log.warning("refused unauthenticated Quarantine from %s (reason %r)", context.peer(), request.reason[:200])
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "Quarantine needs the job token")
        return healthd_pb2.QuarantineReply(
            state=self.daemon.quarantine(request.rank, request.fault[:40], request.reason[:200])
        )


def _same_process(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wall(mono: float) -> float:
    """A monotonic-clock moment as wall-clock time (for events, which use ``time.time()``)."""
    return time.time() - (time.monotonic() - mono)


def _status(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return ""


def _find_py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
