"""A checkpoint written by tp2 × pp2 × dp2 resumes as tp2 × pp1 × dp4: the pipeline stages merge, dp doubles.

(Resumes with fewer ranks, dp shrinking with the node count, run under real launchers in
tests/test_launcher.py and tests/test_chaos.py.)

The constant learning rate makes a 4-step run and the first half of an 8-step run identical,
so steps 5-8 after the resharding resume must match the single-process reference's steps 5-8.
"""

from __future__ import annotations

import shutil

import pytest
from dist_harness import run_ranks

CASES = "tests/trainer_cases.py:train_layout"
CONSTANT_LR = ["--training.decay", "constant", "--checkpoint.interval", "4", "--checkpoint.mode", "sync"]
LAYOUT_222 = ["--parallel.tp", "2", "--parallel.pp", "2"]  # dp_shard fills the rest: 2 on 8 ranks


@pytest.mark.slow
def test_2x2x2_checkpoint_resumes_without_pipeline_on_dp4(tmp_path):
    ref = run_ranks(
        CASES,
        world_size=1,
        timeout=300,
        run_dir=str(tmp_path / "ref"),
        overrides=[*CONSTANT_LR, "--training.steps", "8", "--checkpoint.enabled", "false"],
    )[0]
    first = run_ranks(
        CASES,
        world_size=8,
        timeout=600,
        run_dir=str(tmp_path / "222"),
        overrides=[*CONSTANT_LR, *LAYOUT_222, "--training.steps", "4"],
    )
    assert first[0].losses == pytest.approx(ref.losses[:4], rel=1e-4)
    run_dir = tmp_path / "pp1_dp4"
    shutil.copytree(tmp_path / "222" / "checkpoints", run_dir / "checkpoints")
    resumed = run_ranks(
        CASES,
        world_size=8,
        timeout=600,
        run_dir=str(run_dir),
        overrides=[*CONSTANT_LR, "--parallel.tp", "2", "--training.steps", "8"],
    )
    assert len(resumed[0].losses) == 4, f"expected steps 5-8 only, got {resumed[0].losses}"
    assert resumed[0].losses == pytest.approx(ref.losses[4:], rel=1e-4)
    assert resumed[0].grad_norms == pytest.approx(ref.grad_norms[4:], rel=1e-4)
