"""Preemption under `stalwart train`: a save that cannot finish inside the grace period commits nothing.

The successful case (commit at the current step, exit 0, the requeued job's losses bit for bit)
runs under real launchers in tests/test_chaos.py and tests/test_launcher.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stalwart.checkpoint.manager import CheckpointManager
from stalwart.events import read_events

STEPS = 8
TRAIN = [
    sys.executable,
    "-m",
    "stalwart",
    "train",
    "--config",
    "debug",
    "--nproc-per-node",
    "2",
    "--training.steps",
    str(STEPS),
    "--checkpoint.interval",
    "100",
    "--data.max_tokens",
    "200000",
]


def _sigterm_after(step: int, args: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``args``, send SIGTERM to the launcher once ``step`` is printed; (result, stdout)."""
    job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in job.stdout:
            lines.append(line)
            if line.startswith(f"step {step:>1}/{STEPS}"):
                job.send_signal(signal.SIGTERM)  # what a scheduler sends first
                break
        out, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    return subprocess.CompletedProcess(args, job.returncode, "".join(lines) + out, err), err


@pytest.mark.slow
def test_save_outlasting_the_grace_period_exits_nonzero_without_a_commit(tmp_path: Path) -> None:
    run_dir = tmp_path / "late"
    job, err = _sigterm_after(2, [*TRAIN, "--job.run_dir", str(run_dir), "--checkpoint.preemption_grace_s", "0.001"])
    assert job.returncode != 0
    assert "did not finish within checkpoint.preemption_grace_s=0.001s" in err
    assert "stopped by SIGTERM before a checkpoint was committed" in err
    assert CheckpointManager(str(run_dir / "checkpoints")).committed_steps() == []
    fails = [e for e in read_events(run_dir) if e["kind"] == "ckpt_fail"]
    assert fails and all(e["tier"] == "preemption" for e in fails)
