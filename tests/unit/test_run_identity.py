"""A run directory whose checkpoints are of another model or tokenizer is refused in one line, before any load.

The checkpoint is written by the real manager (as the trainer does: the model's config.json shape and the
tokenizer's identity in the manifest); a different parallel layout stays allowed (loads reshard).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stalwart.checkpoint.identity import RunDirectoryMismatch
from stalwart.checkpoint.manager import CheckpointManager
from stalwart.cli.main import main
from stalwart.jobenv import PARENT_PID_ENV
from stalwart.model.args import hf_shape
from stalwart.runtime.config import load_config
from stalwart.runtime.plan import check_run_directory, plan_job


def _saved_run(run_dir: Path, overrides: list[str]) -> None:
    """Step 2 of a run of ``debug`` with ``overrides``, saved the way the trainer saves it."""
    cfg = load_config("debug", ["--job.run_dir", str(run_dir), *overrides])
    plan = plan_job(cfg, 1)
    manager = CheckpointManager(cfg.checkpoint_url)
    manager.save(2, {"w": torch.ones(2)}, model=hf_shape(plan.model_args), tokenizer=plan.tokenizer.identity)
    manager.close()


def test_another_model_shape_is_refused_with_what_differs(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    run_dir = tmp_path / "run"
    _saved_run(run_dir, ["--model.n_layers", "2"])
    assert main(["train", "--config", "debug", "--job.run_dir", str(run_dir)]) == 2  # the config says 4 layers
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "holds checkpoints of a different model (step 2)" in err
    assert "num_hidden_layers 2 in the checkpoint, 4 in the config" in err
    assert "--checkpoint.resume none" in err and "--job.run_dir" in err


def test_another_tokenizer_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _saved_run(run_dir, [])
    cfg = load_config("debug", ["--job.run_dir", str(run_dir)])
    plan = plan_job(cfg, 1)
    manager = CheckpointManager(cfg.checkpoint_url)
    manager.save(3, {"w": torch.ones(2)}, model=hf_shape(plan.model_args), tokenizer="hf-0123456789abcdef-<s>-</s>")
    manager.close()
    with pytest.raises(RunDirectoryMismatch, match="tokenizer hf-0123456789abcdef-<s>-</s> in the checkpoint, byte-v1"):
        check_run_directory(cfg, plan)


def test_the_same_model_on_another_layout_or_a_fresh_start_passes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _saved_run(run_dir, [])
    for world, extra in ((2, []), (4, ["--parallel.tp", "2"]), (1, [])):
        cfg = load_config("debug", ["--job.run_dir", str(run_dir), *extra])
        check_run_directory(cfg, plan_job(cfg, world))  # resharding across layouts stays allowed
    fresh = load_config(
        "debug", ["--job.run_dir", str(run_dir), "--model.n_layers", "2", "--checkpoint.resume", "none"]
    )
    check_run_directory(fresh, plan_job(fresh, 1))
    empty = load_config("debug", ["--job.run_dir", str(tmp_path / "new"), "--model.n_layers", "2"])
    check_run_directory(empty, plan_job(empty, 1))
