"""Pushes to the job controller: node status from healthd, step metrics from the ranks.

Reports carry the job token (``token``, default: read from ``$STALWART_TOKEN_FILE``), because
they drive exclusions. Training never depends on the controller: every ``report_*`` call returns at once (it queues), a
background thread sends, and an unreachable controller is retried quietly for ever. Rank metrics
queued while it is down are sent in batches when it returns (the oldest are dropped past
``max_pending``); node status is a snapshot taken at send time, so one report catches the controller
up. Nothing here raises into the caller.

Create the client after any ``fork()`` of the trainer, as for :class:`~stalwart.health.client.HeartbeatClient`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable

import grpc

from stalwart.health.proto import controller_pb2, controller_pb2_grpc, healthd_pb2
from stalwart.health.security import TlsConfig, TokenError, open_channel, read_token

log = logging.getLogger(__name__)

MAX_BATCH = 512  # metrics per RPC: well under the controller's message limit
# Worth sending again later; any other refusal (bad token, malformed) would be refused again.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
TOKEN_METADATA = "x-stalwart-token"


class ControllerClient:
    """One per process; ``node_status`` (healthd's) is called on the sender thread each interval."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: TlsConfig | None = None,
        node_status: Callable[[], healthd_pb2.NodeStatus] | None = None,
        interval_s: float = 1.0,
        rpc_timeout_s: float = 2.0,
        max_pending: int = 4096,
    ) -> None:
        self.address = address
        self.interval_s = interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self._node_status = node_status
        self._pending: deque[controller_pb2.RankMetrics] = deque(maxlen=max_pending)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self.sent = 0
        self.failures = 0
        self.excluded_reason: str | None = None
        if token is None:
            try:
                token = read_token(None)
            except TokenError as e:
                log.warning("controller reports will be refused: %s", e)
                token = ""
        self._metadata = ((TOKEN_METADATA, token),)
        self._channel = open_channel(address, tls)
        self._stub = controller_pb2_grpc.ControllerStub(self._channel)
        self._thread = threading.Thread(target=self._run, name="controller-report", daemon=True)
        self._thread.start()

    def report_rank_metrics(
        self, rank: int, node: str | int, step: int, step_seconds: float, compute_seconds: float = 0.0
    ) -> None:
        """Queue one finished step of ``rank``; returns at once (a malformed sample is dropped with a warning)."""
        try:
            m = controller_pb2.RankMetrics(
                rank=int(rank),
                node=str(node),
                step=int(step),
                step_seconds=float(step_seconds),
                compute_seconds=float(compute_seconds),
                ts=time.time(),
                pid=os.getpid(),  # this client reports from the rank's own process
            )
            if not (
                math.isfinite(m.step_seconds)
                and math.isfinite(m.compute_seconds)
                and m.step_seconds >= 0
                and m.compute_seconds >= 0
            ):
                raise ValueError("times must be finite and >= 0")
        except (TypeError, ValueError, OverflowError) as e:
            log.warning("dropped malformed rank metrics (rank %r step %r): %s", rank, step, e)
            return
        with self._lock:
            self._pending.append(m)

    def wake(self) -> None:
        """Send now instead of at the next interval (healthd calls it when its node state changes)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._send()
            except Exception:  # a bug here must not end the reporting thread
                log.exception("controller report failed; retrying")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _send(self) -> None:
        if self._node_status is not None and self._call(self._stub.ReportNode, self._node_status()) is not None:
            return
        while True:
            with self._lock:
                batch = [self._pending.popleft() for _ in range(min(MAX_BATCH, len(self._pending)))]
            if not batch:
                return
            code = self._call(self._stub.ReportRankMetrics, controller_pb2.RankMetricsReport(metrics=batch))
            if code in _RETRYABLE:
                with self._lock:  # back in front of newer ones; past the bound the oldest go
                    self._pending = deque([*batch, *self._pending], maxlen=self._pending.maxlen)
            if code is not None:
                return

    def _call(self, method: Callable, request: object) -> grpc.StatusCode | None:
        """None on success, else the failure's status code (logged now and then, never raised)."""
        try:
            reply = method(request, timeout=self.rpc_timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                retry = "retrying" if e.code() in _RETRYABLE else "dropped, fix the cause"
                log.warning(
                    "controller at %s refused or unreachable (%s: %s); training continues, %s",
                    self.address,
                    e.code(),
                    e.details(),
                    retry,
                )
            return e.code()
        self.sent += 1
        if isinstance(reply, controller_pb2.ReportReply):
            if reply.excluded and self.excluded_reason is None:
                log.warning("the controller excluded this node: %s", reply.reason)
            self.excluded_reason = reply.reason if reply.excluded else None
        return None

    def close(self) -> None:
        """Stop after one last attempt to deliver what is queued (bounded by the RPC timeout)."""
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=self.rpc_timeout_s + 1)
        try:
            self._send()
        except Exception:
            log.debug("last controller report failed", exc_info=True)
        self._channel.close()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
