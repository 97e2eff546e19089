"""Every parallel layout, run through the real Trainer, matches the single-process Trainer.

The losses of 5 steps, their gradient norms and the final parameters must agree within 1e-4
relative (fp32, gloo). Pipeline ranks each return their stages' parameters; the union over ranks
must be the whole model.
"""

from __future__ import annotations

import pytest
from dist_harness import run_ranks
from parity import RunResult, assert_close_runs

CASES = "tests/trainer_cases.py:train_layout"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> RunResult:
    return run_ranks(CASES, world_size=1, timeout=300, run_dir=str(tmp_path_factory.mktemp("ref")), overrides=[])[0]


def merged(results: list[RunResult]) -> RunResult:
    params: dict = {}
    for r in results:
        params.update(r.params)
    return RunResult(results[0].losses, results[0].grad_norms, params)


# name: (world size, overrides, compare parameters per tensor rather than per element). Two-way
# combinations with FSDP and CP×TP are checked at module level (test_tensor_parallel.py,
# test_pipeline.py, test_context_parallel.py); here the trainer runs them all at once in 4D.
LAYOUTS = {
    "ddp2": (2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"], False),
    "fsdp2": (2, [], False),
    "ddp2_tp2": (4, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1", "--parallel.tp", "2"], True),
    "ddp2_pp2": (4, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1", "--parallel.pp", "2"], True),
    "hsdp2x2": (4, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2"], False),
    "tp2": (2, ["--parallel.tp", "2"], True),
    "pp2_1f1b": (2, ["--parallel.pp", "2", "--parallel.pp_schedule", "1F1B", "--parallel.pp_microbatches", "4"], True),
    "pp2_gpipe": (2, ["--parallel.pp", "2", "--parallel.pp_schedule", "GPipe"], True),
    "pp2_interleaved": (
        2,
        ["--parallel.pp", "2", "--parallel.pp_schedule", "Interleaved1F1B", "--parallel.pp_microbatches", "4"],
        True,
    ),
    "pp2_zero_bubble": (
        2,
        ["--parallel.pp", "2", "--parallel.pp_schedule", "ZBVZeroBubble", "--parallel.pp_microbatches", "4"],
        True,
    ),
    "pp2_tp2": (4, ["--parallel.pp", "2", "--parallel.tp", "2"], True),
    "cp2": (2, ["--parallel.cp", "2"], True),
    "pp2_cp2": (4, ["--parallel.pp", "2", "--parallel.cp", "2"], True),
    "4d_pp2_dp2_cp2_tp2": (16, ["--parallel.pp", "2", "--parallel.cp", "2", "--parallel.tp", "2"], True),
    # Activation checkpointing and per-block compile change memory and speed, never the numbers.
    "ac_full": (1, ["--training.activation_checkpoint", "full"], False),
    "ac_selective_op_fsdp2": (2, ["--training.activation_checkpoint", "selective-op"], False),
    "ac_selective_layer_tp2": (2, ["--parallel.tp", "2", "--training.activation_checkpoint", "selective-layer"], True),
    "ac_full_pp2": (2, ["--parallel.pp", "2", "--training.activation_checkpoint", "full"], True),
    # aot_eager captures each block whole (fullgraph) like inductor, without a C++ build per test.
    "compile_fsdp2": (2, ["--training.compile", "true", "--training.compile_backend", "aot_eager"], False),
    "compile_inductor_ac_selective_op": (
        1,
        ["--training.compile", "true", "--training.activation_checkpoint", "selective-op"],
        True,
    ),  # inductor fuses and reorders float ops: parameters agree per tensor, not every element
}


SLOW = {"4d_pp2_dp2_cp2_tp2", "compile_inductor_ac_selective_op"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in LAYOUTS])
def test_layout_matches_single_process(name, reference, tmp_path):
    world, overrides, normwise = LAYOUTS[name]
    results = run_ranks(CASES, world_size=world, timeout=600, run_dir=str(tmp_path), overrides=overrides)
    for r in results:  # every rank reports the same job-wide loss
        assert r.losses == results[0].losses
    assert_close_runs(merged(results), reference, params_normwise=normwise)
