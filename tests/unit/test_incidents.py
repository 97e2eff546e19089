"""One fault, one incident: each fault kind of the chaos plan, as real runs log it, read back as one
root cause with the right target, its consequences folded in and its costs counted once."""

import random

import pytest
from incident_logs import T0, JobLog

from stalwart.goodput import compute_goodput

NODE0, NODE1 = [0, 1, 2, 3], [4, 5, 6, 7]


def incidents(log: JobLog, shuffle: bool = True):
    events = list(log.events)
    if shuffle:  # the order of lines across files is no evidence
        random.Random(7).shuffle(events)
    return compute_goodput(events).incidents


def actions_of(inc) -> list[str]:
    return [c.action for c in inc.consequences]


def two_nodes(log: JobLog, steps: int = 4) -> dict[int, int]:
    log.rendezvous(0.0, ["node0", "node1"], joined=["node0", "node1"])
    return log.incarnation(1.0, ["node0", "node1"], steps)


def test_killed_rank_with_peers_blocked_on_another_node_is_one_incident():
    # As in the demo: rank 5 is SIGKILLed; node1's agent reports it (its node mates failed with it);
    # node0's ranks block in the collective until node0's healthd, finding no stopped process, kills them.
    log = JobLog()
    pids = two_nodes(log)
    log.begin_step(pids)
    t = log.t
    log.rank_exit(t + 1.0, 1, "node1", {4: 1, 5: -9, 6: 1, 7: 1}, pids, blamed=5)
    log.healthd_kill(t + 9.0, "node0", NODE0, pids, "hang: rank1, rank2")
    for r in (1, 2):
        log.hang(t + 9.0, "node0", r, False, NODE0, pids, last=t)
    log.rendezvous(t + 10.0, ["node0", "node1"])
    log.incarnation(t + 11.0, ["node0", "node1"], 3, load=0)
    [inc] = incidents(log)
    assert (inc.kind, inc.target, inc.ranks, inc.suspects, inc.planned) == ("rank_died", "rank 5", [5], False, False)
    assert inc.detector == "the agent on node1" and inc.detection_latency == pytest.approx(1.0)
    assert inc.summary.startswith("rank 5 was killed by SIGKILL; found by the agent on node1 after 1.0 s")
    texts = [c.text for c in inc.consequences]
    assert "ranks 4, 6, 7 on node1 failed (exit code 1)" in texts
    assert "healthd on node0 killed ranks 0-3" in texts
    assert {
        "rank 1 blocked waiting on it (healthd on node0)",
        "rank 2 blocked waiting on it (healthd on node0)",
    } <= set(texts)
    assert inc.actions == ["kill", "restart", "reload"] and inc.restored_step == 0
    assert inc.downtime == pytest.approx(log.t - 3.0 - (t + 1.0))  # detection → the first step after the reload


def test_stopped_rank_is_the_hang_its_peers_blocked_and_the_killed_workers_consequences():
    # node1's healthd sees its ranks stall first (no culprit there) and kills them: its agent reports
    # SIGKILLs; node0's healthd then finds rank 2 stopped, rank 1 blocked, and kills node0's ranks.
    log = JobLog()
    pids = two_nodes(log)
    log.begin_step(pids)
    t = log.t
    log.healthd_kill(t + 8.0, "node1", NODE1, pids, "hang: rank5")
    log.hang(t + 8.0, "node1", 5, False, NODE1, pids, last=t)
    log.rank_exit(t + 8.4, 1, "node1", {r: -9 for r in NODE1}, pids, blamed=4)
    log.healthd_kill(t + 10.0, "node0", NODE0, pids, "hang: rank1")
    log.hang(t + 10.0, "node0", 1, True, NODE0, pids, last=t, fault="hang_blocked")
    log.hang(t + 10.0, "node0", 2, True, NODE0, pids, last=t - 0.5)
    log.rendezvous(t + 12.0, ["node0", "node1"])
    log.incarnation(t + 13.0, ["node0", "node1"], 3, load=0)
    [inc] = incidents(log)
    assert (inc.kind, inc.target, inc.suspects) == ("hang", "rank 2", False)
    assert inc.detector == "healthd on node0" and inc.detection_latency == pytest.approx(10.5)
    assert "rank 2 stopped making progress in STEP (process stopped (SIGSTOP or a debugger))" in inc.summary
    assert "stacks: stacks-16-rank2.txt (+7 more)" in inc.summary  # the culprit's dump first, then every node's
    assert inc.evidence["stacks"][0].endswith("rank2.txt") and len(inc.evidence["stacks"]) == 8
    texts = [c.text for c in inc.consequences]
    assert "ranks 4-7 on node1 exited, killed by healthd" in texts
    assert {
        "rank 5 blocked waiting on it (healthd on node1)",
        "rank 1 blocked waiting on it (healthd on node0)",
    } <= set(texts)
    assert actions_of(inc).count("kill") == 2


