"""A real etcd for the store tests: Debian's ``etcd-server`` (3.4), one or three members on free loopback ports.

:func:`ensure_etcd` installs the package with apt-get when ``etcd`` is missing (CI machines are
fresh and we are root there, as for Chromium in tests/browser.py); an install that fails fails the
tests, it never skips them. Members run with ``--enable-v2``: torch 2.13's etcd rendezvous and
store speak etcd's v2 API (through python-etcd), which etcd 3.4 serves only when asked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from polling import free_port

PACKAGE = "etcd-server"


def ensure_etcd() -> str:
    """The path of the etcd binary, installing Debian's package first if needed."""
    found = shutil.which("etcd")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.fail(f"etcd is missing: run `apt-get update && apt-get install -y {PACKAGE}` as root")
    # policy-rc.d keeps the package from starting a system-wide etcd (exit 101: "action forbidden").
    policy = Path("/usr/sbin/policy-rc.d")
    placed = not policy.exists()
    if placed:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE]
        for cmd in (["apt-get", "update", "-q"], install):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
            if done.returncode != 0:
                pytest.fail(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    finally:
        if placed:
            policy.unlink()
    found = shutil.which("etcd")
    if not found:
        pytest.fail(f"installed {PACKAGE} but etcd is not on PATH")
    return found


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"


@dataclass
class EtcdCluster:
    """``size`` etcd members on this machine; each can be killed and started again on its data dir."""

    root: Path
    size: int = 1
    binary: str = field(default_factory=ensure_etcd)
    members: list[EtcdMember] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.members = [EtcdMember(f"m{i}", free_port(), free_port()) for i in range(self.size)]

    @property
    def endpoints(self) -> str:
        """``--rdzv-endpoint`` for the launchers: every member."""
        return ",".join(m.endpoint for m in self.members)

    def _argv(self, m: EtcdMember) -> list[str]:
        cluster = ",".join(f"{x.name}=http://127.0.0.1:{x.peer_port}" for x in self.members)
        return [
            self.binary,
            "--name",
            m.name,
            "--data-dir",
            str(self.root / m.name),
            "--enable-v2",
            "--listen-client-urls",
            f"http://127.0.0.1:{m.client_port}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{m.client_port}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{m.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{m.peer_port}",
            "--initial-cluster",
            cluster,
            "--initial-cluster-token",
            self.root.name,
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "1000",
        ]

    def start(self, index: int | None = None, timeout: float = 60) -> None:
        """Start one member (or all), and wait until the cluster answers on it."""
        chosen = self.members if index is None else [self.members[index]]
        for m in chosen:
            log = open(self.root / f"{m.name}.log", "ab")
            m.proc = subprocess.Popen(self._argv(m), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for m in chosen:
            self.wait_healthy(m, timeout)

    def wait_healthy(self, m: EtcdMember, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://{m.endpoint}/health", timeout=2) as r:
                    if b'"true"' in r.read():
                        return
            except OSError:
                pass
            assert m.proc is not None and m.proc.poll() is None, f"etcd {m.name} exited:\n{self.log(m)}"
            assert time.monotonic() < deadline, f"etcd {m.name} not healthy within {timeout}s:\n{self.log(m)}"
            time.sleep(0.2)

    def log(self, m: EtcdMember) -> str:
        return (self.root / f"{m.name}.log").read_text(errors="replace")[-3000:]

    def kill(self, index: int) -> None:
        m = self.members[index]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait(10)

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)
