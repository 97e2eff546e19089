"""A periodic save that fails on real storage (full tmpfs, read-only mount) never costs the training run.

The job reaches its target step, the failure is a ``ckpt_fail`` event and one console line, the next
interval tries again and commits once the storage is back, retention counts only what committed, no
temporary directory is left, and every committed step verifies. Only the last save failing ends the
job non-zero, with one line. One rank, the debug model, a few dozen small steps.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from storage_faults import fill, remount, small_tmpfs

from stalwart.checkpoint import naming
from stalwart.checkpoint.catalog import CheckpointCatalog
from stalwart.events import read_events

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20
INTERVAL = 4
KEEP = 2
TRAIN = [
    sys.executable,
    "-m",
    "stalwart",
    "train",
    "--config",
    "debug",
    "--training.steps",
    str(STEPS),
    "--checkpoint.interval",
    str(INTERVAL),
    "--checkpoint.keep_last",
    str(KEEP),
    "--data.seq_len",
    "32",
    "--data.max_tokens",
    "20000",
    "--training.global_batch_size",
    "4",
    "--training.microbatch_size",
    "4",
    "--health.golden_every",
    "0",
]


class Job:
    """A ``stalwart train`` process whose output is collected as it comes."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:  # noqa: ANN001
        for line in stream:
            lines.append(line)

    def wait_for(self, what: str, ready: Callable[[], object], timeout_s: float = 120) -> object:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            assert self.proc.poll() is None, f"the job ended before {what}:\n{self.text()[-3000:]}"
            time.sleep(0.02)
        raise AssertionError(f"no {what} within {timeout_s}s:\n{self.text()[-3000:]}")

    def failure_lines(self, step: int | None = None) -> list[str]:
        prefix = "checkpoint step " if step is None else f"checkpoint step {step}:"
        return [line for line in self.err if line.startswith(prefix)]

    def finish(self, timeout_s: float = 180) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        for t in self._readers:
            t.join(timeout=10)
        return rc

    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)


def _committed(ckpt_dir: Path) -> list[int]:
    try:
        return CheckpointCatalog.open(str(ckpt_dir)).committed_steps()
    except OSError:  # a read-only or full file system can refuse a listing mid-way
        return []


def _failed_step(job: Job, errno_text: str) -> int | None:
    for line in job.failure_lines():
        if errno_text in line:
            return int(line.split()[2].rstrip(":"))
    return None


def _check_committed_state(ckpt_dir: Path, run_dir: Path, failed: int) -> list[int]:
    """Retention counted only commits, nothing is left half-written, every committed step verifies."""
    events = list(read_events(run_dir))
    commits = sorted({e["step"] for e in events if e["kind"] == "ckpt_commit"})
    fails = {e["step"] for e in events if e["kind"] == "ckpt_fail"}
    catalog = CheckpointCatalog.open(str(ckpt_dir))
    committed = catalog.committed_steps()
    assert failed in fails and failed not in commits, (fails, commits)
    assert any(step > failed for step in commits), f"no save committed after the failure at {failed}: {commits}"
    assert committed == commits[-KEEP:], (committed, commits)
    for step in committed:
        assert catalog.verify(step) == [], step
    leftovers = [n for n in catalog.storage.list_dir() if (p := naming.parse(n)) is not None and p.is_tmp]
    assert leftovers == [], f"temporary directories left behind: {leftovers}"
    assert max(e["step"] for e in events if e["kind"] == "step_end") == STEPS  # the job reached its target
    return committed


@pytest.mark.slow
def test_a_full_disk_during_periodic_saves_costs_nothing_but_those_saves(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "run", size_mb=48) as run_dir:
        ckpt_dir = run_dir / "checkpoints"
        job = Job([*TRAIN, "--job.run_dir", str(run_dir)])
        try:
            job.wait_for("a first commit", lambda: _committed(ckpt_dir))
            filler = fill(run_dir, leave_bytes=3 << 20)  # less than one checkpoint (~11 MiB): the next save runs out
            failed = job.wait_for("a save failing for space", lambda: _failed_step(job, "MiB free of 48 MiB"))
            filler.unlink()  # space returns
            rc = job.finish()
        finally:
            if job.proc.poll() is None:
                job.proc.kill()
        assert rc == 0, job.text()[-3000:]
        assert "Traceback" not in job.text()
        assert len(job.failure_lines(failed)) == 1, job.err  # one console line says why
        committed = _check_committed_state(ckpt_dir, run_dir, failed)
        assert committed[-1] == STEPS


@pytest.mark.slow
def test_read_only_checkpoints_skip_periodic_saves_and_only_a_failed_last_save_fails_the_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with small_tmpfs(tmp_path / "ckpt", size_mb=96) as ckpt_dir:
        job = Job([*TRAIN, "--job.run_dir", str(run_dir), "--checkpoint.url", str(ckpt_dir)])
        try:
            first = job.wait_for("a first commit", lambda: _committed(ckpt_dir))[-1]
            remount(ckpt_dir, "ro")
            failed = job.wait_for("a save refused read-only", lambda: _failed_step(job, "mounted read-only"))
            remount(ckpt_dir, "rw")
            later = job.wait_for("a commit after the failure", lambda: [s for s in _committed(ckpt_dir) if s > failed])
            remount(ckpt_dir, "ro")  # and read-only again until the end: the last save cannot commit
            rc = job.finish()
            remount(ckpt_dir, "rw")
        finally:
            if job.proc.poll() is None:
                job.proc.kill()
        assert first < failed < later[0] < STEPS
        assert rc != 0 and "Traceback" not in job.text(), job.text()[-3000:]
        errors = [line for line in job.err if line.startswith("stalwart train: error:")]
        assert len(errors) == 1 and f"the checkpoint of the last step ({STEPS}) was not saved" in errors[0], job.err
        assert len(job.failure_lines(failed)) == 1, job.err
        events = list(read_events(run_dir))
        assert max(e["step"] for e in events if e["kind"] == "step_end") == STEPS
        commits = sorted({e["step"] for e in events if e["kind"] == "ckpt_commit"})
        catalog = CheckpointCatalog.open(str(ckpt_dir))
        assert catalog.committed_steps() == commits[-KEEP:] and STEPS not in commits
        for step in catalog.committed_steps():
            assert catalog.verify(step) == [], step
