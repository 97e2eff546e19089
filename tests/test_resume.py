"""Exact resume: SIGKILL a 2-rank run at a random step, restart it, and get the same losses.

From the restored step on, every loss must equal the uninterrupted run's bit for bit (CPU,
deterministic data order, the loader position restored from the checkpoint).
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from stalwart.runtime.events import read_events

STEPS = 12
TRAIN = [sys.executable, "-m", "stalwart", "train", "--config", "debug", "--nproc-per-node", "2",
         "--training.steps", str(STEPS), "--checkpoint.interval", "3", "--data.max_tokens", "200000"]


def losses_by_pid(run_dir: Path) -> dict[int, dict[int, float]]:
    """Rank 0's losses per process incarnation: {pid: {step: loss}}."""
    out: dict[int, dict[int, float]] = {}
    for e in read_events(run_dir):
        if e["kind"] == "step_end" and e["rank"] == 0:
            out.setdefault(e["pid"], {})[e["step"]] = e["loss"]
    return out


def kill_tree(job: subprocess.Popen) -> None:
    """SIGKILL a launcher and every rank: elastic starts ranks in sessions of their own."""
    ranks = psutil.Process(job.pid).children(recursive=True)
    job.kill()
    for p in ranks:
        p.kill()
    psutil.wait_procs(ranks, timeout=30)
    job.wait(timeout=30)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run([*TRAIN, "--job.run_dir", str(straight)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (reference,) = losses_by_pid(straight).values()
    assert sorted(reference) == list(range(1, STEPS + 1))

    kill_at = random.Random().randint(4, STEPS - 1)
    print(f"killing the job with SIGKILL after step {kill_at}")
    run_dir = tmp_path / "killed"
    job = subprocess.Popen([*TRAIN, "--job.run_dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    try:
        for line in job.stdout:
            if line.startswith(f"step {kill_at:>2}/{STEPS}"):
                kill_tree(job)  # the launcher and every rank, no chance to clean up
                break
    finally:
        if job.poll() is None:
            kill_tree(job)
        job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL

    resumed = subprocess.run([*TRAIN, "--job.run_dir", str(run_dir)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    match = re.search(r"^resumed from step (\d+)", resumed.stdout, re.MULTILINE)
    assert match, resumed.stdout[:2000]
    restored = int(match.group(1))
    # The newest save at or before the kill, or the one before it when the kill beat its async commit.
    newest = kill_at - kill_at % 3
    assert restored in (newest, newest - 3), (kill_at, restored)
    loads = [e for e in read_events(run_dir) if e["kind"] == "ckpt_load"]
    assert [e["step"] for e in loads] == [restored] * len(loads) and loads

    after = [by_step for by_step in losses_by_pid(run_dir).values() if min(by_step) == restored + 1]
    assert len(after) == 1, losses_by_pid(run_dir)
    assert after[0] == {s: reference[s] for s in range(restored + 1, STEPS + 1)}  # bit for bit
