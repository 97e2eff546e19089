"""In-process recovery under real launchers: survivors keep their processes, only the lost rank is replaced.

Each test runs real ``stalwart launch`` nodes (gloo, CPU) with a fault plan, and holds the run to
the promise: every surviving rank keeps its PID through the recovery (no whole-world restart), one
new process per lost rank, the job reaches its target step, and every step's final loss equals the
fault-free run's bit for bit. Process identity comes from the event log: every trainer event
carries its process id.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import pytest
from chaos import STEPS, TP2, Cluster, events, trajectory

pytestmark = pytest.mark.slow

# The demo's layout: two nodes of four ranks, tp2 x pp2 on each node, the two nodes replicas.
DEMO = ["--parallel.tp", "2", "--parallel.pp", "2", "--parallel.dp_replicate", "-1", "--parallel.dp_shard", "1"]
# One node of four ranks: tp2 x 2 replicas (every rank has a peer holding the same shard).
TP2_DP2 = ["--parallel.tp", "2", "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]
# One node of two ranks, FSDP: no rank holds another's shard.
FSDP2 = ["--parallel.dp_shard", "2"]

_REFERENCES: dict[str, dict[int, float]] = {}


def reference(tmp_path_factory: Any, layout: list[str], nnodes: int = 1, nproc: int = 2) -> dict[int, float]:
    """The fault-free losses of a layout (one clean run, cached per layout)."""
    key = f"{' '.join(layout)} {nnodes}x{nproc}"
    if key not in _REFERENCES:
        cluster = Cluster(tmp_path_factory.mktemp("reference"), layout, nnodes=str(nnodes), nproc=nproc)
        try:
            for node in range(nnodes):
                cluster.start(f"node{node}")
            codes = cluster.wait(600)
        finally:
            cluster.kill_all()
        assert set(codes.values()) == {0}, (codes, cluster.logs())
        _REFERENCES[key] = trajectory(cluster.run_dir)
        assert max(_REFERENCES[key]) == STEPS
    return _REFERENCES[key]


def run(tmp_path: Any, layout: list[str], plan: list[dict], nnodes: int = 1, nproc: int = 2) -> Cluster:
    cluster = Cluster(tmp_path / "run", layout, plan, nnodes=str(nnodes), nproc=nproc)
    try:
        for node in range(nnodes):
            cluster.start(f"node{node}")
        codes = cluster.wait(600)
    finally:
        cluster.kill_all()
    assert set(codes.values()) == {0}, (codes, cluster.logs())
    return cluster


def trainer_pids(evs: list[dict]) -> dict[int, list[int]]:
    """Every process that trained as each global rank, in the order they appeared."""
    pids: dict[int, list[int]] = defaultdict(list)
    for e in evs:
        if e.get("role") == "trainer" and e.get("rank") is not None and e["pid"] not in pids[e["rank"]]:
            pids[e["rank"]].append(e["pid"])
    return pids


def assert_replaced_in_place(evs: list[dict], world: int, lost: set[int]) -> None:
    """Survivors kept their one process; each lost rank had exactly one successor; no world restart."""
    pids = trainer_pids(evs)
    assert sorted(pids) == list(range(world)), pids
    for rank, seen in pids.items():
        assert len(seen) == (2 if rank in lost else 1), (rank, seen)
    starts = [e for e in evs if e["kind"] == "worker_start" and e.get("role") == "agent"]
    assert len(starts) == len({e["node_id"] for e in starts}), "a worker group was restarted"
    replaced = [e["replaced_rank"] for e in evs if e["kind"] == "rank_replaced"]
    assert sorted(replaced) == sorted(lost), replaced


def assert_losses_equal(got: dict[int, float], expected: dict[int, float]) -> None:
    assert max(got) == STEPS and sorted(got) == sorted(expected), (got, expected)
    for step, loss in expected.items():
        assert got[step] == loss, f"step {step}: loss {got[step]!r} after the recovery, {loss!r} fault-free"


def kill_to_next_step(evs: list[dict]) -> float:
    """Seconds from the injected fault to the first step that ends after the recovery."""
    fault = next(e for e in evs if e["kind"] == "fault_injected")
    end = next(e for e in evs if e["kind"] == "reform_end" and not e.get("newcomer"))
    after = next(e for e in evs if e["kind"] == "step_end" and e.get("rank") == 0 and e["ts"] > end["ts"])
    return after["ts"] - fault["ts"]


def test_a_killed_rank_of_the_demo_job_is_replaced_and_the_others_keep_their_processes(tmp_path, tmp_path_factory):
    step, victim = random.Random().randint(3, STEPS - 2), random.Random().randrange(8)
    print(f"SIGKILL rank {victim} at step {step}")
    expected = reference(tmp_path_factory, DEMO, nnodes=2, nproc=4)
    cluster = run(tmp_path, DEMO, [{"kind": "kill_rank", "step": step, "rank": victim}], nnodes=2, nproc=4)
    evs = events(cluster.run_dir)
    assert_replaced_in_place(evs, 8, {victim})
    ends = [e for e in evs if e["kind"] == "reform_end"]
    assert len(ends) == 8 and {e["source"] for e in ends} == {"peer"}, ends  # the replica's copy, no storage
    assert_losses_equal(trajectory(cluster.run_dir), expected)
    print(f"kill -> next step: {kill_to_next_step(evs):.2f} s")


def test_a_stopped_rank_is_declared_hung_the_others_are_released_and_it_is_replaced(tmp_path, tmp_path_factory):
    expected = reference(tmp_path_factory, TP2_DP2, nproc=4)
    cluster = run(tmp_path, TP2_DP2, [{"kind": "hang", "step": 6, "rank": 2}], nproc=4)
    evs = events(cluster.run_dir)
    (hang,) = [e for e in evs if e["kind"] == "fault_detected" and e.get("fault") == "hang"]  # peers: hang_blocked
    assert hang["target"] == "rank2" and len(hang["detail"]["killed_pids"]) == 1, hang  # only the stopped rank
    begins = [e for e in evs if e["kind"] == "reform_begin"]
    assert sorted(e["rank"] for e in begins) == [0, 1, 3]
    released = max(e["ts"] for e in begins) - hang["ts"]
    print(f"survivors released {released:.2f} s after healthd declared the hang")
    assert released <= 2.0
    assert_replaced_in_place(evs, 4, {2})
    assert_losses_equal(trajectory(cluster.run_dir), expected)


def test_without_a_peer_copy_the_replacement_is_restored_from_storage_and_says_so(tmp_path, tmp_path_factory):
    expected = reference(tmp_path_factory, FSDP2)
    cluster = run(tmp_path, FSDP2, [{"kind": "kill_rank", "step": 6, "rank": 1}])
    evs = events(cluster.run_dir)
    assert_replaced_in_place(evs, 2, {1})
    ends = [e for e in evs if e["kind"] == "reform_end"]
    assert {e["source"] for e in ends} == {"local"}, ends  # the checkpoint on local disk, not a peer
    loads = [e for e in evs if e["kind"] == "ckpt_load" and e["ts"] > min(x["ts"] for x in ends) - 30]
    assert {e["rank"] for e in loads} == {0, 1}, loads  # every rank went back to the same committed step
    assert_losses_equal(trajectory(cluster.run_dir), expected)


def test_a_second_rank_lost_during_the_recovery_still_ends_in_a_correct_state(tmp_path, tmp_path_factory):
    expected = reference(tmp_path_factory, TP2_DP2, nproc=4)
    plan = [{"kind": "kill_rank", "step": 5, "rank": 1}, {"kind": "kill_during_reform", "step": 1, "rank": 2}]
    cluster = run(tmp_path, TP2_DP2, plan, nproc=4)
    evs = events(cluster.run_dir)
    fired = sorted(e["fault"] for e in evs if e["kind"] == "fault_injected")
    assert fired == ["kill_during_reform", "kill_rank"], fired
    # Re-formed again with both replacements, or (the fallback) restarted the world: either way the
    # job ends at its target with the fault-free losses.
    assert_losses_equal(trajectory(cluster.run_dir), expected)
    if not any(e["kind"] == "reform_failed" for e in evs):
        assert_replaced_in_place(evs, 4, {1, 2})


def test_with_in_process_recovery_off_the_world_restarts_as_before(tmp_path, tmp_path_factory):
    expected = reference(tmp_path_factory, TP2)
    cluster = run(tmp_path, [*TP2, "--recovery.in_process", "false"], [{"kind": "kill_rank", "step": 5, "rank": 1}])
    evs = events(cluster.run_dir)
    assert not [e for e in evs if e["kind"] in ("reform_begin", "rank_replaced")]
    assert len(trainer_pids(evs)[0]) == 2  # rank 0 restarted with the group
    assert_losses_equal(trajectory(cluster.run_dir), expected)