def test_dead_gpu_its_exclusion_the_peers_failures_and_the_replacement_are_one_incident():
    log = JobLog()
    pids = two_nodes(log, steps=5)
    log.begin_step(pids)
    t = log.t
    log.healthd_kill(t + 0.5, "node1", NODE1, pids, "gpu fault: gpu0: xid 79")
    log.healthd(
        t + 0.5,
        "fault_detected",
        "node1",
        fault="gpu",
        target="node1/gpu0",
        detector="healthd",
        last_progress_ts=T0 + t,
        detail={"kind": "xid", "code": 79, "detail": "injected", "killed_pids": [pids[r] for r in NODE1]},
    )
    log.controller(t + 0.6, "node_excluded", node="node1", reason="unhealthy: gpu0: xid 79")
    log.agent(t + 0.9, "node_excluded", 1, "node1", node_id="node1", reason="healthd: gpu0: xid 79")
    reason = "writing shards to /run/checkpoints/step-00000005.tmp-1 failed: RuntimeError: Connection reset by peer"
    log.ev(t + 1.0, "ckpt_fail", "trainer", pids[0], 0, step=5, tier="local", reason=reason)  # the save in flight
    log.rank_exit(t + 4.0, 0, "node0", {0: -15, 1: -15, 2: -15, 3: 1}, pids, blamed=3)
    log.rendezvous(t + 6.0, ["node0"])  # the survivors re-form alone...
    alone = log.incarnation(t + 7.0, ["node0"], 3, load=5)
    t2 = log.t
    for r, pid in alone.items():  # node0's agent stops its ranks (they commit on SIGTERM) to let node2 in
        log.ev(t2 + 0.5, "worker_stop", "trainer", pid, r, reason="preempted", signalled_ts=T0 + t2 + 0.1)
    log.rendezvous(t2 + 1.0, ["node0", "node2"], joined=["node2"])  # ...and the replacement grows the job back
    log.incarnation(t2 + 2.0, ["node0", "node2"], 3, load=8)
    [inc] = incidents(log)
    assert (inc.kind, inc.target, inc.nodes, inc.devices) == ("gpu_fault", "node1 gpu0", ["node1"], ["gpu0"])
    assert inc.summary.startswith("GPU node1 gpu0 failed (xid 79); found by healthd on node1 after 0.5 s")
    assert inc.actions == ["kill", "exclusion", "save_failed", "restart", "reload", "regroup", "replacement"]
    texts = [c.text for c in inc.consequences]
    assert "rank 3 on node0 failed (exit code 1)" in texts and "ranks 0-2 on node0 stopped by torch (SIGTERM)" in texts
    assert "the ranks restarted (world 8 → 4)" in texts and "the ranks restarted (world 4 → 8)" in texts
    assert "node2 joined, replacing node1" in texts
    # Both outages are its cost: the shrink from detection on, and the whole grow-back restart.
    assert inc.downtime == pytest.approx((t + 9.0 - (t + 0.5)) + (t2 + 4.0 - t2))


