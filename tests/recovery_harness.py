"""Real `stalwart train` ranks with a job store and a minimal agent that replaces a lost rank.

What ``stalwart launch`` does for in-process recovery, reduced to its core so that the trainer's side
can be tested on its own: the test process hosts the job store (a c10d TCPStore, as the launcher's
rendezvous store is), starts one process per rank with the launcher's environment, and when a rank
dies, starts one new process with the same rank and ``$STALWART_REPLACEMENT`` (the generation the
lost rank trained in). Every rank keeps its PID unless it died.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from stalwart.events import read_events
from stalwart.net import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RankProcess:
    rank: int
    proc: subprocess.Popen
    log: Path


@dataclass
class Job:
    run_dir: Path
    world_size: int
    overrides: list[str]
    plan: list[dict[str, Any]] = field(default_factory=list)
    replace: bool = True
    store: dist.TCPStore = field(init=False)
    round_id: str = field(init=False)
    ranks: dict[int, RankProcess] = field(default_factory=dict)
    started: list[tuple[float, int, int]] = field(default_factory=list)  # (time, rank, pid) of every process
    exits: list[tuple[float, int, int, int]] = field(default_factory=list)  # (time, rank, pid, code)

    def __post_init__(self) -> None:
        self.store = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
        )
        self.round_id = f"127.0.0.1:{free_port()}"
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def env(self, rank: int, replacing: int | None) -> dict[str, str]:
        host, port = self.round_id.split(":")
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.world_size),
            "GROUP_RANK": "0",
            "MASTER_ADDR": host,
            "MASTER_PORT": port,
            "STALWART_JOB_STORE": f"127.0.0.1:{self.store.port}",
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
        }
        env.pop("STALWART_FAULT_PLAN", None)
        if self.plan:
            env.update(STALWART_FAULT_INJECTION="1", STALWART_FAULT_PLAN=json.dumps(self.plan))
        if replacing is not None:
            env["STALWART_REPLACEMENT"] = str(replacing)
        return env

    def start(self, rank: int, replacing: int | None = None) -> RankProcess:
        log = self.run_dir / f"rank{rank}-{len(self.started)}.log"
        argv = [
            sys.executable,
            "-m",
            "stalwart",
            "train",
            "--config",
            "debug",
            "--job.run_dir",
            str(self.run_dir),
            *self.overrides,
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=self.env(rank, replacing), stdout=out, stderr=subprocess.STDOUT)
        self.ranks[rank] = RankProcess(rank, proc, log)
        self.started.append((time.time(), rank, proc.pid))
        return self.ranks[rank]

    def generation_of(self, rank: int) -> int:
        """What the launcher reads when a rank dies (through the same job-store client the ranks use)."""
        from stalwart.parallel.job_store import StoreAddress, open_store
        from stalwart.parallel.reform import JobStore

        return JobStore(open_store(StoreAddress.parse(f"127.0.0.1:{self.store.port}")), self.round_id).generation_of(
            rank
        )

    def run(self, timeout: float = 300.0) -> dict[int, int]:
        """Start every rank, replace the lost ones, wait for all to finish; exit codes by rank."""
        for rank in range(self.world_size):
            self.start(rank)
        deadline = time.monotonic() + timeout
        try:
            while any(r.proc.poll() is None for r in self.ranks.values()):
                for rank, r in list(self.ranks.items()):
                    code = r.proc.poll()
                    if code is None or code == 0 or (rank, r.proc.pid) in {(x[1], x[2]) for x in self.exits}:
                        continue
                    self.exits.append((time.time(), rank, r.proc.pid, code))
                    if self.replace and code < 0:
                        self.start(rank, replacing=self.generation_of(rank))
                if time.monotonic() > deadline:
                    raise AssertionError(f"the job did not finish within {timeout}s:\n{self.logs()}")
                time.sleep(0.02)
        finally:
            self.kill()
        return {rank: r.proc.returncode for rank, r in self.ranks.items()}

    def kill(self) -> None:
        for r in self.ranks.values():
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.run_dir.glob("rank*.log"))
        )


def losses(run_dir: Path) -> dict[int, float]:
    """Rank 0's loss of every step as finally kept (a step computed twice counts with its last value)."""
    out: dict[int, float] = {}
    for e in sorted(read_events(run_dir), key=lambda e: e["ts"]):
        if e["kind"] == "step_end" and e.get("rank") == 0:
            out[e["step"]] = e["loss"]
    return out


def events_of(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return sorted((e for e in read_events(run_dir) if e["kind"] == kind), key=lambda e: e["ts"])
