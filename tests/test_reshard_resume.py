"""A checkpoint written by a 2×2×2 layout resumes on 4 ranks (dp halved) and on 16 ranks.

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
def test_2x2x2_checkpoint_resumes_on_4_and_16_ranks(tmp_path):
    ref = run_ranks(CASES, world_size=1, timeout=300, run_dir=str(tmp_path / "ref"),
                    overrides=[*CONSTANT_LR, "--training.steps", "8", "--checkpoint.enabled", "false"])[0]
    first = run_ranks(CASES, world_size=8, timeout=600, run_dir=str(tmp_path / "222"),
                      overrides=[*CONSTANT_LR, *LAYOUT_222, "--training.steps", "4"])
    assert first[0].losses == pytest.approx(ref.losses[:4], rel=1e-4)
    for world, name in ((4, "dp1"), (16, "dp4")):
        run_dir = tmp_path / name
        shutil.copytree(tmp_path / "222" / "checkpoints", run_dir / "checkpoints")
        resumed = run_ranks(CASES, world_size=world, timeout=600, run_dir=str(run_dir),
                            overrides=[*CONSTANT_LR, *LAYOUT_222, "--training.steps", "8"])
        assert len(resumed[0].losses) == 4, f"{name}: expected steps 5-8 only, got {resumed[0].losses}"
        assert resumed[0].losses == pytest.approx(ref.losses[4:], rel=1e-4), name
        assert resumed[0].grad_norms == pytest.approx(ref.grad_norms[4:], rel=1e-4), name