def test_lost_node_is_its_node_found_by_its_silence_and_replaced():
    # node2's agent and ranks are SIGKILLed together: nobody on node2 says a word; node0's agent sees
    # its ranks fail (the peer closed the connection) and the group re-forms without node2.
    log = JobLog()
    log.rendezvous(0.0, ["node0", "node2"], joined=["node0", "node2"])
    pids = log.incarnation(1.0, ["node0", "node2"], 4)
    log.begin_step(pids)
    t = log.t
    log.rank_exit(t + 0.5, 0, "node0", {0: 1, 1: -15, 2: -15, 3: -15}, pids, blamed=0)
    log.rendezvous(t + 2.0, ["node0"])
    log.incarnation(t + 3.0, ["node0"], 2, load=0)
    log.rendezvous(log.t + 1.0, ["node0", "node3"], joined=["node3"])
    log.incarnation(log.t + 2.0, ["node0", "node3"], 2, load=2)
    [inc] = incidents(log)
    assert (inc.kind, inc.target, inc.nodes, inc.suspects) == ("node_lost", "node node2", ["node2"], False)
    assert inc.detector == "the agent on node0" and inc.detection_latency == pytest.approx(0.5)
    assert "rank 0 on node0 failed (exit code 1)" in [c.text for c in inc.consequences]
    assert inc.actions == ["restart", "reload", "replacement"]
    assert "node3 joined, replacing node2" in [c.text for c in inc.consequences]


def test_a_failed_rank_with_every_node_still_talking_is_that_rank_and_two_are_suspects():
    log = JobLog()
    pids = two_nodes(log)
    log.begin_step(pids)
    t = log.t
    log.rank_exit(t + 0.5, 0, "node0", {0: -15, 1: 1, 2: -15, 3: -15}, pids, blamed=1)
    log.rank_exit(t + 0.6, 1, "node1", {4: -15, 5: -15, 6: -15, 7: -15}, pids, blamed=4)
    log.rendezvous(t + 2.0, ["node0", "node1"])
    log.incarnation(t + 3.0, ["node0", "node1"], 2, load=0)
    [inc] = incidents(log)
    assert (inc.kind, inc.target, inc.suspects) == ("rank_died", "rank 1", False)
    assert inc.summary.startswith("rank 1 failed (exit code 1)")
    # Two ranks failing with errors on two nodes: the evidence cannot tell which was first.
    log2 = JobLog()
    pids = two_nodes(log2)
    log2.begin_step(pids)
    t = log2.t
    log2.rank_exit(t + 0.5, 0, "node0", {0: 1, 1: -15, 2: -15, 3: -15}, pids, blamed=0)
    log2.rank_exit(t + 0.5, 1, "node1", {4: 1, 5: -15, 6: -15, 7: -15}, pids, blamed=4)
    log2.rendezvous(t + 2.0, ["node0", "node1"])
    log2.incarnation(t + 3.0, ["node0", "node1"], 2, load=0)
    [inc] = incidents(log2)
    assert (inc.kind, inc.target, inc.suspects) == ("rank_died", "suspects: ranks 0, 4", True)


def test_flipped_bit_rollback_and_quarantine_are_one_sdc_incident():
    log = JobLog()
    pids = two_nodes(log, steps=7)
    t = log.t
    log.ev(
        t + 0.1,
        "fault_detected",
        "trainer",
        pids[0],
        0,
        fault="sdc",
        target="rank1,rank3",
        detector="sdc-fingerprint",
        detail={"step": 7, "layer": "fingerprint", "params": [], "undetermined": True},
    )
    log.ev(t + 0.79, "ckpt_load", "trainer", pids[0], 0, step=5, seconds=0.6, tier="local")
    log.ev(t + 0.8, "rollback", "trainer", pids[0], 0, from_step=7, to_step=5, reason="sdc (fingerprint) at step 7")
    log.step = 5
    for _ in range(3):
        log.step += 1
        log.ev(t + 0.9 + (log.step - 6), "step_begin", "trainer", pids[0], 0, step=log.step)
        log.ev(t + 1.9 + (log.step - 6), "step_end", "trainer", pids[0], 0, step=log.step, step_seconds=1.0)
    [inc] = incidents(log)
    assert (inc.kind, inc.target, inc.suspects, inc.ranks) == ("sdc", "suspects: ranks 1, 3", True, [1, 3])
    assert inc.nodes == ["node0"]
    assert inc.actions == ["reload", "rollback"] and inc.restored_step == 5
    assert inc.lost_steps == 2 and inc.downtime == pytest.approx(0.8)


