"""Shared machinery of the chaos tests: real ``stalwart launch`` nodes with a fault plan, and the checks.

Every chaos test runs the same tiny job (debug model, 2 layers, 10 steps, a checkpoint every 2
steps) on real launchers of 2 CPU ranks each, with each node's health daemon, then holds the run
to the promise: the fault was detected and attributed, the job reached its target step, no
committed checkpoint was lost or loaded corrupted, the losses after recovery are the fault-free
run's, and the goodput report lists the incident with its costs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from polling import free_port

from stalwart.checkpoint.manager import CheckpointManager
from stalwart.events import read_events
from stalwart.goodput.accounting import CATEGORIES, PRODUCTIVE, GoodputReport, compute_goodput
from stalwart.goodput.incidents import Incident

ROOT = Path(__file__).resolve().parent.parent
STEPS = 10
JOB = [
    "--model.n_layers",
    "2",
    "--data.seq_len",
    "32",
    "--data.max_tokens",
    "20000",
    "--training.steps",
    str(STEPS),
    "--training.global_batch_size",
    "8",
    "--training.microbatch_size",
    "4",
    "--training.threads_per_rank",
    "1",
    "--training.warmup_steps",
    "2",
    "--checkpoint.interval",
    "2",
    "--checkpoint.keep_last",
    "8",
    "--health.golden_every",
    "0",
    "--health.fingerprint_every",
    "0",
]
# tp=2 within a node; replicas across nodes (dp_replicate grows and shrinks with the node count).
TP2 = ["--parallel.tp", "2", "--parallel.dp_replicate", "-1", "--parallel.dp_shard", "1"]
# Two replicas on one node: what the cross-replica fingerprints need.
DDP2 = ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1", "--health.fingerprint_every", "1"]
FAST = [
    "--rdzv-conf",
    "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=300,read_timeout=20",
    "--monitor-interval",
    "0.2",
    "--peer-timeout",
    "6",
    "--max-restarts",
    "6",
    "--failure-stop-timeout",
    "3",
]


@dataclass
class Cluster:
    """Launchers of one job on this machine, each a "node" with its own health daemon."""

    run_dir: Path
    layout: list[str]
    plan: list[dict[str, Any]] = field(default_factory=list)
    nnodes: str = "1"
    extra: list[str] = field(default_factory=list)
    controller: str = "off"
    rdzv: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    nproc: int = 2
    backend: str = "c10d"  # etcd-v2: rdzv lists the etcd members
    healthd: bool = True
    hosted: bool = True  # c10d: the first node hosts the store (False: `stalwart store` serves it)

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        env.pop("STALWART_FAULT_PLAN", None)
        if self.plan:
            env.update(STALWART_FAULT_INJECTION="1", STALWART_FAULT_PLAN=json.dumps(self.plan))
        return env

    def start(self, node: str) -> subprocess.Popen:
        argv = [
            sys.executable,
            "-m",
            "stalwart",
            "launch",
            "--config",
            "debug",
            "--nnodes",
            self.nnodes,
            "--nproc-per-node",
            str(self.nproc),
            "--rdzv-backend",
            self.backend,
            "--rdzv-endpoint",
            self.rdzv,
            "--rdzv-id",
            "chaos",
            "--node-id",
            node,
            "--run-dir",
            str(self.run_dir),
            "--healthd",
            f"127.0.0.1:{free_port()}" if self.healthd else "off",
            "--controller",
            self.controller,
            *FAST,
            *JOB,
            *self.layout,
            *self.extra,
        ]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.run_dir / f"launch-{node}-{len(self.nodes)}.log", "ab")
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.nodes[f"{node}#{len(self.nodes)}"] = proc
        if len(self.nodes) == 1 and self.backend == "c10d" and self.hosted:
            wait_until_listening(self.rdzv, proc)  # the first node hosts the store: the one node it can't lose
        return proc

    def wait(self, timeout: float = 300) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        for proc in self.nodes.values():
            proc.wait(max(1.0, deadline - time.monotonic()))
        return {name: proc.returncode for name, proc in self.nodes.items()}

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.run_dir.glob("launch-*.log"))
        )

    def kill_all(self) -> None:
        """Every launcher and everything it started (elastic puts ranks in sessions of their own)."""
        for proc in self.nodes.values():
            try:
                family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for p in family:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait(10)


def wait_until_listening(address: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    from stalwart.launcher.services import answers

    deadline = time.monotonic() + timeout
    while not answers(address):
        assert proc.poll() is None and time.monotonic() < deadline, f"nothing listens on {address}"
        time.sleep(0.2)


def events(run_dir: Path) -> list[dict[str, Any]]:
    return sorted(read_events(run_dir), key=lambda e: e["ts"])


def trajectory(run_dir: Path) -> dict[int, float]:
    """The loss of every step as finally kept: a step computed twice counts with its last value."""
    out: dict[int, float] = {}
    for e in events(run_dir):
        if e["kind"] == "step_end" and e.get("role") == "trainer":
            out[e["step"]] = e["loss"]
    return out


def faults_detected(run_dir: Path, fault: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events(run_dir) if e["kind"] == "fault_detected" and (fault is None or e.get("fault") == fault)]


def assert_recovered(
    run_dir: Path,
    reference: dict[int, float],
    exact: bool = True,
    checkpoint_url: str | None = None,
    options: dict | None = None,
) -> GoodputReport:
    """Target reached, checkpoints intact, losses as fault-free, costs accounted; returns the goodput report."""
    got = trajectory(run_dir)
    assert max(got, default=0) == STEPS, f"the job stopped at step {max(got, default=0)} of {STEPS}"
    assert sorted(got) == sorted(reference)
    for step, loss in reference.items():
        if exact:
            assert got[step] == loss, f"step {step}: loss {got[step]!r} after recovery, {loss!r} fault-free"
        else:  # another data-parallel degree after a resize: the same sums in another order
            assert math.isclose(got[step], loss, rel_tol=1e-4), (
                f"step {step}: loss {got[step]!r} vs fault-free {loss!r}"
            )

    # No committed checkpoint lost or loaded corrupted: the corrupted step (if any) was never loaded,
    # and the newest committed step is the target and passes its checksums.
    evs = events(run_dir)
    corrupted = {
        Path(e["target"]).parent.name
        for e in evs
        if e["kind"] == "fault_injected" and e.get("fault") == "ckpt_corrupt_file"
    }
    for load in (e for e in evs if e["kind"] == "ckpt_load" and e.get("tier") != "memory"):
        assert f"step-{load['step']:08d}" not in corrupted, f"the corrupted step {load['step']} was loaded"
    manager = CheckpointManager(checkpoint_url or str(run_dir / "checkpoints"), options)
    assert manager.latest() == STEPS
    assert manager.verify(STEPS) == []
    manager.close()

    report = compute_goodput(evs)
    total = report.seconds(PRODUCTIVE) + sum(report.seconds(c) for c in CATEGORIES)
    assert math.isclose(total, report.wall_seconds, rel_tol=0.01), (total, report.wall_seconds)
    return report


def training_incidents(report: GoodputReport) -> list[Incident]:
    """The incidents until the job first reached its target step: the injected faults' stories.

    Once the last step is committed the ranks shut down, and healthd may still take a rank slow to
    exit for a hang (its STEP limit can be 2 s and the heartbeat cannot say "done"): a real incident,
    but not the injected fault's.
    """
    reached = min((s.end for s in report.steps if s.step == STEPS), default=report.wall_end)
    return [i for i in report.incidents if i.ts <= reached]


def the_incident(report: GoodputReport, kind: str, target: str) -> Incident:
    """The run's one fault incident: of ``kind``, attributed to ``target``, with its costs filled in."""
    incidents = training_incidents(report)
    faults = [(i.kind, i.target) for i in incidents if not i.planned]
    assert faults == [(kind, target)], f"expected one {kind} incident on {target}, got {faults}"
    return costed(next(i for i in incidents if not i.planned))


def costed(inc: Incident) -> Incident:
    """``inc``, after checking that its costs and its story are filled in."""
    assert inc.detection_latency is not None and inc.detection_latency >= 0, inc
    assert inc.downtime >= 0 and inc.lost_steps >= 0 and inc.lost_seconds >= 0, inc
    assert inc.summary and inc.consequences, inc
    return inc


def consequences(inc: Incident, action: str) -> list[str]:
    return [c.text for c in inc.consequences if c.action == action]
