"""No event is lost at a kill: a rank SIGKILLed right after a commit still has that step's ``step_end`` in the log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tiny import tiny_overrides

from stalwart.checkpoint.catalog import CheckpointCatalog
from stalwart.events import FLUSH_INTERVAL_ENV, read_events

ROOT = Path(__file__).resolve().parents[2]
SMALL = tiny_overrides(training__global_batch_size=4, training__threads_per_rank=None, checkpoint__mode="sync")


def test_a_kill_right_after_a_commit_keeps_the_committed_steps_step_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan = [{"kind": "kill_after_commit", "step": 3, "rank": 0}]
    env = {**os.environ, "STALWART_FAULT_INJECTION": "1", "STALWART_FAULT_PLAN": json.dumps(plan)}
    env[FLUSH_INTERVAL_ENV] = "600"  # no timer to rely on: only the flushes the commit path makes count
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stalwart",
            "train",
            "--config",
            "debug",
            "--job.run_dir",
            str(run_dir),
            "--training.steps",
            "10",
            "--checkpoint.interval",
            "3",
            *SMALL,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    catalog = CheckpointCatalog.open(str(run_dir / "checkpoints"))
    assert catalog.committed_steps() == [3]
    events = list(read_events(run_dir))
    assert [e["step"] for e in events if e["kind"] == "step_end"] == [1, 2, 3]
    assert [e["step"] for e in events if e["kind"] == "ckpt_commit"] == [3]
    assert not [e for e in events if e["kind"] == "fault_injected"]  # the kill's own event was not flushed