def test_damaged_checkpoint_is_its_own_incident_and_charged_the_steps_its_fallback_cost():
    # A dead GPU forces a restart; the newest checkpoint (step 10) is damaged; the load falls back to 5.
    log = JobLog()
    pids = two_nodes(log, steps=12)
    log.begin_step(pids)
    t = log.t
    log.healthd(
        t + 0.5,
        "fault_detected",
        "node1",
        fault="gpu",
        target="node1/gpu0",
        detector="healthd",
        last_progress_ts=T0 + t,
        detail={"kind": "xid", "code": 79},
    )
    log.rendezvous(t + 2.0, ["node0"])
    log.ev(
        t + 3.5,
        "ckpt_fail",
        "trainer",
        log.pid(),
        0,
        step=10,
        reason="step 10 at /run/checkpoints/step-00000010 is damaged: __1_0.distcp: crc32 mismatch",
        tier="file",
    )
    log.incarnation(t + 3.0, ["node0"], 3, load=5)
    damage, gpu = sorted(incidents(log), key=lambda i: i.kind, reverse=True)
    assert (damage.kind, damage.target, damage.restored_step) == ("storage_damage", "checkpoint step 10", 5)
    assert damage.summary.startswith("checkpoint step 10 is damaged (__1_0.distcp: crc32 mismatch); the load fell back")
    assert damage.lost_steps == 5 and damage.downtime == 0.0  # steps 6-10: the fallback's; its outage is the GPU's
    assert (gpu.kind, gpu.lost_steps) == ("gpu_fault", 2)  # steps 11-12 would be lost with an intact step 10 too
    assert gpu.downtime > 0 and "fallback" not in gpu.actions


def test_preemption_is_planned_and_the_requeue_its_consequence():
    log = JobLog()
    pids = two_nodes(log, steps=5)
    t = log.t
    log.ev(t + 0.5, "ckpt_commit", "trainer", pids[0], 0, step=5, blocking_seconds=0.4, tier="local", seconds=0.4)
    for r in pids:
        log.ev(t + 0.6, "worker_stop", "trainer", pids[r], r, reason="preempted", signalled_ts=T0 + t - 0.3)
    log.rank_exit(t + 1.0, 1, "node1", {4: 1, 5: -15, 6: -15, 7: -15}, pids, blamed=4)  # node0's ranks left first
    log.rendezvous(t + 20.0, ["node4", "node5"], joined=["node4", "node5"])  # the scheduler requeues the job
    log.ev(t + 21.0, "job_start", "trainer", log.pid(), 0, steps=10)
    log.incarnation(t + 21.0, ["node4", "node5"], 2, load=5)
    [inc] = incidents(log)
    assert (inc.kind, inc.planned, inc.target, inc.detection_latency) == ("preemption", True, "the job", None)
    assert inc.ts == pytest.approx(T0 + t - 0.3)  # when the signal came
    assert inc.actions == ["commit", "restart", "requeue", "reload"] and inc.restored_step == 5
    assert "rank 4 on node1 failed (exit code 1)" in [c.text for c in inc.consequences]


def test_straggler_strikes_and_exclusion_are_one_incident():
    log = JobLog()
    pids = two_nodes(log, steps=8)
    for k, t in enumerate((3.0, 5.0, 7.0)):
        log.controller(
            t,
            "fault_detected",
            fault="straggler",
            target="rank6",
            detector="controller",
            node="node1",
            detail=f"rank 6 at {2.0 + k / 10:.1f}x the other ranks' median time",
        )
    log.controller(7.1, "node_excluded", node="node1", reason="straggler: 3 strikes; last: rank 6 at 2.2x")
    log.healthd_kill(7.2, "node1", NODE1, pids, "KillWorkers: node excluded: straggler")
    log.rank_exit(7.5, 1, "node1", {r: -9 for r in NODE1}, pids, blamed=4)
    [inc] = incidents(log)
    assert (inc.kind, inc.target, inc.nodes) == ("straggler", "rank 6", ["node1"])
    assert inc.actions[:1] == ["exclusion"] and "straggler: 3 strikes" in inc.consequences[0].text


