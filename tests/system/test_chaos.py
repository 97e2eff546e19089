"""Chaos suite: one real multi-process run per fault type, and one with several faults.

Each test injects its fault through ``runtime/faults`` (the mechanism the demo uses) into real
``stalwart launch`` nodes and asserts, through tests/chaos.py: detected and attributed to the right
rank or node; target step reached; no committed checkpoint lost or loaded corrupted; the losses
after recovery equal the fault-free run's (bit for bit where the layout is unchanged); and the
goodput report tells it as exactly one incident of the right kind and target (the chaos plan's), with
its consequences (blocked peers, killed workers, exclusions, restarts, reloads) folded in and its
detection latency, downtime and lost steps counted once.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from pathlib import Path

import pytest
from chaos import (
    DDP2,
    STEPS,
    TP2,
    Cluster,
    assert_recovered,
    consequences,
    costed,
    events,
    faults_detected,
    the_incident,
    training_incidents,
    trajectory,
)
from polling import free_port, wait_for

from stalwart.checkpoint.manager import CheckpointManager
from stalwart.goodput.accounting import compute_goodput
from stalwart.goodput.incidents import Incident
from stalwart.runtime.recovery import EXIT_WORLD_RESTART

pytestmark = pytest.mark.slow

_REFERENCES: dict[str, dict[int, float]] = {}


def reference(layout: list[str], tmp_path_factory) -> dict[int, float]:
    """The fault-free losses of the layout, from one clean run (cached per layout)."""
    key = " ".join(layout)
    if key not in _REFERENCES:
        cluster = Cluster(tmp_path_factory.mktemp("reference"), layout)
        try:
            cluster.start("node0")
            assert cluster.wait() == {"node0#0": 0}, cluster.logs()
        finally:
            cluster.kill_all()
        _REFERENCES[key] = trajectory(cluster.run_dir)
        assert max(_REFERENCES[key]) == STEPS
    return _REFERENCES[key]


def run_single_node(tmp_path, layout: list[str], plan: list[dict], **kwargs) -> Cluster:
    cluster = Cluster(tmp_path / "run", layout, plan, **kwargs)
    try:
        cluster.start("node0")
        assert cluster.wait() == {"node0#0": 0}, cluster.logs()
    finally:
        cluster.kill_all()
    return cluster


def recovered(inc: Incident) -> bool:
    """The ranks came back: re-formed in place with a replacement, or (the fallback) restarted."""
    return {"reform", "rank_replaced"} <= set(inc.actions) or "restart" in inc.actions


def test_killed_rank_at_a_random_step_resumes_bit_exactly(tmp_path, tmp_path_factory):
    step = random.Random().randint(3, STEPS - 2)
    print(f"SIGKILL rank 1 at step {step}")
    cluster = run_single_node(tmp_path, TP2, [{"kind": "kill_rank", "step": step, "rank": 1}])
    # The first exit the agent saw is the kill; a killed rank before the first commit has no state to
    # restore in place from, and the fallback's exit (EXIT_WORLD_RESTART on rank 0) follows it.
    found, *fallback = faults_detected(cluster.run_dir, "rank_exit")
    assert found["target"] == "rank1" and "SIGKILL" in found["detail"]
    assert all(f["target"] == "rank0" and f"exit code {EXIT_WORLD_RESTART}" in f["detail"] for f in fallback), fallback
    inc = the_incident(assert_recovered(cluster.run_dir, reference(TP2, tmp_path_factory)), "rank_died", "rank 1")
    assert inc.summary.startswith("rank 1 was killed by SIGKILL; found by the agent on node0")
    # The newest async save may still be writing when the rank dies: then the one before is the newest commit.
    newest = (step - 1) // 2 * 2
    assert inc.downtime > 0 and inc.restored_step in (newest, newest - 2) and inc.lost_steps >= 1
    assert recovered(inc) and ("reload" in inc.actions) == (inc.restored_step > 0)  # step 0: from scratch


def test_hung_rank_is_found_within_10_s_and_restarted(tmp_path, tmp_path_factory):
    cluster = run_single_node(tmp_path, TP2, [{"kind": "hang", "step": 6, "rank": 1}])
    hangs = faults_detected(cluster.run_dir, "hang")
    assert hangs and hangs[0]["target"] == "rank1", hangs
    latency = hangs[0]["ts"] - hangs[0]["last_progress_ts"]
    print(f"hang detection latency {latency:.2f} s after the last heartbeat")
    assert latency <= 10.0
    stacks = hangs[0]["detail"]["stacks"]
    assert stacks and all(Path(p).is_file() for p in stacks), "no stack dump written"
    inc = the_incident(assert_recovered(cluster.run_dir, reference(TP2, tmp_path_factory)), "hang", "rank 1")
    assert inc.detection_latency <= 10.0 and inc.downtime > 0
    assert "(process stopped (SIGSTOP or a debugger))" in inc.summary and inc.evidence["stacks"][0].endswith(
        "rank1.txt"
    )
    # Rank 0 is reported blocked when its own limit ran out too; the kill takes both either way.
    assert consequences(inc, "blocked") in ([], ["rank 0 blocked waiting on it (healthd on node0)"])
    # In-process recovery: healthd kills only the stopped rank; its peer re-forms with the replacement.
    assert consequences(inc, "kill")[:1] == ["healthd on node0 killed rank 1"]
    assert inc.actions[:1] == ["kill"] and recovered(inc)


def test_flipped_bit_is_found_attributed_and_rolled_back(tmp_path, tmp_path_factory):
    # Two replicas can't outvote each other: the golden workload and the replay decide, or both
    # are suspects; either way the job rolls back to the last verified step.
    cluster = run_single_node(tmp_path, DDP2, [{"kind": "flip_bit", "step": 5, "rank": 1, "bit": 30}])
    sdc = faults_detected(cluster.run_dir, "sdc")
    assert sdc, [e.get("fault") for e in faults_detected(cluster.run_dir)]
    assert any("rank1" in str(e.get("target")) for e in sdc), sdc
    rollbacks = [e for e in events(cluster.run_dir) if e["kind"] == "rollback"]
    assert rollbacks and rollbacks[0]["to_step"] < 5 <= rollbacks[0]["from_step"]
    report = assert_recovered(cluster.run_dir, reference(DDP2, tmp_path_factory))
    [(kind, target)] = [(i.kind, i.target) for i in training_incidents(report) if not i.planned]
    assert kind == "sdc" and target in ("rank 1", "suspects: ranks 0, 1"), target  # no majority of two: suspects
    inc = costed(training_incidents(report)[0])
    assert 1 in inc.ranks and "rollback" in inc.actions and inc.restored_step == rollbacks[0]["to_step"]


def test_corrupted_shard_is_detected_and_the_previous_step_loaded(tmp_path, tmp_path_factory):
    # Step 6 is committed, then one of its shards rots; a crash at step 7 makes the restart read it.
    plan = [{"kind": "ckpt_corrupt", "step": 7}, {"kind": "kill_rank", "step": 7, "rank": 1}]
    cluster = run_single_node(tmp_path, TP2, plan, extra=["--checkpoint.mode", "sync"])  # step 6 surely committed
    evs = events(cluster.run_dir)
    fails = [e for e in evs if e["kind"] == "ckpt_fail" and e.get("step") == 6]
    assert fails and "crc32" in fails[0]["reason"], [e for e in evs if e["kind"] == "ckpt_fail"]
    assert [e["step"] for e in evs if e["kind"] == "ckpt_load"][0] == 4
    report = assert_recovered(cluster.run_dir, reference(TP2, tmp_path_factory))
    # Two faults were injected: two incidents. The damage is its own, charged the steps its fallback cost.
    assert [(i.kind, i.target) for i in training_incidents(report)] == [
        ("rank_died", "rank 1"),
        ("storage_damage", "checkpoint step 6"),
    ]
    killed, damage = training_incidents(report)
    assert damage.restored_step == 4 and damage.lost_steps == 2 and "crc32" in damage.summary  # steps 5 and 6
    assert "fallback" in damage.actions and costed(killed).restored_step == 4


def test_preemption_commits_exits_0_and_the_requeued_job_continues(tmp_path, tmp_path_factory):
    cluster = Cluster(tmp_path / "run", TP2, [{"kind": "sigterm", "step": 5}])
    try:
        cluster.start("node0")
        assert cluster.wait() == {"node0#0": 0}, cluster.logs()
        steps = [e["step"] for e in events(cluster.run_dir) if e["kind"] == "ckpt_commit"]
        assert 5 in steps, steps
        assert max(trajectory(cluster.run_dir)) == 5
        cluster.start("node0")  # the scheduler requeues the job
        assert cluster.wait()["node0#1"] == 0, cluster.logs()
    finally:
        cluster.kill_all()
    assert {e["step"] for e in events(cluster.run_dir) if e["kind"] == "ckpt_load"} == {5}
    report = assert_recovered(cluster.run_dir, reference(TP2, tmp_path_factory))
    [inc] = training_incidents(report)  # planned, and no fault
    assert (inc.kind, inc.planned, inc.target, inc.lost_steps, inc.restored_step) == (
        "preemption",
        True,
        "the job",
        0,
        5,
    )
    assert any("committed step 5" in c for c in consequences(inc, "commit")), inc.consequences
    assert "requeue" in inc.actions and "reload" in inc.actions


def test_dead_gpu_excludes_its_node_and_the_job_finishes_on_the_rest(tmp_path, tmp_path_factory):
    cluster = Cluster(tmp_path / "run", TP2, [{"kind": "gpu_fault", "step": 4, "node": "node1"}], nnodes="1:2")
    try:
        cluster.start("node0")
        cluster.start("node1")
        codes = cluster.wait()
    finally:
        cluster.kill_all()
    assert codes == {"node0#0": 0, "node1#1": 93}, (codes, cluster.logs())
    gpu = faults_detected(cluster.run_dir, "gpu")
    assert gpu and "node1" in str(gpu[0]["target"]), gpu
    excluded = [e for e in events(cluster.run_dir) if e["kind"] == "node_excluded"]
    assert excluded and "node1" in json.dumps(excluded[0])
    assert "node1" in json.loads((cluster.run_dir / "excluded_nodes.json").read_text())
    worlds = [
        e["world_size"]
        for e in events(cluster.run_dir)
        if e["kind"] == "worker_start" and e.get("role") == "agent" and e.get("node_id") == "node0"
    ]
    assert 4 in worlds and worlds[-1] == 2, worlds  # node0 trained with node1, then re-formed alone: dp halved
    detect = gpu[0]["ts"] - next(
        e["ts"] for e in events(cluster.run_dir) if e["kind"] == "fault_injected" and e["fault"] == "gpu_fault"
    )
    print(f"dead GPU detected {detect:.2f} s after injection")
    assert detect <= 5.0
    report = assert_recovered(cluster.run_dir, reference(TP2, tmp_path_factory), exact=False)
    inc = the_incident(report, "gpu_fault", "node1 gpu0")
    assert inc.summary.startswith("GPU node1 gpu0 failed (xid 79); found by healthd on node1")
    assert "node1 left the job, excluded (exit 93)" in consequences(inc, "exclusion")
    assert consequences(inc, "kill") == ["healthd on node1 killed ranks 2, 3"]
    assert "the ranks restarted (world 4 → 2)" in consequences(inc, "restart")


def test_lost_node_the_rest_reform_and_a_new_node_grows_the_job_back(tmp_path, tmp_path_factory):
    # node1 is lost at step 4; node0 re-forms alone (world 2), and is slowed from step 6 so that the
    # replacement, started only once node0 trains alone, has time to join (world 4 again).
    plan = [
        {"kind": "kill_agent", "step": 4, "node": "node1"},
        {"kind": "slow", "step": 6, "rank": 0, "seconds": 1.5, "steps": 4},
    ]
    cluster = Cluster(tmp_path / "run", TP2, plan, nnodes="1:2")

    def node0_worlds() -> list[int]:
        return [
            e["world_size"]
            for e in events(cluster.run_dir)
            if e["kind"] == "worker_start" and e.get("role") == "agent" and e.get("node_id") == "node0"
        ]

    try:
        cluster.start("node0")
        cluster.start("node1")
        wait_for(lambda: cluster.nodes["node1#1"].poll() is not None, 300, "node1 to be lost")
        wait_for(lambda: node0_worlds()[-1:] == [2], 120, "node0 to re-form alone")
        cluster.start("node2")  # the replacement node joins at the next rendezvous
        codes = cluster.wait()
    finally:
        cluster.kill_all()
    assert codes["node0#0"] == 0 and codes["node1#1"] == -9 and codes["node2#2"] == 0, (codes, cluster.logs())
    worlds = node0_worlds()  # node0 may have begun alone (2) before node1 joined
    shrunk = next((k for k in range(1, len(worlds)) if worlds[k] == 2 and 4 in worlds[:k]), None)
    assert shrunk is not None and 4 in worlds[shrunk:], worlds  # 4 -> 2 -> 4
    assert faults_detected(cluster.run_dir), "the lost node was not detected"
    report = assert_recovered(cluster.run_dir, reference(TP2, tmp_path_factory), exact=False)
    inc = the_incident(report, "node_lost", "node node1")  # not a rank of node0, which only failed after it
    assert "the ranks restarted (world 4 → 2)" in consequences(inc, "restart")
    assert consequences(inc, "replacement") == ["node2 joined, replacing node1"]  # the growth back: no resize
    assert [i for i in training_incidents(report) if i.planned] == []


def test_slow_rank_is_flagged_as_a_straggler_on_the_controller(tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    (run_dir / "health").mkdir(parents=True)
    token = run_dir / "health" / "token"
    token.write_text("chaos-token\n")
    token.chmod(0o600)
    grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    controller = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stalwart",
            "controller",
            "--run-dir",
            str(run_dir),
            "--grpc-bind",
            grpc_addr,
            "--http-bind",
            http_addr,
            "--token-file",
            str(token),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    import os

    os.environ["STALWART_TOKEN_FILE"] = str(token)
    cluster = Cluster(
        run_dir, TP2, [{"kind": "slow", "step": 2, "rank": 1, "seconds": 1.0, "steps": 8}], controller=grpc_addr
    )
    flagged = []
    try:
        cluster.start("node0")
        while cluster.nodes["node0#0"].poll() is None and not flagged:
            try:
                state = json.loads(urllib.request.urlopen(f"http://{http_addr}/api/state", timeout=2).read())
                flagged = [r for n in state["nodes"] for r in n["ranks"] if r["straggler"]]
            except OSError:
                pass
            time.sleep(0.5)
        cluster.wait()
    finally:
        os.environ.pop("STALWART_TOKEN_FILE", None)
        cluster.kill_all()
        controller.terminate()
        controller.wait(10)
    assert [r["rank"] for r in flagged] == [1], flagged
    stragglers = [i for i in compute_goodput(events(run_dir)).incidents if i.kind == "straggler"]
    assert [(i.target, i.detector) for i in stragglers] == [("rank 1", "controller")], stragglers


def test_several_faults_in_one_run_a_write_killed_half_way_then_a_hang(tmp_path, tmp_path_factory):
    plan = [{"kind": "ckpt_kill_during_write", "step": 4, "rank": 0}, {"kind": "hang", "step": 7, "rank": 1}]
    cluster = run_single_node(tmp_path, TP2, plan)
    loads = [e["step"] for e in events(cluster.run_dir) if e["kind"] == "ckpt_load"]
    assert loads and loads[0] == 2  # rank 0, the committer, died mid-write: step 4 never became visible
    report = assert_recovered(cluster.run_dir, reference(TP2, tmp_path_factory))
    # healthd kills the hung group and the agent then sees exits too: those are the hang's, not a third incident.
    assert [(i.kind, i.target) for i in training_incidents(report)] == [("rank_died", "rank 0"), ("hang", "rank 1")]
    killed, hang = (costed(i) for i in training_incidents(report))
    assert killed.restored_step == 2 and recovered(hang)


def test_s3_outage_training_goes_on_and_nothing_committed_is_lost(tmp_path, tmp_path_factory):
    from s3_server import LocalS3

    s3 = LocalS3()
    s3.start()
    s3.make_bucket("chaos")
    url = "s3://chaos/run"
    cluster = Cluster(
        tmp_path / "run",
        TP2,
        extra=["--checkpoint.url", url, "--checkpoint.s3_endpoint", s3.endpoint, "--checkpoint.s3_max_attempts", "2"],
    )
    try:
        cluster.start("node0")
        while max(trajectory(cluster.run_dir), default=0) < 3:
            assert cluster.nodes["node0#0"].poll() is None, cluster.logs()
            time.sleep(0.2)
        s3.stop()  # the store goes away mid-run: the next saves meet the outage
        down_at = max(trajectory(cluster.run_dir))
        before = [e["step"] for e in events(cluster.run_dir) if e["kind"] == "ckpt_commit"]
        # Held down until a save has failed (after botocore's 2 attempts) and training went on.
        deadline = time.monotonic() + 120
        while not (
            [e for e in events(cluster.run_dir) if e["kind"] == "ckpt_fail"]
            and max(trajectory(cluster.run_dir)) >= down_at + 2
        ):
            assert cluster.nodes["node0#0"].poll() is None, cluster.logs()
            assert time.monotonic() < deadline, f"no failed save reported within 120 s of the outage:\n{cluster.logs()}"
            time.sleep(0.2)
        assert max(trajectory(cluster.run_dir)) < STEPS, (
            "the job finished during the outage (its last save is synchronous)"
        )
        s3.start()
        assert cluster.wait() == {"node0#0": 0}, cluster.logs()
        fails = [e for e in events(cluster.run_dir) if e["kind"] == "ckpt_fail"]
        assert fails, "the outage was not reported"
        after = CheckpointManager(url, s3.storage_options()).committed_steps()
        assert set(before) <= set(after), (before, after)
        report = assert_recovered(
            cluster.run_dir, reference(TP2, tmp_path_factory), checkpoint_url=url, options=s3.storage_options()
        )
        # Every save that failed during the outage is one incident, with no downtime: training went on.
        [inc] = training_incidents(report)
        assert (inc.kind, inc.target, inc.downtime) == ("save_failed", "checkpoint saves to s3", 0.0)
        assert sorted(inc.evidence["steps"]) == sorted({e["step"] for e in fails})
    finally:
        cluster.kill_all()
        s3.stop()
