"""``stalwart controller``: one per job. Aggregates node reports and rank metrics, decides exclusions.

Inputs: node daemons push their :class:`NodeStatus` (``ReportNode``), ranks push per-step times
(``ReportRankMetrics``); both carry the job token in the ``x-stalwart-token`` metadata, since a
forged report could otherwise get a node excluded. The run directory supplies the rest (events →
goodput and incidents, the checkpoint listing), refreshed on a background thread every few seconds so
a request never waits for storage.

Decisions (:mod:`stalwart.health.exclusion`): a node reporting UNHEALTHY is excluded at once; a
straggler (:mod:`stalwart.health.straggler`) or a node with ``network`` faults after N strikes.
Excluding a node adds it to ``RUN_DIR/excluded_nodes.json`` (which the launcher reads), records a
``node_excluded`` event and asks the node's healthd to kill its workers, so the elastic agent restarts
the group without it.

Outputs: gRPC (``GetState``, token-guarded ``ExcludeNode`` / ``RequestRollback``, plus
``grpc.health.v1``) and HTTP (:mod:`stalwart.health.controller_http`). Training never depends on
this process: node daemons and ranks retry in the background, and a restarted controller reloads the
exclusion list and is caught up by the next round of reports.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stalwart.checkpoint.catalog import CheckpointCatalog
from stalwart.checkpoint.naming import default_checkpoint_url
from stalwart.checkpoint.storage import s3_storage_options
from stalwart.events import EventKind, EventLog, read_events
from stalwart.goodput.accounting import CATEGORIES, compute_goodput, step_rate
from stalwart.goodput.report import incident_dict
from stalwart.health.controller_client import TOKEN_METADATA
from stalwart.health.exclusion import Exclusion, ExclusionList, ExclusionPolicy, StrikeBook
from stalwart.health.proto import controller_pb2, controller_pb2_grpc, healthd_pb2, healthd_pb2_grpc
from stalwart.health.rollback import RollbackOrder, write_rollback_order
from stalwart.health.security import TlsConfig, add_port, open_channel, token_matches
from stalwart.health.straggler import RankScore, StragglerConfig, StragglerDetector

log = logging.getLogger(__name__)

SERVICE_NAME = "stalwart.health.Controller"
MAX_MESSAGE_BYTES = 4 << 20
MAX_NAME = 128
MAX_REASON = 1024
MAX_REASONS = 64
MAX_RANKS = 4096
MAX_INCIDENTS = 200
NETWORK_FAULTS = frozenset({"network", "nccl_timeout", "nic"})
_STATE_NAMES = {v: k for k, v in healthd_pb2.NodeState.items()}
_PHASE_NAMES = {v: k for k, v in healthd_pb2.Phase.items()}


class RequestError(ValueError):
    """A request the controller refuses; ``code`` is the gRPC status it answers with."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ControllerConfig:
    run_dir: Path
    grpc_bind: str = "127.0.0.1:50052"
    http_bind: str = "127.0.0.1:8080"
    tls: TlsConfig | None = None
    policy: ExclusionPolicy = field(default_factory=ExclusionPolicy)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    checkpoint_url: str | None = None  # default: the job's config (job_start event), else RUN_DIR/checkpoints
    refresh_interval_s: float = 3.0  # goodput, incidents and checkpoints from the run dir
    evaluate_interval_s: float = 0.5  # straggler scoring and the step rate
    stale_node_s: float = 30.0  # a node silent this long is shown DEGRADED ("no report for ...")
    kill_timeout_s: float = 5.0


@dataclass
class _Node:
    status: healthd_pb2.NodeStatus
    heard_mono: float
    address: str  # where its healthd answers KillWorkers ("" when unknown)


@dataclass
class RunDirView:
    """What the refresher read from the run dir; replaced whole, so readers never see half of one."""

    goodput: dict[str, Any] = field(
        default_factory=lambda: {
            "ratio": 0.0,
            "productive_s": 0.0,
            "wall_s": 0.0,
            "badput_s": dict.fromkeys(CATEGORIES, 0.0),
        }
    )
    incidents: list[dict[str, Any]] = field(default_factory=list)  # goodput.report.incident_dict of each
    incident_counts: dict[str, int] = field(default_factory=dict)
    step_rate: list[tuple[float, float]] = field(default_factory=list)  # (ts, steps per second) over the job
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    last_step: int | None = None
    step_seconds: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None


