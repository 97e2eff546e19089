"""Two jobs never share a run: real ``stalwart train`` jobs on one run directory.

A second job on a live run is refused with one line naming the holder; a job started after the
holder died takes the run over with a higher epoch; a frozen holder whose lease expired is taken
over, and when it wakes its next commit is rejected and it stops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from polling import wait_for
from tiny import tiny_overrides

from stalwart.checkpoint import naming
from stalwart.checkpoint.catalog import CheckpointCatalog
from stalwart.checkpoint.lease import current_record
from stalwart.events import read_events
from stalwart.jobenv import JOB_ID_ENV, PARENT_PID_ENV

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_overrides(health__fingerprint_every=0, checkpoint__interval=2, checkpoint__keep_last=20)


def train_argv(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stalwart",
        "train",
        "--config",
        "debug",
        "--nproc-per-node",
        "2",
        "--job.run_dir",
        str(run_dir),
        "--training.steps",
        str(steps),
        *TINY,
        *extra,
    ]


def env() -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k not in (PARENT_PID_ENV, JOB_ID_ENV)}
    return {**inherited, "PYTHONWARNINGS": "ignore"}


def start(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def catalog(run_dir: Path) -> CheckpointCatalog:
    return CheckpointCatalog.open(str(run_dir / "checkpoints"))


def markers(run_dir: Path) -> dict[str, dict]:
    """Every commit marker under the root, committed or fenced: directory → marker JSON."""
    root = run_dir / "checkpoints"
    return {p.parent.name: json.loads(p.read_text()) for p in root.glob(f"step-*/{naming.COMMIT_MARKER}")}


def family(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def end(proc: subprocess.Popen) -> None:
    for p in family(proc):
        try:
            p.send_signal(signal.SIGCONT)
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)


@pytest.mark.slow
def test_a_second_job_is_refused_and_one_started_after_the_holder_died_takes_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = start(train_argv(run_dir, 400), tmp_path / "a.log")
    try:
        wait_for(lambda: catalog(run_dir).committed_steps(), 240, "the first job's first commit")
        first = current_record(catalog(run_dir).storage)
        assert first.epoch == 1 and first.pid in {p.pid for p in family(holder)}

        started = time.monotonic()
        second = run(train_argv(run_dir, 400), timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("stalwart train: error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"pid {first.pid}" in errors[0] and "epoch 1" in errors[0] and str(run_dir) in errors[0]
        assert "step " not in second.stdout and time.monotonic() - started < 60  # refused before any rank started

        holder.send_signal(signal.SIGKILL)  # the holder dies (its ranks with it)
        holder.wait(10)
        wait_for(lambda: gone(first.pid), 15, "the holder's rank 0 to end")
        reached = catalog(run_dir).latest()
        taker = run(train_argv(run_dir, reached + 4), timeout=300)
        assert taker.returncode == 0, taker.stderr[-3000:]
        assert f"resumed from step {reached}" in taker.stdout
        lease = current_record(catalog(run_dir).storage)
        assert lease.epoch == 2 and lease.released and lease.job != first.job
        by_dir = markers(run_dir)
        new = [d for d, m in by_dir.items() if m["step"] > reached]
        assert new and all(by_dir[d]["epoch"] == 2 for d in new)
        assert catalog(run_dir).latest() == reached + 4
    finally:
        end(holder)


@pytest.mark.slow
def test_a_frozen_holder_is_taken_over_and_its_next_commit_is_rejected(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ttl = ["--checkpoint.lease_ttl_s", "3"]
    frozen = start(train_argv(run_dir, 400, *ttl), tmp_path / "a.log")
    try:
        wait_for(lambda: catalog(run_dir).committed_steps(), 240, "the first job's first commit")
        for p in family(frozen):
            p.suspend()  # alive, but silent: its lease runs out
        time.sleep(4)
        reached = catalog(run_dir).latest()
        taker = run(train_argv(run_dir, reached + 4, *ttl), timeout=300)
        assert taker.returncode == 0, taker.stderr[-3000:]
        assert current_record(catalog(run_dir).storage).epoch == 2
        committed_by_taker = catalog(run_dir).committed_steps()

        took_over_at = time.time()
        for p in family(frozen):
            p.resume()
        frozen.wait(120)  # it wakes, tries to commit, is refused, stops
        assert frozen.returncode not in (0, None)
        log = (tmp_path / "a.log").read_text(errors="replace")
        assert "was taken over by job" in log and "epoch 2" in log, log[-3000:]
        assert catalog(run_dir).committed_steps() == committed_by_taker  # nothing the old epoch did counts
        late = [m for m in markers(run_dir).values() if m["epoch"] == 1 and m["committed_at"] > took_over_at]
        assert not late  # the check before the marker held: it did not even write one
        ends = [e for e in read_events(run_dir) if e["kind"] == "job_end" and e["ts"] > took_over_at]
        assert [e["status"] for e in ends] == ["fenced"]
        refused = [e for e in read_events(run_dir) if e["kind"] == "ckpt_fail" and e["ts"] > took_over_at]
        # Its commit is refused; its shard writes may fail first, the new holder having swept its temp dir.
        assert any("not committed" in e["reason"] for e in refused), refused
        assert all("not committed" in e["reason"] or ".tmp-" in e["reason"] for e in refused), refused
    finally:
        end(frozen)
