"""The fault plan and injector: parsed strictly, refused unless enabled, each fault fired once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from stalwart.checkpoint.manager import CheckpointManager
from stalwart.events import EventLog, read_events
from stalwart.runtime.faults import FaultInjectionDisabled, FaultKind, FaultPlan
from stalwart.runtime.faults.injector import FaultInjector, corrupt_one_shard

ENABLED = {"STALWART_FAULT_INJECTION": "1"}

TOML_PLAN = """
[[fault]]
kind = "flip_bit"
step = 3
rank = 1
bit = 30

[[fault]]
kind = "gpu_fault"
step = 5
node = "node1"
"""


def test_toml_and_json_plans_parse_to_the_same_faults():
    toml = FaultPlan.parse(TOML_PLAN)
    assert [f.kind for f in toml.faults] == [FaultKind.FLIP_BIT, FaultKind.GPU_FAULT]
    assert FaultPlan.parse(toml.to_json()) == toml


@pytest.mark.parametrize(
    "plan, message",
    [
        ('[{"kind": "explode", "step": 1}]', "kind must be one of"),
        ('[{"kind": "kill_rank", "step": 0, "rank": 0}]', "needs step >= 1"),
        ('[{"kind": "kill_rank", "step": 2, "rnak": 0}]', "unknown keys"),
        ("[[fault", "not valid TOML or JSON"),
    ],
)
def test_bad_plans_say_what_is_wrong(plan, message):
    with pytest.raises(ValueError, match=message):
        FaultPlan.parse(plan)


def test_a_plan_is_refused_unless_injection_is_enabled(tmp_path):
    plan = '[{"kind": "kill_rank", "step": 2, "rank": 0}]'
    with pytest.raises(FaultInjectionDisabled, match="STALWART_FAULT_INJECTION=1"):
        FaultPlan.from_env({"STALWART_FAULT_PLAN": plan})
    assert FaultPlan.from_env({"STALWART_FAULT_PLAN": plan, **ENABLED}).faults[0].rank == 0
    assert not FaultPlan.from_env({})
    with pytest.raises(FileNotFoundError, match="no such fault plan file"):
        FaultPlan.from_env({"STALWART_FAULT_PLAN": str(tmp_path / "missing.toml"), **ENABLED})


def injector(tmp_path, plan: str, rank: int = 0, local_rank: int = 0, node: str = "node0") -> FaultInjector:
    return FaultInjector(FaultPlan.parse(plan), tmp_path, rank, local_rank, node, EventLog(tmp_path, "trainer", rank))


def test_a_fault_fires_once_per_job_even_when_the_step_is_replayed(tmp_path):
    plan = '[{"kind": "flip_bit", "step": 2, "rank": 1, "bit": 30}]'
    param = torch.nn.Parameter(torch.ones(8, 8))
    other_rank = injector(tmp_path, plan, rank=0)
    other_rank.before_step(2, lambda: [param])
    assert torch.equal(param, torch.ones(8, 8)), "rank 0 must not act on a rank-1 fault"
    first = injector(tmp_path, plan, rank=1)
    first.before_step(1, lambda: [param])
    assert torch.equal(param, torch.ones(8, 8)), "not due before its step"
    first.before_step(2, lambda: [param])
    changed = (param != 1).nonzero()
    assert len(changed) == 1 and param[tuple(changed[0])].item() != 1.0
    restarted = injector(tmp_path, plan, rank=1)  # the group restarted and replays step 2
    snapshot = param.detach().clone()
    restarted.before_step(2, lambda: [param])
    assert torch.equal(param, snapshot)
    first.events.close()
    injected = [e for e in read_events(tmp_path) if e["kind"] == "fault_injected"]
    assert [(e["fault"], e["target"], e["step"]) for e in injected] == [("flip_bit", "rank1", 2)]


def test_node_faults_are_carried_out_by_the_nodes_first_local_rank(tmp_path):
    plan = '[{"kind": "gpu_fault", "step": 1, "node": "node1"}]'
    injector(tmp_path, plan, rank=2, local_rank=1, node="node1").before_step(1, list)
    injector(tmp_path, plan, rank=0, local_rank=0, node="node0").before_step(1, list)
    assert not (tmp_path / "faults" / "gpu-node1.json").exists()
    injector(tmp_path, plan, rank=3, local_rank=0, node="node1").before_step(1, list)
    assert json.loads((tmp_path / "faults" / "gpu-node1.json").read_text())["code"] == 79


def test_a_corrupted_shard_is_caught_and_the_previous_step_loaded(tmp_path):
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    for step in (1, 2):
        manager.save(step, {"w": torch.full((256, 256), float(step))})
    newest = tmp_path / "ckpt" / manager.step_dir(2)
    inj = injector(tmp_path, '[{"kind": "ckpt_corrupt", "step": 2}]')
    inj.before_step(2, list, lambda: newest)
    state = {"w": torch.zeros(256, 256)}
    assert manager.load(state) == 1
    assert torch.equal(state["w"], torch.full((256, 256), 1.0))
    manager.close()


def test_corrupt_needs_a_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .distcp shard"):
        corrupt_one_shard(tmp_path, seed=0)


def test_kill_rank_kills_the_process_after_recording_it(tmp_path):
    code = f"""
import torch
from stalwart.events import EventLog
from stalwart.runtime.faults import FaultPlan
from stalwart.runtime.faults.injector import FaultInjector
plan = FaultPlan.parse('[{{"kind": "kill_rank", "step": 4, "rank": 0}}]')
inj = FaultInjector(plan, {str(tmp_path)!r}, 0, 0, "node0", EventLog({str(tmp_path)!r}, "trainer", 0))
for step in range(1, 10):
    inj.before_step(step, list)
    print(step, flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.split() == ["1", "2", "3"]
    assert [e["fault"] for e in read_events(tmp_path) if e["kind"] == "fault_injected"] == ["kill_rank"]


def test_soak_plans_are_seeded_valid_and_spread_over_the_run():
    from stalwart.cli.demo import soak_plan

    plan = soak_plan(30, 200, world=8, seed=3)
    assert plan == soak_plan(30, 200, world=8, seed=3) and plan != soak_plan(30, 200, world=8, seed=4)
    parsed = FaultPlan.parse(json.dumps(plan))
    steps = [f.step for f in parsed.faults]
    assert len(steps) == 30 == len(set(steps)) and 3 <= min(steps) and max(steps) <= 198
    assert all(f.rank is None or 0 <= f.rank < 8 for f in parsed.faults)
    assert {f.kind for f in parsed.faults} >= {FaultKind.KILL_RANK, FaultKind.HANG}