class JobController:
    """``start()`` binds both servers; ``grpc_address`` / ``http_address`` say where."""

    def __init__(self, config: ControllerConfig, token: str) -> None:
        if not token:
            raise ValueError("the controller needs a non-empty job token; pass --token-file with a random secret")
        self.config = config
        self.run_dir = Path(config.run_dir)
        self._token = token
        self.started = time.time()
        self.exclusions = ExclusionList(self.run_dir)
        self._excluded: dict[str, Exclusion] = self.exclusions.load()  # raises on a corrupt file: fix it first
        self.events = EventLog(self.run_dir, role="controller")
        self._lock = threading.RLock()
        self._exclude_lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._strikes = StrikeBook(config.policy)
        self._stragglers = StragglerDetector(config.straggler)
        self._scores: dict[int, RankScore] = {}
        self._counts: Counter[str] = Counter()  # incidents by kind, never decreasing (a Prometheus counter)
        self.refused: Counter[str] = Counter()
        self._step_track: deque[tuple[float, int]] = deque()
        self._seen_network_faults: set[tuple] = set()
        self._checkpoints: tuple[str, CheckpointCatalog] | None = None  # (url, catalog)
        self._checkpoints_lock = threading.Lock()
        self.view = RunDirView()
        self._stop = threading.Event()
        self._refresh_now = threading.Event()
        self._threads: list[threading.Thread] = []
        self._killers = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="controller-kill")

        self._health = health.HealthServicer()
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="controller-rpc"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=64,
        )
        controller_pb2_grpc.add_ControllerServicer_to_server(_Servicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._http: Any = None
        self.grpc_address = ""
        self.http_address = ""

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        from stalwart.health.controller_http import start_http_server

        try:
            self.grpc_address = add_port(
                self._server, self.config.grpc_bind, self.config.tls, "the controller's gRPC server"
            )
            self._http, self.http_address = start_http_server(self, self.config.http_bind, self.config.tls)
        except OSError:
            self.events.close()
            raise
        self._server.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for target, name in ((self._evaluate_loop, "controller-evaluate"), (self._refresh_loop, "controller-refresh")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "controller serving gRPC on %s, HTTP on %s (run dir %s)", self.grpc_address, self.http_address, self.run_dir
        )

    def stop(self, grace_s: float = 1.0) -> None:
        self._stop.set()
        self._refresh_now.set()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for thread in self._threads:
            thread.join(timeout=30)
        self._killers.shutdown(wait=True, cancel_futures=False)
        self.events.close()

    def __enter__(self) -> JobController:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check_token(self, token: str) -> bool:
        return token_matches(token, self._token)

    # ---------------------------------------------------------------- inputs

    def report_node(self, status: healthd_pb2.NodeStatus, peer: str) -> tuple[bool, str]:
        """Store a node's status; a node reporting UNHEALTHY is excluded now. Returns (excluded, reason)."""
        node = _check_name(status.node, "node")
        if (
            len(status.ranks) > MAX_RANKS
            or len(status.reasons) > MAX_REASONS
            or any(len(r) > MAX_REASON for r in status.reasons)
        ):
            raise RequestError(
                f"node {node}: more than {MAX_RANKS} ranks or {MAX_REASONS} reasons, or a reason over {MAX_REASON} "
                "characters"
            )
        if status.state not in _STATE_NAMES:
            raise RequestError(f"node {node}: unknown state {status.state}")
        with self._lock:
            self._nodes[node] = _Node(status, time.monotonic(), _daemon_address(status.address, peer))
            excluded = self._excluded.get(node)
        if excluded is None and status.state == healthd_pb2.UNHEALTHY:
            reason = "unhealthy: " + "; ".join(status.reasons or ["healthd reports the node UNHEALTHY"])
            self.exclude(node, reason)
            excluded = self._excluded.get(node)
        return (excluded is not None, excluded.reason if excluded else "")

    def report_metrics(self, batch: controller_pb2.RankMetricsReport) -> None:
        for m in batch.metrics:
            _check_name(m.node, "node")
            if not 0 <= m.rank < (1 << 24) or m.step < 0:
                raise RequestError(f"rank {m.rank} / step {m.step} out of range")
            if not all(math.isfinite(x) and x >= 0 for x in (m.step_seconds, m.compute_seconds, m.ts)):
                raise RequestError(f"rank {m.rank}: step_seconds, compute_seconds and ts must be finite and >= 0")
        with self._lock:
            for m in batch.metrics:
                if m.node not in self._excluded:
                    self._stragglers.observe(m.rank, m.node, m.step, m.step_seconds, m.compute_seconds, m.ts, m.pid)

    # ---------------------------------------------------------------- actions

    def exclude(self, node: str, reason: str, host: str = "") -> bool:
        """Put ``node`` on the exclusion list, record the event and kill its workers; False if it already was."""
        with self._lock:
            host = host or (self._nodes[node].status.host_name if node in self._nodes else "")
        with self._exclude_lock:
            if not self.exclusions.add(node, reason, host):
                with self._lock:
                    self._excluded = self.exclusions.load()
                return False
            with self._lock:
                self._excluded = self.exclusions.load()
                self._stragglers.forget_node(node)
                self._scores = {r: s for r, s in self._scores.items() if s.node != node}
        self.events.emit(EventKind.NODE_EXCLUDED, node=int(node) if node.isdigit() else node, reason=reason)
        self.events.flush()
        self._refresh_now.set()
        self._killers.submit(self._kill_workers, node, f"node excluded: {reason}")
        return True

    def _kill_workers(self, node: str, reason: str) -> list[int]:
        with self._lock:
            entry = self._nodes.get(node)
        if entry is None or not entry.address:
            log.warning("no healthd address known for node %s; its launcher stops it through excluded_nodes.json", node)
            return []
        try:
            with open_channel(entry.address) as channel:
                reply = healthd_pb2_grpc.NodeHealthStub(channel).KillWorkers(
                    healthd_pb2.KillRequest(token=self._token, reason=reason[:MAX_REASON]),
                    timeout=self.config.kill_timeout_s,
                )
        except grpc.RpcError as e:
            log.error("KillWorkers on node %s (%s) failed: %s %s", node, entry.address, e.code(), e.details())
            return []
        log.warning("node %s: healthd killed workers %s (%s)", node, list(reply.killed_pids), reason)
        return list(reply.killed_pids)

    def request_rollback(self, step: int | None, reason: str) -> tuple[int, list[str]]:
        """Order the job back to ``step`` (None: the newest verified checkpoint) and restart every node's workers."""
        catalog = self._checkpoint_catalog()
        if catalog is None:
            raise RequestError(
                "checkpointing is disabled for this job: there is nothing to roll back to",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        committed, verified = catalog.committed_steps(), catalog.verified_steps()
        target = (verified[-1] if verified else None) if step is None else step
        if target is None or target not in committed:
            what = "no verified checkpoint" if step is None else f"step {step} is not committed"
            raise RequestError(f"{what}; committed steps: {committed}", grpc.StatusCode.FAILED_PRECONDITION)
        if (
            target not in verified
            and (self._job_config().get("health") or {}).get("verify_checkpoints", True) is not False
        ):
            raise RequestError(
                f"step {target} is committed but not verified (no SDC check passed at or after it); "
                f"verified steps: {verified}",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        order = RollbackOrder(target, reason)
        write_rollback_order(self.run_dir, order)
        with self._lock:
            nodes = sorted(n for n in self._nodes if n not in self._excluded)
        self._record(EventKind.ROLLBACK_ORDERED, to_step=target, reason=reason, request=order.id)
        for node in nodes:
            self._killers.submit(self._kill_workers, node, f"rollback to step {target}: {reason}")
        log.warning("rollback to step %d ordered (%s); restarting workers on nodes %s", target, reason, nodes)
        return target, nodes

    def _record(self, kind: EventKind, **fields: Any) -> None:
        """An event of the controller's own finding; the incidents (and the dashboard) read it back at once."""
        self.events.emit(kind, **fields)
        self.events.flush()
        self._refresh_now.set()

    # ---------------------------------------------------------------- background work

    def _evaluate_loop(self) -> None:
        while not self._stop.wait(self.config.evaluate_interval_s):
            try:
                self.evaluate_once()
            except Exception:
                log.exception("controller evaluation failed; continuing")

    def evaluate_once(self) -> None:
        """Score stragglers (strikes may exclude their node) and sample the job's step for the rate."""
        now = time.time()
        with self._lock:
            self._scores, struck = self._stragglers.evaluate()
            step, track = self._current_step(), self._step_track
            if step is not None:
                if track and step < track[-1][1]:
                    track.clear()  # a restart or rollback: the rate starts over
                track.append((now, step))
            while track and now - track[0][0] > 60.0:
                track.popleft()
        for s in struck:
            detail = f"rank {s.rank} at {s.score:.2f}x the other ranks' median time"
            node = int(s.node) if s.node.isdigit() else s.node
            self._record(
                EventKind.FAULT_DETECTED,
                fault="straggler",
                target=f"rank{s.rank}",
                detector="controller",
                node=node,
                detail=detail,
            )
            self._strike(s.node, "straggler", detail)

    def _strike(self, node: str, kind: str, detail: str) -> None:
        with self._lock:
            if node in self._excluded:
                return
            verdict = self._strikes.strike(node, kind)
        log.warning("node %s: %s strike (%s)", node, kind, detail)
        if verdict:
            self.exclude(node, f"{verdict}; last: {detail}")

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.refresh_once()
            except Exception:
                log.exception("controller refresh failed; continuing with the previous view")
            # A long event log makes a refresh slow: then refresh less often, never more than half the time.
            self._refresh_now.wait(max(self.config.refresh_interval_s, 2 * (time.monotonic() - started)))
            self._refresh_now.clear()

    def refresh_once(self) -> None:
        """Re-read the run dir: events (goodput, incidents, network strikes), checkpoints, exclusions."""
        events = sorted(read_events(self.run_dir), key=lambda e: e["ts"])
        view = RunDirView()
        try:
            g = compute_goodput(events)
            view.goodput = {
                "ratio": g.goodput,
                "productive_s": g.productive_seconds,
                "wall_s": g.wall_seconds,
                "badput_s": {c: g.badput[c] for c in CATEGORIES},
            }
            # The goodput report's incidents, from the same function: one per root cause.
            view.incidents = [incident_dict(i) for i in g.incidents][-MAX_INCIDENTS:]
            view.incident_counts = dict(Counter(i.kind for i in g.incidents))
            view.step_rate = step_rate(g)
        except ValueError:
            pass  # no events yet
        with self._lock:
            for kind, n in view.incident_counts.items():
                self._counts[kind] = max(self._counts[kind], n)
        step_ends = [e for e in events if e["kind"] == "step_end"]
        if step_ends:
            last = step_ends[-1]
            view.last_step = _int(last.get("step"))
            view.step_seconds, view.tokens_per_second, view.mfu = (
                _float(last.get(k)) for k in ("step_seconds", "tokens_per_second", "mfu")
            )
        view.checkpoints = self.view.checkpoints
        excluded = self.exclusions.load()
        with self._lock:
            self._excluded = excluded  # the launcher may add nodes too
        self.view = (
            view  # published before the checkpoint listing, which may wait on storage (or on importing torch, once)
        )
        view.checkpoints = self._list_checkpoints(events)
        for e in events:
            if e["kind"] == "fault_detected" and e.get("fault") in NETWORK_FAULTS:
                key = (e["ts"], e.get("pid"), e.get("target"))
                if key not in self._seen_network_faults:
                    self._seen_network_faults.add(key)
                    node = _node_of(e)
                    if node:
                        self._strike(node, "network", f"{e.get('fault')} fault on {e.get('target')}")

    def _job_config(self, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The config of the job's newest start, as its ``job_start`` event recorded it ({} before one)."""
        starts = [e for e in (events if events is not None else read_events(self.run_dir)) if e["kind"] == "job_start"]
        config = starts[-1].get("config") if starts else None
        return config if isinstance(config, dict) else {}

    def _checkpoint_catalog(self, events: list[dict[str, Any]] | None = None) -> CheckpointCatalog | None:
        """The job's checkpoint catalog, None when checkpointing is off."""
        url, options = self.config.checkpoint_url, None
        if url is None:
            ckpt = self._job_config(events).get("checkpoint") or {}
            if ckpt.get("enabled") is False:
                return None
            url = default_checkpoint_url(self.run_dir, str(ckpt.get("url") or ""))
            options = s3_storage_options(str(ckpt.get("s3_endpoint") or ""), int(ckpt.get("s3_max_attempts") or 0))
        with self._checkpoints_lock:
            if self._checkpoints is None or self._checkpoints[0] != url:
                self._checkpoints = (url, CheckpointCatalog.open(url, options))
            return self._checkpoints[1]

    def _list_checkpoints(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            catalog = self._checkpoint_catalog(events)
            if catalog is None:
                return []
            catalog.storage.invalidate_cache()
            out = []
            for step in catalog.committed_steps()[-20:]:
                m = catalog.manifest(step)
                out.append({"step": step, "verified": m.verified, "bytes": m.total_bytes, "ts": m.created})
            return out
        except Exception as e:  # storage down or a step pruned mid-listing: keep the previous list
            log.warning("checkpoint listing failed (%s); showing the previous one", e)
            return self.view.checkpoints

    # ---------------------------------------------------------------- state

    def _current_step(self) -> int | None:
        live = [s.step for s in self._scores.values()] + [r.step for n in self._nodes.values() for r in n.status.ranks]
        return max(live) if live else self.view.last_step

    def state(self) -> dict[str, Any]:
        """The document behind ``/api/state`` and ``GetState`` (schema in the module docs of controller_http)."""
        now_mono, now = time.monotonic(), time.time()
        view = self.view
        with self._lock:
            scores = dict(self._scores)
            names = sorted(
                set(self._nodes) | set(self._excluded) | {s.node for s in scores.values()}, key=_node_sort_key
            )
            nodes = [self._node_state(name, scores, now_mono) for name in names]
            step = self._current_step()
            track = list(self._step_track)
        rate = (
            (track[-1][1] - track[0][1]) / (track[-1][0] - track[0][0])
            if len(track) >= 2 and track[-1][0] > track[0][0]
            else 0.0
        )
        return {
            "job": {"run_dir": str(self.run_dir), "started": self.started},
            "updated": now,
            "step": step if step is not None else 0,
            "step_rate": rate,
            "nodes": nodes,
            "incidents": view.incidents,
            "timeline": {"step_rate": view.step_rate},
            "checkpoints": view.checkpoints,
            "goodput": view.goodput,
        }

    def incident_counts(self) -> dict[str, int]:
        """Incidents by kind since the job began; only ever grows (a later report can fold one into another)."""
        with self._lock:
            return dict(self._counts)

    def _node_state(self, name: str, scores: dict[int, RankScore], now_mono: float) -> dict[str, Any]:
        entry, excluded = self._nodes.get(name), self._excluded.get(name)
        ranks: dict[int, dict[str, Any]] = {}
        gpus: list[dict[str, Any]] = []
        reasons: list[str] = []
        state, age = "HEALTHY", math.inf
        if entry is not None:
            st = entry.status
            age = now_mono - entry.heard_mono
            state, reasons = _STATE_NAMES[st.state], list(st.reasons)
            for r in st.ranks:
                ranks[r.rank] = {
                    "rank": r.rank,
                    "step": r.step,
                    "phase": _PHASE_NAMES.get(r.phase, "INIT"),
                    "heartbeat_age_s": r.last_heartbeat_age_s + age,
                    "step_seconds": r.step_seconds,
                    "straggler_score": 0.0,
                    "straggler": False,
                }
            for g in st.gpu.gpus:
                gpus.append(
                    {
                        "index": g.index,
                        "name": g.name,
                        "issues": [{"kind": i.kind, "fatal": i.fatal, "detail": i.detail} for i in g.issues],
                    }
                )
            if age > self.config.stale_node_s and state == "HEALTHY":
                state = "DEGRADED"
            if age > self.config.stale_node_s:
                reasons.append(f"no report from healthd for {age:.0f}s")
        else:
            state, reasons = "DEGRADED", ["no report from healthd"]
        for s in scores.values():
            if s.node == name:
                r = ranks.setdefault(
                    s.rank, {"rank": s.rank, "step": s.step, "phase": "STEP", "heartbeat_age_s": math.inf}
                )
                r.update(
                    step=max(r["step"], s.step),
                    step_seconds=s.step_seconds,
                    straggler_score=s.score,
                    straggler=s.straggler,
                )
        if excluded is not None:
            state, reasons = "EXCLUDED", [excluded.reason] + reasons
        return {
            "node": name,
            "state": state,
            "reasons": reasons,
            "heartbeat_age_s": _finite(age),
            "gpus": gpus,
            "ranks": [dict(r, heartbeat_age_s=_finite(r["heartbeat_age_s"])) for _, r in sorted(ranks.items())],
        }


class _Servicer(controller_pb2_grpc.ControllerServicer):
    """Thin gRPC adapter: refused requests become status codes and a log line, never a dead server."""

    def __init__(self, controller: JobController) -> None:
        self.c = controller

    def _refuse(self, context: grpc.ServicerContext, what: str, e: RequestError) -> None:
        self.c.refused["invalid" if e.code == grpc.StatusCode.INVALID_ARGUMENT else "precondition"] += 1
        log.warning("refused %s from %s: %s", what, context.peer(), e)
        context.abort(e.code, str(e))

    def _authorize(self, context: grpc.ServicerContext, what: str, token: str | None = None) -> None:
        if token is None:
            token = dict(context.invocation_metadata()).get(TOKEN_METADATA, "")
        if not self.c.check_token(token):
            self.c.refused["unauthenticated"] += 1
            log.warning("refused unauthenticated %s from %s", what, context.peer())
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{what} needs the job token")

    def ReportNode(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context, "ReportNode")
        try:
            excluded, reason = self.c.report_node(request, context.peer())
        except RequestError as e:
            self._refuse(context, "ReportNode", e)
        return controller_pb2.ReportReply(excluded=excluded, reason=reason)

    def ReportRankMetrics(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context, "ReportRankMetrics")
        try:
            self.c.report_metrics(request)
        except RequestError as e:
            self._refuse(context, "ReportRankMetrics", e)
        return controller_pb2.google_dot_protobuf_dot_empty__pb2.Empty()

    def GetState(self, request: Any, context: grpc.ServicerContext) -> Any:
        return controller_pb2.ControllerState(json=json.dumps(self.c.state()))

    def ExcludeNode(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context, "ExcludeNode", request.token)
        try:
            node = _check_name(request.node, "node")
        except RequestError as e:
            self._refuse(context, "ExcludeNode", e)
        reason = f"operator ({context.peer()}): {request.reason[:MAX_REASON] or 'no reason given'}"
        return controller_pb2.ExcludeReply(newly_excluded=self.c.exclude(node, reason))

    def RequestRollback(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context, "RequestRollback", request.token)
        target = request.WhichOneof("target")
        try:
            if target is None:
                raise RequestError("RequestRollback needs a step or latest_verified=true")
            step, nodes = self.c.request_rollback(
                request.step if target == "step" else None, request.reason[:MAX_REASON] or "operator request"
            )
        except RequestError as e:
            self._refuse(context, "RequestRollback", e)
        return controller_pb2.RollbackReply(step=step, notified_nodes=nodes)


# ---------------------------------------------------------------- helpers


def _check_name(name: str, what: str) -> str:
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise RequestError(f"{what} name must be 1-{MAX_NAME} printable characters (got {name[:MAX_NAME]!r})")
    return name


def _daemon_address(reported: str, peer: str) -> str:
    """Where to reach a node's healthd: its bound address, with a wildcard host replaced by the peer's."""
    if not reported or reported.startswith("unix:"):
        return reported
    host, _, port = reported.rpartition(":")
    if host not in ("0.0.0.0", "[::]", "::", ""):
        return reported
    family, _, rest = peer.partition(":")
    if family == "ipv4":
        return f"{rest.rsplit(':', 1)[0]}:{port}"
    if family == "ipv6":
        return f"{rest.rsplit(':', 1)[0]}:{port}"  # keeps the brackets: [addr]:port
    return ""


def _node_of(event: dict[str, Any]) -> str:
    target = str(event.get("target") or "")
    if target.startswith("node"):
        return target[4:].split("/", 1)[0]
    return str(event["node"]) if event.get("node") is not None else ""


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _finite(value: float) -> float:
    """JSON has no Infinity: 'never heard' is reported as -1."""
    return value if math.isfinite(value) else -1.0


def _node_sort_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
