"""The controller's HTTP side: the dashboard, ``/api/state``, ``/metrics`` and ``/healthz``.

Read-only and token-free (mutations are gRPC calls with the job token); bound to the interface
given, TLS / mutual TLS with the gRPC server's certificates. Requests only read the controller's
in-memory state, never storage.

``/api/state`` (the dashboard codes against these keys)::

    {"job": {"run_dir": str, "started": ts}, "updated": ts, "step": int, "step_rate": float,
     "nodes": [{"node": str, "state": "HEALTHY"|"DEGRADED"|"UNHEALTHY"|"EXCLUDED", "reasons": [str],
                "heartbeat_age_s": float, "gpus": [{"index": int, "name": str,
                "issues": [{"kind": str, "fatal": bool, "detail": str}]}],
                "ranks": [{"rank": int, "step": int, "phase": str, "heartbeat_age_s": float,
                           "step_seconds": float, "straggler_score": float, "straggler": bool}]}],
     "incidents": [goodput.report.incident_dict: {"ts": float, "kind": str, "planned": bool, "target": str,
                    "suspects": bool, "ranks": [int], "nodes": [str], "devices": [str], "detector": str|null,
                    "detection_latency": float|null, "downtime": float, "lost_steps": int,
                    "restored_step": int|null, "actions": [str], "summary": str,
                    "consequences": [{"ts": float, "action": str, "text": str, "seconds": float|null}],
                    "evidence": {"stacks": [path], ...}, ...}],
     "timeline": {"step_rate": [[ts, steps per second], ...]},
     "checkpoints": [{"step": int, "verified": bool, "bytes": int, "ts": float}],
     "goodput": {"ratio": float, "productive_s": float, "wall_s": float, "badput_s": {category: float}}}

Ages are -1 when nothing was ever heard (JSON has no infinity). ``/stacks/NAME`` serves healthd's
stack dump ``RUN/health/NAME`` (``stacks-*.txt`` only), the link the dashboard puts under a hang.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import statistics
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from stalwart.health.security import TlsConfig

if TYPE_CHECKING:
    from stalwart.health.controller import JobController

log = logging.getLogger(__name__)

DASHBOARD = Path(__file__).resolve().parent / "dashboard" / "index.html"
_HEALTHY_STATES = ("HEALTHY", "DEGRADED")  # still training


class StateCollector(Collector):
    """Prometheus view of the controller state, built at scrape time from one state snapshot."""

    def __init__(self, controller: JobController) -> None:
        self.c = controller

    def collect(self) -> Iterator[Any]:
        state, view = self.c.state(), self.c.view
        g = state["goodput"]
        yield GaugeMetricFamily(
            "stalwart_goodput_ratio", "Productive training time / wall-clock time so far.", value=g["ratio"]
        )
        yield GaugeMetricFamily("stalwart_productive_seconds", "Productive step time so far.", value=g["productive_s"])
        yield GaugeMetricFamily("stalwart_wall_seconds", "Wall-clock time of the job so far.", value=g["wall_s"])
        badput = GaugeMetricFamily(
            "stalwart_badput_seconds", "Unproductive wall-clock time by cause.", labels=["category"]
        )
        for category, seconds in g["badput_s"].items():
            badput.add_metric([category], seconds)
        yield badput
        yield GaugeMetricFamily("stalwart_training_step", "Newest step any rank reached.", value=state["step"])
        yield GaugeMetricFamily(
            "stalwart_steps_per_second", "Training steps per second over the last minute.", value=state["step_rate"]
        )
        times = [r["step_seconds"] for n in state["nodes"] for r in n["ranks"] if r["step_seconds"] > 0]
        step_seconds = statistics.median(times) if times else view.step_seconds
        for name, doc, value in (
            ("stalwart_step_seconds", "Median over ranks of the last step's duration.", step_seconds),
            ("stalwart_tokens_per_second", "Job-wide training throughput at the last step.", view.tokens_per_second),
            ("stalwart_mfu_ratio", "Model FLOPs utilisation at the last step (0-1).", view.mfu),
        ):
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)
        incidents = CounterMetricFamily(
            "stalwart_incidents", "Incidents seen (faults, exclusions, rollbacks, stragglers) by kind.", labels=["kind"]
        )
        for kind, n in sorted(self.c.incident_counts().items()):
            incidents.add_metric([kind], n)
        yield incidents
        healthy = GaugeMetricFamily(
            "stalwart_node_healthy", "1 when the node is training (HEALTHY or DEGRADED), else 0.", labels=["node"]
        )
        node_state = GaugeMetricFamily(
            "stalwart_node_state", "1 for the node's current state.", labels=["node", "state"]
        )
        score = GaugeMetricFamily(
            "stalwart_rank_straggler_score",
            "Rank's recent step time / the other ranks' median.",
            labels=["node", "rank"],
        )
        for n in state["nodes"]:
            healthy.add_metric([n["node"]], 1.0 if n["state"] in _HEALTHY_STATES else 0.0)
            node_state.add_metric([n["node"], n["state"]], 1.0)
            for r in n["ranks"]:
                score.add_metric([n["node"], str(r["rank"])], r["straggler_score"])
        yield from (healthy, node_state, score)
        yield GaugeMetricFamily(
            "stalwart_nodes_excluded",
            "Nodes on the job's exclusion list.",
            value=sum(n["state"] == "EXCLUDED" for n in state["nodes"]),
        )
        yield GaugeMetricFamily(
            "stalwart_stragglers",
            "Ranks currently flagged as stragglers.",
            value=sum(r["straggler"] for n in state["nodes"] for r in n["ranks"]),
        )
        steps = [c["step"] for c in state["checkpoints"]]
        verified = [c["step"] for c in state["checkpoints"] if c["verified"]]
        if steps:
            yield GaugeMetricFamily(
                "stalwart_checkpoint_latest_step", "Newest committed checkpoint step.", value=max(steps)
            )
        if verified:
            yield GaugeMetricFamily(
                "stalwart_checkpoint_latest_verified_step", "Newest verified checkpoint step.", value=max(verified)
            )
        refused = CounterMetricFamily(
            "stalwart_controller_refused_requests", "gRPC requests refused, by reason.", labels=["reason"]
        )
        for reason, n in sorted(self.c.refused.items()):
            refused.add_metric([reason], n)
        yield refused


_STACK_DUMP = re.compile(r"stacks-[A-Za-z0-9.]+-rank\d+\.txt")


def stack_dump(run_dir: Path, name: str) -> Path | None:
    """healthd's stack dump ``name`` under ``RUN/health``; None for any other name (no path escapes)."""
    if not _STACK_DUMP.fullmatch(name):
        return None
    path = Path(run_dir) / "health" / name
    return path if path.is_file() else None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds a client may idle on its connection
    server_version = "stalwart-controller"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        c = self.server.controller
        if path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/api/state":
            self._send(200, json.dumps(c.state()).encode(), "application/json")
        elif path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path.startswith("/stacks/"):
            dump = stack_dump(c.run_dir, path.removeprefix("/stacks/"))
            if dump is None:
                self._send(404, b"no such stack dump\n", "text/plain; charset=utf-8")
            else:
                self._send(200, dump.read_bytes(), "text/plain; charset=utf-8")
        elif path in ("/", "/index.html"):
            body = (
                DASHBOARD.read_bytes()
                if DASHBOARD.is_file()
                else b"stalwart controller: dashboard not installed; see /api/state and /metrics\n"
            )
            self._send(200, body, "text/html; charset=utf-8" if DASHBOARD.is_file() else "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: try /, /api/state, /metrics or /healthz\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)

    def log_error(self, format: str, *args: Any) -> None:
        log.warning("http %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    controller: JobController
    registry: CollectorRegistry
    ssl_context: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, on the request's own thread: a slow or bogus client cannot
        # stall the accept loop.
        if self.ssl_context is not None:
            request.settimeout(_Handler.timeout)
            request = self.ssl_context.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        who = client_address[0] if client_address else "?"
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, ssl.SSLError, TimeoutError)):  # the client hung up or spoke nonsense
            log.info("http %s: client went away (%s: %s)", who, type(error).__name__, error)
            return
        log.warning("http %s: request failed", who, exc_info=True)  # ours: keep the traceback


class _Server6(_Server):
    address_family = socket.AF_INET6


def start_http_server(controller: JobController, bind: str, tls: TlsConfig | None) -> tuple[_Server, str]:
    """Serve on ``bind`` (``host:port``, port 0 picks one) from a daemon thread; returns (server, address)."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    try:
        cls = _Server6 if ":" in host else _Server
        server = cls((host, int(port)), _Handler)
    except (OSError, ValueError) as e:
        raise OSError(f"the controller's HTTP server could not bind {bind!r} ({e}); pick a free port or port 0") from e
    server.controller = controller
    server.registry = CollectorRegistry()
    server.registry.register(StateCollector(controller))
    server.ssl_context = tls.server_ssl_context() if tls else None
    threading.Thread(target=server.serve_forever, name="controller-http", daemon=True).start()
    bound = server.server_address[1]
    return server, f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
