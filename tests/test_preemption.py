"""Preemption: SIGTERM to a 2-rank `stalwart train` commits the current step and exits 0.

The relaunch continues from that step with the uninterrupted run's losses, bit for bit; a save
that cannot finish inside ``checkpoint.preemption_grace_s`` exits nonzero and commits nothing.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stalwart.checkpoint.manager import CheckpointManager
from stalwart.runtime.events import read_events

STEPS = 8
TRAIN = [sys.executable, "-m", "stalwart", "train", "--config", "debug", "--nproc-per-node", "2",
         "--training.steps", str(STEPS), "--checkpoint.interval", "100", "--data.max_tokens", "200000"]


def _losses(run_dir: Path) -> dict[int, dict[int, float]]:
    out: dict[int, dict[int, float]] = {}
    for e in read_events(run_dir):
        if e["kind"] == "step_end" and e["rank"] == 0:
            out.setdefault(e["pid"], {})[e["step"]] = e["loss"]
    return out


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
def test_sigterm_commits_the_current_step_and_resume_matches(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    done = subprocess.run([*TRAIN, "--job.run_dir", str(straight)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (reference,) = _losses(straight).values()

    run_dir = tmp_path / "preempted"
    job, err = _sigterm_after(3, [*TRAIN, "--job.run_dir", str(run_dir)])
    assert job.returncode == 0, err[-3000:]
    last = max(_losses(run_dir).popitem()[1])  # the step the ranks were in when the signal came
    assert 3 <= last < STEPS
    assert f"preempted: committed step {last}" in job.stdout
    assert f"stopped by SIGTERM; step {last} is committed" in job.stdout
    assert CheckpointManager(str(run_dir / "checkpoints")).committed_steps() == [last]
    stage = [e for e in read_events(run_dir) if e["kind"] == "ckpt_stage"]
    assert {e["step"] for e in stage} == {last}

    resumed = subprocess.run([*TRAIN, "--job.run_dir", str(run_dir)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"^resumed from step {last} ", resumed.stdout, re.MULTILINE), resumed.stdout[:2000]
    (after,) = [losses for losses in _losses(run_dir).values() if min(losses) == last + 1]
    assert after == {s: reference[s] for s in range(last + 1, STEPS + 1)}  # bit for bit


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
