"""What the controller and dashboard tests share: the job token, HTTP reads of the controller, rank processes."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "controller_cases.py"
TOKEN = "controller-test-token"


def spawn_rank(healthd: str, controller: str, node: int, rank: int, compute_s: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(CASES), healthd, controller, str(node), str(rank), str(compute_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"rank {rank} did not start (got {line!r}, exit {proc.poll()})"
    return proc


def http_get(address: str, path: str, context: ssl.SSLContext | None = None) -> bytes:
    scheme = "https" if context else "http"
    with urllib.request.urlopen(f"{scheme}://{address}{path}", timeout=10, context=context) as reply:
        return reply.read()


def api_state(address: str, context: ssl.SSLContext | None = None) -> dict:
    return json.loads(http_get(address, "/api/state", context))


def node_of(state: dict, node: str) -> dict | None:
    return next((n for n in state["nodes"] if n["node"] == node), None)
