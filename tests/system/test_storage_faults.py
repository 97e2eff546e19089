"""A periodic save that fails on real storage (full tmpfs, read-only mount) never costs the training run.

The job reaches its target step, each failure is a ``ckpt_fail`` event and one console line, the next
interval tries again and commits once the storage is back, retention counts only what committed, no
temporary directory is left, and every committed step verifies. One run goes through both faults (one
rank, the debug model, two dozen small steps); that only the last save failing ends a job is shown in
tests/distributed/test_checkpoint.py on a read-only tmpfs.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from storage_faults import fill, read_only, small_tmpfs
from tiny import tiny_overrides

from stalwart.checkpoint import naming
from stalwart.checkpoint.catalog import CheckpointCatalog
from stalwart.events import read_events

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24
INTERVAL = 4
KEEP = 2
TRAIN = [
    *(sys.executable, "-m", "stalwart", "train", "--config", "debug", "--training.steps", str(STEPS)),
    *("--checkpoint.interval", str(INTERVAL), "--checkpoint.keep_last", str(KEEP)),
    *tiny_overrides(model__n_layers=None, training__global_batch_size=4, training__threads_per_rank=None),
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


@pytest.mark.slow
def test_full_then_read_only_run_directory_costs_only_the_saves_that_failed(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "run", size_mb=48) as run_dir:
        ckpt_dir = run_dir / "checkpoints"
        job = Job([*TRAIN, "--job.run_dir", str(run_dir)])
        try:
            first = job.wait_for("a first commit", lambda: _committed(ckpt_dir))[-1]
            filler = fill(run_dir, leave_bytes=3 << 20)  # less than one checkpoint (~11 MiB): the next save runs out
            full = job.wait_for("a save failing for space", lambda: _failed_step(job, "MiB free of 48 MiB"))
            filler.unlink()  # space returns
            job.wait_for("a commit after space returned", lambda: [s for s in _committed(ckpt_dir) if s > full])
            with read_only(ckpt_dir):  # root cannot write there either
                refused = job.wait_for("a save refused read-only", lambda: _failed_step(job, "mounted read-only"))
            rc = job.finish()
        finally:
            if job.proc.poll() is None:
                job.proc.kill()
        text = job.text()
        assert rc == 0 and "Traceback" not in text, text[-3000:]
        assert first < full < refused < STEPS
        for failed in (full, refused):
            assert len(job.failure_lines(failed)) == 1, job.err  # one console line says why

        events = list(read_events(run_dir))
        commits = sorted({e["step"] for e in events if e["kind"] == "ckpt_commit"})
        fails = {e["step"] for e in events if e["kind"] == "ckpt_fail"}
        assert {full, refused} <= fails and not {full, refused} & set(commits), (fails, commits)
        assert any(full < s < refused for s in commits) and commits[-1] == STEPS, commits  # later saves commit
        assert max(e["step"] for e in events if e["kind"] == "step_end") == STEPS  # the job reached its target
        catalog = CheckpointCatalog.open(str(ckpt_dir))
        assert catalog.committed_steps() == commits[-KEEP:]  # retention counted commits only
        for step in catalog.committed_steps():
            assert catalog.verify(step) == [], step  # every committed step still verifies
        leftovers = [n for n in catalog.storage.list_dir() if (p := naming.parse(n)) is not None and p.is_tmp]
        assert leftovers == [], f"temporary directories left behind: {leftovers}"
