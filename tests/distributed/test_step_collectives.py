"""Each training step runs exactly one job-wide collective of its own, whatever the layout.

Parallelism's own collectives (FSDP's gathers and reductions on the data-parallel sub-group, TP's
on the tensor-parallel one, DTensor's functional collectives) are not counted; a c10d call whose
group spans the whole job is. The step's loss, grad norm and every job-wide flag (healthd's stop,
preemption) travel in that one all-reduce.
"""

from __future__ import annotations

import pytest
from dist_harness import run_ranks

CASES = "tests/step_cases.py:job_wide_collectives_per_step"


@pytest.mark.parametrize("layout", [["--parallel.tp", "2"], ["--parallel.pp", "2"]], ids=["fsdp2xtp2", "fsdp2xpp2"])
def test_one_job_wide_collective_per_step(tmp_path, layout):
    results = run_ranks(CASES, world_size=4, timeout=300, run_dir=str(tmp_path), overrides=layout)
    for rank, per_step in enumerate(results):
        assert per_step == [["all_reduce"]] * 3, (rank, per_step)