def test_operator_rollback_order_is_planned_with_its_kill_restart_and_load():
    log = JobLog()
    pids = two_nodes(log, steps=8)
    t = log.t
    log.controller(t + 0.2, "rollback_ordered", to_step=5, reason="bad eval", request="abc")
    for node, ranks in (("node0", NODE0), ("node1", NODE1)):
        log.healthd_kill(t + 0.3, node, ranks, pids, "KillWorkers: rollback to step 5: bad eval")
    log.rank_exit(t + 0.6, 0, "node0", {r: -9 for r in NODE0}, pids, blamed=0)
    log.rank_exit(t + 0.6, 1, "node1", {r: -9 for r in NODE1}, pids, blamed=4)
    log.rendezvous(t + 2.0, ["node0", "node1"])
    new = log.incarnation(t + 3.0, ["node0", "node1"], 0, load=5)
    log.ev(t + 5.0, "rollback", "trainer", new[0], 0, from_step=8, to_step=5, reason="bad eval", rollback_request="abc")
    [inc] = incidents(log)
    assert (inc.kind, inc.planned, inc.restored_step) == ("rollback_order", True, 5)
    assert "kill" in inc.actions and "restart" in inc.actions and "rollback" in inc.actions


def test_failed_saves_until_the_next_commit_are_one_incident():
    log = JobLog()
    pids = two_nodes(log, steps=12)
    for t, step in ((6.5, 6), (7.5, 7)):
        log.ev(t, "ckpt_fail", "trainer", pids[0], 0, step=step, reason="writing shards to s3://b/r failed", tier="s3")
    log.ev(8.5, "ckpt_commit", "trainer", pids[0], 0, step=8, tier="s3")
    log.ev(9.5, "ckpt_fail", "trainer", pids[0], 0, step=9, reason="writing shards to s3://b/r failed", tier="s3")
    first, second = incidents(log)
    assert (first.kind, first.evidence["steps"], first.downtime) == ("save_failed", [6, 7], 0.0)
    assert (second.kind, second.evidence["steps"]) == ("save_failed", [9])


def test_an_event_kind_without_a_rule_is_a_consequence_under_its_own_name():
    # A recovery event stalwart may add (in-process re-formation): no rule here, yet it is shown, costed.
    log = JobLog()
    pids = two_nodes(log)
    log.begin_step(pids)
    t = log.t
    log.rank_exit(t + 0.5, 1, "node1", {4: -9, 5: -15, 6: -15, 7: -15}, pids, blamed=4)
    log.ev(t + 0.6, "reform_begin", "trainer", pids[0], 0, reason="rank4 lost")
    log.ev(t + 1.6, "reform_end", "trainer", pids[0], 0, seconds=1.0, source="rank0")
    log.ev(t + 1.6, "step_begin", "trainer", pids[0], 0, step=log.step + 1)
    log.ev(t + 2.6, "step_end", "trainer", pids[0], 0, step=log.step + 1, step_seconds=1.0)
    [inc] = incidents(log)
    assert inc.kind == "rank_died" and inc.actions == ["reform"]
    assert [c.text for c in inc.consequences if c.action == "reform"] == [
        "reform begin (reason rank4 lost)",
        "reform end (source rank0)",
    ]
    assert inc.downtime == pytest.approx(1.1)


def test_the_demo_chaos_plan_reads_as_six_faults_and_one_planned_preemption():
    from incident_logs import chaos_log

    found = incidents(chaos_log())
    assert [(i.kind, i.target) for i in found if not i.planned] == [
        ("rank_died", "rank 5"),
        ("hang", "rank 2"),
        ("sdc", "suspects: ranks 1, 3"),
        ("gpu_fault", "node1 gpu0"),
        ("storage_damage", "checkpoint step 20"),
        ("node_lost", "node node2"),
    ]
    [(preemption)] = [i for i in found if i.planned]
    assert preemption.kind == "preemption" and preemption.restored_step == 41
    sdc = found[2]
    assert sdc.actions == ["reload", "rollback"] and sdc.restored_step == 10 and sdc.lost_steps == 4
    gpu, damage = found[3], found[4]
    assert damage.restored_step == 15 and damage.lost_steps == 5  # steps 16-20, recomputed because 20 was damaged
    assert gpu.actions == ["kill", "exclusion", "restart", "reload", "replacement"] and gpu.lost_steps == 2
