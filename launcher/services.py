"""The node's side services the launcher makes sure of: healthd (one per node) and the controller (one per job).

Training never depends on either: a missing daemon is started, one that fails to start is reported
and ignored, and the launcher only *reads* healthd (UNHEALTHY → leave the job).
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

from stalwart.jobenv import TOKEN_FILE_ENV
from stalwart.net import answers

log = logging.getLogger(__name__)

CONTROLLER_GRPC_PORT = 50052
CONTROLLER_HTTP_PORT = 8080


def job_token_file(run_dir: Path) -> str:
    """``$STALWART_TOKEN_FILE``, else ``RUN/health/token`` (created once, mode 0600); exported for the children."""
    path = os.environ.get(TOKEN_FILE_ENV)
    if not path:
        token = run_dir / "health" / "token"
        token.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        except FileExistsError:
            pass
        path = os.environ[TOKEN_FILE_ENV] = str(token)
    return path


def _start(argv: list[str], what: str, log_path: Path) -> subprocess.Popen | None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        try:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # it binds itself to this launcher on start (stalwart.lifeline)
        except OSError as e:
            log.warning("could not start %s (%s); training goes on without it", what, e)
            return None
    print(f"stalwart launch: started {what} (pid {proc.pid}, log {log_path})", flush=True)
    return proc


def ensure_healthd(
    address: str, run_dir: Path, node_id: str, controller: str = "", hang_kill: str = "group"
) -> subprocess.Popen | None:
    """Start ``stalwart healthd`` at ``address`` unless something already answers there.

    It reports to ``controller`` when one is known, under this node's name. ``hang_kill`` is what it
    kills for a hang: the ``culprit`` (in-process recovery replaces it) or the node's whole ``group``.
    """
    if answers(address):
        return None
    argv = [
        sys.executable,
        "-m",
        "stalwart",
        "healthd",
        "--run-dir",
        str(run_dir),
        "--bind",
        address,
        "--token-file",
        job_token_file(run_dir),
        "--node",
        node_id,
        "--hang-kill",
        hang_kill,
        "--worker-ancestor",  # only processes this launcher started can register as its ranks
        str(os.getpid()),
        *(["--controller", controller] if controller else []),
    ]
    return _start(argv, f"healthd on {address}", run_dir / "health" / f"healthd-{node_id}.log")


def start_controller(run_dir: Path, host: str) -> tuple[subprocess.Popen | None, str]:
    """Start ``stalwart controller`` on this (the rendezvous host's) machine; returns it and its gRPC address."""
    import importlib.util

    address = f"{host}:{CONTROLLER_GRPC_PORT}"
    if importlib.util.find_spec("stalwart.health.controller") is None or answers(address):
        return None, address
    argv = [
        sys.executable,
        "-m",
        "stalwart",
        "controller",
        "--run-dir",
        str(run_dir),
        "--grpc-bind",
        address,
        "--http-bind",
        f"{host}:{CONTROLLER_HTTP_PORT}",
        "--token-file",
        job_token_file(run_dir),
    ]
    return _start(argv, f"controller on {address}", run_dir / "health" / "controller.log"), address


def stop(procs: list[subprocess.Popen | None], timeout_s: float = 5.0) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
    for proc in procs:
        if proc is None:
            continue
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


class HealthWatch:
    """Asks the node's healthd whether the node is UNHEALTHY; an unreachable daemon counts as healthy."""

    def __init__(self, address: str, timeout_s: float = 0.5) -> None:
        import grpc

        from stalwart.health.proto import healthd_pb2_grpc

        self._channel = grpc.insecure_channel(address)
        self._stub = healthd_pb2_grpc.NodeHealthStub(self._channel)
        self.timeout_s = timeout_s

    def unhealthy_reason(self) -> str | None:
        import grpc
        from google.protobuf import empty_pb2

        from stalwart.health.proto import healthd_pb2

        try:
            status = self._stub.GetStatus(empty_pb2.Empty(), timeout=self.timeout_s)
        except grpc.RpcError:
            return None
        if status.state != healthd_pb2.UNHEALTHY:
            return None
        return "healthd: " + ("; ".join(status.reasons) or "node UNHEALTHY")

    def close(self) -> None:
        self._channel.close()
