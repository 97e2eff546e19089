"""Nothing non-finite is committed: a clip norm that cannot train is refused, a NaN state rolls back or stops.

Real ``stalwart train`` runs: the fault ``nan_params`` turns every local parameter of one rank
NaN at the start of a step (what a diverged update leaves), so that step's loss is NaN on every
batch; the anomaly replay must call it a bad *state* (not bad data), and the job must go back to
a committed finite state, or stop with one line when there is none. Every committed step is then
read back whole and must hold finite tensors only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from tiny import tiny_overrides

from stalwart.checkpoint.catalog import CheckpointCatalog
from stalwart.events import read_events

ROOT = Path(__file__).resolve().parents[2]
SMALL = tiny_overrides(checkpoint__keep_last=20)


def train(run_dir: Path, *args: str, plan: list[dict] | None = None, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if plan:
        env.update(STALWART_FAULT_INJECTION="1", STALWART_FAULT_PLAN=json.dumps(plan))
    argv = [sys.executable, "-m", "stalwart", "train", "--config", "debug", "--job.run_dir", str(run_dir), *SMALL]
    argv += ["--nproc-per-node", str(nproc), *args]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def committed_tensors_are_finite(run_dir: Path) -> list[int]:
    """Read every committed step whole (model and optimizer); returns the steps, asserting each is finite."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from stalwart.checkpoint.manager import storage_reader

    catalog = CheckpointCatalog.open(str(run_dir / "checkpoints"))
    for step in catalog.committed_steps():
        state: dict[str, Any] = {}
        reader = storage_reader(catalog.storage, catalog.step_dir(step))
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        floats = [t for t in tensors(state) if t.is_floating_point()]
        assert floats and all(bool(torch.isfinite(t).all()) for t in floats), f"step {step} holds NaN/Inf"
    return catalog.committed_steps()


def errors(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("stalwart train: error:")]


def test_a_clip_norm_that_cannot_train_is_refused_up_front(tmp_path: Path) -> None:
    for bad in ("-inf", "-1", "nan", "0"):
        done = train(tmp_path / "run", "--training.max_grad_norm", bad)
        assert done.returncode == 2 and len(errors(done)) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "training.max_grad_norm" in errors(done)[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_nan_state_rolls_back_to_a_finite_commit_and_training_goes_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan = [{"kind": "nan_params", "step": 5, "rank": 0}]
    done = train(run_dir, "--training.steps", "8", "--checkpoint.interval", "2", plan=plan, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    events = list(read_events(run_dir))
    found = [e for e in events if e["kind"] == "fault_detected" and e.get("fault") == "nonfinite_state"]
    assert found and found[0]["target"] == "step5" and found[0]["detector"] == "replay", found
    assert not [e for e in events if e["kind"] == "fault_detected" and e.get("fault") == "bad_data"]
    rollbacks = [e for e in events if e["kind"] == "rollback"]
    assert rollbacks and rollbacks[0]["to_step"] == 4 and rollbacks[0]["from_step"] == 5
    assert "non-finite state" in done.stdout and "rolled back to step 4" in done.stdout
    assert committed_tensors_are_finite(run_dir)[-1] == 8
    final = [e for e in events if e["kind"] == "step_end" and e["rank"] == 0 and e["step"] == 8]
    assert final and all(e["loss"] == e["loss"] for e in final)  # the steps after the rollback are finite


def test_a_nan_state_with_no_finite_commit_stops_with_one_line_never_ok(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan = [{"kind": "nan_params", "step": 2, "rank": 0}]
    done = train(run_dir, "--training.steps", "6", "--checkpoint.interval", "4", plan=plan)
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors(done)) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "non-finite at step 2" in errors(done)[0] and "no committed step" in errors(done)[0]
    ends = [e["status"] for e in read_events(run_dir) if e["kind"] == "job_end"]
    assert ends == ["nonfinite"]
    assert committed_tensors_are_finite(run_dir) == []  # nothing was committed, least of all NaN
