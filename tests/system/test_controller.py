"""The job controller end to end on CPU: real gRPC and HTTP servers, real healthd daemons, real rank processes."""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from controller_helpers import ROOT, TOKEN, api_state, http_get, node_of, spawn_rank
from grpc_health.v1 import health_pb2, health_pb2_grpc
from polling import free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

from stalwart.cli.main import main as stalwart_main
from stalwart.events import EventKind, EventLog, read_events
from stalwart.goodput.accounting import CATEGORIES
from stalwart.health.controller import (
    ControllerConfig,
    JobController,
    _daemon_address,
)
from stalwart.health.controller_client import TOKEN_METADATA, ControllerClient
from stalwart.health.daemon import HealthDaemon
from stalwart.health.exclusion import EXCLUDED_FILE, ExclusionList, ExclusionPolicy, StrikeBook
from stalwart.health.hang import HangConfig, Phase
from stalwart.health.probes import FAULT_INJECTION_ENV
from stalwart.health.proto import controller_pb2, controller_pb2_grpc, healthd_pb2, healthd_pb2_grpc
from stalwart.health.rollback import read_rollback_order
from stalwart.health.security import TOKEN_FILE_ENV, TlsConfig
from stalwart.health.straggler import StragglerConfig, StragglerDetector

EMPTY = controller_pb2.google_dot_protobuf_dot_empty__pb2.Empty()
# Generous: beats every 0.2 s on a loaded 2-core box must never look like a hang here.
NO_HANGS = HangConfig(warmup_steps=3, safety_factor=5.0, floor_s=30.0, initial_limits=dict.fromkeys(Phase, 60.0))


# ---------------------------------------------------------------- helpers


def make_controller(run_dir: Path, **overrides) -> JobController:
    config = ControllerConfig(
        run_dir, "127.0.0.1:0", "127.0.0.1:0", refresh_interval_s=0.5, evaluate_interval_s=0.2, **overrides
    )
    controller = JobController(config, TOKEN)
    controller.start()
    return controller


def make_daemon(run_dir: Path, node: int, controller: str | None, **kw) -> HealthDaemon:
    d = HealthDaemon(
        run_dir,
        TOKEN,
        node=node,
        hang_config=NO_HANGS,
        probe_interval_s=0.2,
        controller=controller,
        report_interval_s=0.3,
        **kw,
    )
    d.start()
    return d


def stop_all(procs) -> None:
    for p in procs:
        p.kill()
        p.wait()


def excluded_events(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir) if e["kind"] == "node_excluded"]


def serving(address: str, service: str = "", credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        )


# ---------------------------------------------------------------- pure parts


def test_straggler_scores_against_the_other_ranks_median():
    d = StragglerDetector(StragglerConfig(window=6, min_samples=3, threshold=1.5, warmup_steps=0))
    for step in range(1, 4):
        d.observe(0, "0", step, 1.0, 0.5, ts=step)
        d.observe(1, "0", step, 1.0, 1.5, ts=step)  # 3x slower compute; equal step times (synchronous job)
    scores, struck = d.evaluate()
    assert scores[1].score == pytest.approx(3.0) and scores[1].straggler and [s.rank for s in struck] == [1]
    assert scores[0].score == pytest.approx(1 / 3) and not scores[0].straggler  # two ranks still compare fairly
    d.observe(1, "0", 3, 1.0, 99.0, ts=3)  # a resend of step 3 is not a new sample
    assert d.evaluate()[0][1].score == pytest.approx(3.0)
    for step in range(4, 10):  # a full window (6 samples) later, still slow: the next strike
        d.observe(0, "0", step, 1.0, 0.5, ts=step)
        d.observe(1, "0", step, 1.0, 1.5, ts=step)
        assert bool(d.evaluate()[1]) == (step == 9)

    one_slow_step = StragglerDetector(StragglerConfig(window=5, min_samples=3, warmup_steps=0))
    for step in range(1, 6):
        for rank in range(4):
            one_slow_step.observe(rank, str(rank // 2), step, 1.0, 5.0 if (rank, step) == (2, 3) else 1.0, ts=step)
    scores, struck = one_slow_step.evaluate()
    assert not any(s.straggler for s in scores.values()) and struck == []  # a GC pause is not a straggler
    one_slow_step.forget_node("1")
    assert sorted(one_slow_step.evaluate()[0]) == [0, 1]


def test_a_new_process_in_a_ranks_place_is_scored_after_its_warmup_on_its_own_samples():
    d = StragglerDetector(StragglerConfig(window=6, min_samples=3, threshold=1.5, warmup_steps=2))
    for step in range(1, 6):  # two steps of warm-up, then three samples each
        d.observe(0, "0", step, 1.0, 1.0, ts=step, pid=100)
        d.observe(1, "0", step, 1.0, 9.0 if step <= 2 else 1.0, ts=step, pid=101)  # a cold start, then normal
        assert d.evaluate()[0][1].score == (0.0 if step < 5 else pytest.approx(1.0))
    for step in range(6, 12):  # rank 1 is replaced (a new pid): its cold steps are not the old process's history
        d.observe(0, "0", step, 1.0, 1.0, ts=step, pid=100)
        d.observe(1, "0", step, 1.0, 5.0 if step <= 7 else 1.0, ts=step, pid=202)
        scores, struck = d.evaluate()
        assert not scores[1].straggler and struck == []
    assert scores[1].score == pytest.approx(1.0)
    for step in range(12, 15):  # persistently slow after the warm-up: a straggler all the same
        d.observe(0, "0", step, 1.0, 1.0, ts=step, pid=100)
        d.observe(1, "0", step, 1.0, 3.0, ts=step, pid=202)
    assert [s.rank for s in d.evaluate()[1]] == [1]
    with pytest.raises(ValueError, match="warmup_steps"):
        StragglerConfig(warmup_steps=-1)


def test_exclusion_list_is_atomic_shared_and_strikes_count(tmp_path):
    lists = [ExclusionList(tmp_path) for _ in range(4)]
    threads = [
        threading.Thread(target=lambda i=i: [lists[i].add(f"{i}-{k}", "test") for k in range(10)]) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lists[0].load()) == 40  # no writer lost another's entry
    assert not lists[0].add("0-0", "again") and lists[0].load()["0-0"].reason == "test"
    assert "3-9" in lists[1] and "9" not in lists[1]
    assert json.loads((tmp_path / EXCLUDED_FILE).read_text())["2-5"]["reason"] == "test"
    (tmp_path / EXCLUDED_FILE).write_text("[1, 2")
    with pytest.raises(ValueError, match="fix or delete it"):
        ExclusionList(tmp_path).load()
    book = StrikeBook(ExclusionPolicy(straggler_strikes=2, network_strikes=0))
    assert book.strike("1", "straggler") is None and "2 strikes" in book.strike("1", "straggler")
    assert all(book.strike("1", "network") is None for _ in range(5))  # 0: never for that kind
    assert _daemon_address("0.0.0.0:50051", "ipv4:10.1.2.3:40000") == "10.1.2.3:50051"
    assert _daemon_address("[::]:50051", "ipv6:[fd00::5]:40000") == "[fd00::5]:50051"
    assert _daemon_address("10.0.0.9:50051", "ipv4:10.1.2.3:40000") == "10.0.0.9:50051"


# ---------------------------------------------------------------- servers


def test_grpc_health_and_auth_for_daemon_and_controller(tmp_path):
    controller = make_controller(tmp_path)
    daemon = make_daemon(tmp_path, 0, None)
    try:
        for address, service in (
            (daemon.address, "stalwart.health.NodeHealth"),
            (controller.grpc_address, "stalwart.health.Controller"),
        ):
            for name in ("", service):
                assert serving(address, name) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(controller.grpc_address) as channel:
            api = controller_pb2_grpc.ControllerStub(channel)
            refused = [
                lambda: api.ExcludeNode(controller_pb2.ExcludeRequest(token="wrong", node="0", reason="x"), timeout=5),
                lambda: api.RequestRollback(controller_pb2.RollbackRequest(latest_verified=True), timeout=5),
                lambda: api.ReportNode(
                    healthd_pb2.NodeStatus(node="0", state=healthd_pb2.UNHEALTHY), timeout=5
                ),  # a forged report could exclude
                lambda: api.ReportRankMetrics(
                    controller_pb2.RankMetricsReport(), timeout=5, metadata=((TOKEN_METADATA, TOKEN[:-1]),)
                ),
            ]
            for call in refused:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            auth = ((TOKEN_METADATA, TOKEN),)
            for bad in (
                healthd_pb2.NodeStatus(node=""),
                healthd_pb2.NodeStatus(node="x\n"),
                healthd_pb2.NodeStatus(node="1", state=9),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    api.ReportNode(bad, timeout=5, metadata=auth)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            nan = controller_pb2.RankMetrics(rank=0, node="0", step=1, step_seconds=float("nan"))
            with pytest.raises(grpc.RpcError) as err:
                api.ReportRankMetrics(controller_pb2.RankMetricsReport(metrics=[nan]), timeout=5, metadata=auth)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as err:  # 5 MiB > the 4 MiB receive limit
                api.ExcludeNode(controller_pb2.ExcludeRequest(token=TOKEN, node="0", reason="x" * (5 << 20)), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            garbage = channel.unary_unary(
                "/stalwart.health.Controller/ReportNode",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as err:
                garbage(b"\xff\xff\xff\xff\x0f\x01", timeout=5, metadata=auth)
            assert err.value.code() != grpc.StatusCode.OK
            assert json.loads(api.GetState(EMPTY, timeout=5).json)["nodes"] == []  # nothing got through
        with grpc.insecure_channel(daemon.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                healthd_pb2_grpc.NodeHealthStub(channel).KillWorkers(
                    healthd_pb2.KillRequest(token="", reason="x"), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert not (tmp_path / EXCLUDED_FILE).exists() and excluded_events(tmp_path) == []
        assert serving(controller.grpc_address) == health_pb2.HealthCheckResponse.SERVING  # still up after all that
        refused_total = {
            s.labels["reason"]: s.value
            for f in text_string_to_metric_families(http_get(controller.http_address, "/metrics").decode())
            for s in f.samples
            if s.name == "stalwart_controller_refused_requests_total"
        }
        assert refused_total["unauthenticated"] == 4 and refused_total["invalid"] >= 4
        assert http_get(controller.http_address, "/healthz") == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as err:
            http_get(controller.http_address, "/../../etc/passwd")
        assert err.value.code == 404
    finally:
        daemon.stop()
        controller.stop()


def test_dead_gpu_node_is_excluded_within_5s_and_the_rest_keeps_going(tmp_path, token_file, monkeypatch):
    monkeypatch.setenv(FAULT_INJECTION_ENV, "1")
    controller = make_controller(tmp_path)
    daemons = [make_daemon(tmp_path, node, controller.grpc_address) for node in (0, 1)]
    ranks = []
    try:
        ranks = [spawn_rank(daemons[r // 2].address, controller.grpc_address, r // 2, r, 0.05) for r in range(4)]

        def both_nodes_up():
            nodes = api_state(controller.http_address)["nodes"]
            return [n["node"] for n in nodes] == ["0", "1"] and all(
                n["state"] == "HEALTHY" and len(n["ranks"]) == 2 for n in nodes
            )

        wait_for(both_nodes_up, 20, "both nodes reported with their ranks")
        (tmp_path / "faults").mkdir()
        t0 = time.monotonic()
        (tmp_path / "faults" / "gpu-1.json").write_text(json.dumps({"gpu": 0, "fault": "xid", "code": 79}))
        wait_for(lambda: "1" in ExclusionList(tmp_path), 10, "node 1 on the exclusion list")
        latency = time.monotonic() - t0
        print(f"\ninjected XID 79 on node 1 -> excluded by the controller in {latency:.2f}s")
        assert latency <= 5.0, f"dead-GPU exclusion took {latency:.2f}s (> 5 s)"
        (event,) = wait_for(lambda: excluded_events(tmp_path), 5, "the node_excluded event")
        assert event["role"] == "controller" and event["node"] == 1 and "xid 79" in event["reason"]
        entry = json.loads((tmp_path / EXCLUDED_FILE).read_text())["1"]
        assert "xid 79" in entry["reason"] and entry["ts"] > 0 and entry["host"]
        for p in ranks[2:]:
            assert p.wait(timeout=10) == -signal.SIGKILL
        time.sleep(1.0)
        assert all(p.poll() is None for p in ranks[:2]), "ranks on the healthy node must keep running"
        state = api_state(controller.http_address)
        assert node_of(state, "1")["state"] == "EXCLUDED" and node_of(state, "0")["state"] == "HEALTHY"
        assert state["step"] > 0 and state["step_rate"] > 0  # the job goes on
        (gpu,) = node_of(state, "1")["gpus"]
        assert gpu["issues"][0]["kind"] == "xid" and gpu["issues"][0]["fatal"]
        (gpu,) = wait_for(
            lambda: [i for i in api_state(controller.http_address)["incidents"] if "exclusion" in i["actions"]],
            10,
            "the GPU fault with its exclusion",
        )
        assert (gpu["kind"], gpu["target"], gpu["nodes"]) == ("gpu_fault", "node1 gpu0", ["node1"])
        assert len(api_state(controller.http_address)["incidents"]) == 1  # the exclusion is a consequence
        assert len(excluded_events(tmp_path)) == 1  # reported every 0.3 s, excluded once
    finally:
        stop_all(ranks)
        for d in daemons:
            d.stop()
        controller.stop()


def test_slowed_rank_is_flagged_then_struck_out(tmp_path, token_file):
    controller = make_controller(
        tmp_path,
        straggler=StragglerConfig(window=10, min_samples=4, threshold=1.5),
        policy=ExclusionPolicy(straggler_strikes=3),
    )
    daemons = [make_daemon(tmp_path, node, controller.grpc_address) for node in (0, 1)]
    ranks = []
    try:
        # rank 3 sleeps 3x longer per step than the others: the injected straggler
        ranks = [
            spawn_rank(daemons[r // 2].address, controller.grpc_address, r // 2, r, 0.15 if r == 3 else 0.05)
            for r in range(4)
        ]
        t0 = time.monotonic()

        def flagged():
            state = api_state(controller.http_address)
            rs = {r["rank"]: r for n in state["nodes"] for r in n["ranks"]}
            return state if len(rs) == 4 and rs[3]["straggler"] else None

        state = wait_for(flagged, 20, "rank 3 flagged as a straggler")
        print(f"\nrank 3 (3x slower) flagged as straggler after {time.monotonic() - t0:.2f}s")
        rs = {r["rank"]: r for n in state["nodes"] for r in n["ranks"]}
        assert 2.0 <= rs[3]["straggler_score"] <= 4.0, rs[3]
        assert all(not rs[r]["straggler"] and rs[r]["straggler_score"] < 1.5 for r in (0, 1, 2)), rs
        assert (
            rs[3]["step_seconds"] > rs[0]["step_seconds"] and rs[3]["phase"] == "STEP" and rs[3]["heartbeat_age_s"] >= 0
        )
        wait_for(
            lambda: any(
                i["kind"] == "straggler" and i["ranks"] == [3] and i["nodes"] == ["node1"]
                for i in api_state(controller.http_address)["incidents"]
            ),
            10,
            "the straggler incident",
        )
        # Still slow for two more windows: the third strike excludes node 1 and its workers are killed.
        wait_for(lambda: "1" in ExclusionList(tmp_path), 30, "node 1 excluded after 3 straggler strikes")
        assert "straggler: 3 strikes" in ExclusionList(tmp_path).load()["1"].reason
        for p in ranks[2:]:
            assert p.wait(timeout=10) == -signal.SIGKILL  # the controller's KillWorkers through node 1's healthd
        assert all(p.poll() is None for p in ranks[:2])
        assert "0" not in ExclusionList(tmp_path)
    finally:
        stop_all(ranks)
        for d in daemons:
            d.stop()
        controller.stop()


def start_controller_process(
    run_dir: Path, token_file: Path, grpc_port: int, http_port: int, cli: bool = True
) -> subprocess.Popen:
    """``stalwart controller`` as a process; ``cli=False`` skips the CLI's start-up imports (faster)."""
    entry = (
        ["-m", "stalwart", "controller"]
        if cli
        else ["-c", "import sys; from stalwart.cli.main import main; sys.exit(main(['controller', *sys.argv[1:]]))"]
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            *entry,
            "--run-dir",
            str(run_dir),
            "--grpc-bind",
            f"127.0.0.1:{grpc_port}",
            "--http-bind",
            f"127.0.0.1:{http_port}",
            "--token-file",
            str(token_file),
            "--refresh-interval-s",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    line = proc.stdout.readline()
    assert "controller listening on" in line, f"controller did not start (got {line!r}, exit {proc.poll()})"
    return proc


def test_controller_down_training_side_keeps_going_and_catches_up(tmp_path, token_file):
    grpc_port, http_port = free_port(), free_port()
    address, http = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
    daemon = make_daemon(tmp_path, 0, address)
    rank = spawn_rank(daemon.address, address, 0, 0, 0.05)  # started while no controller exists
    metrics = ControllerClient(address, interval_s=0.2)  # a second reporter: queued metrics must arrive later
    controller = None
    try:
        for step in range(1, 6):
            metrics.report_rank_metrics(5, "7", step, 0.5, 0.25)
        time.sleep(1.5)
        assert daemon.reporter.failures >= 1 and metrics.failures >= 1
        assert serving(daemon.address) == health_pb2.HealthCheckResponse.SERVING and rank.poll() is None
        assert [r.rank for r in daemon.status().ranks] == [0] and daemon.status().ranks[0].step > 0

        controller = start_controller_process(tmp_path, token_file, grpc_port, http_port)
        t0 = time.monotonic()

        def caught_up():
            state = api_state(http)
            n0, n7 = node_of(state, "0"), node_of(state, "7")
            # Node 0 appears with the rank's own metrics first; its healthd's report (heartbeat age >= 0)
            # may come later.
            return (
                n0
                and n7
                and n0["heartbeat_age_s"] >= 0
                and [r["rank"] for r in n0["ranks"]] == [0]
                and n0["ranks"][0]["step_seconds"] > 0
                and n7["ranks"][0]["step"] == 5
            )

        wait_for(caught_up, 20, "the returned controller to see node 0's healthd, rank 0 and the queued metrics")
        print(f"\ncontroller back -> caught up in {time.monotonic() - t0:.2f}s")
        assert node_of(api_state(http), "0")["state"] == "HEALTHY"
        with grpc.insecure_channel(address) as channel:
            reply = controller_pb2_grpc.ControllerStub(channel).ExcludeNode(
                controller_pb2.ExcludeRequest(token=TOKEN, node="7", reason="bad NIC"), timeout=5
            )
        assert reply.newly_excluded

        controller.kill()  # down again, hard
        controller.wait()
        step_before = daemon.status().ranks[0].step
        time.sleep(1.0)
        assert rank.poll() is None and daemon.status().ranks[0].step > step_before  # training does not notice
        controller = start_controller_process(tmp_path, token_file, grpc_port, http_port, cli=False)
        state = wait_for(
            lambda: (s := api_state(http)) and node_of(s, "0") and node_of(s, "0")["ranks"] and s, 20, "node 0 again"
        )
        assert (
            node_of(state, "7")["state"] == "EXCLUDED" and "bad NIC" in node_of(state, "7")["reasons"][0]
        )  # reloaded from disk
    finally:
        metrics.close()
        stop_all([rank] + ([controller] if controller else []))
        daemon.stop()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_state_metrics_checkpoints_and_rollback(tmp_path):
    import torch

    from stalwart.checkpoint.manager import CheckpointManager

    trainer = EventLog(tmp_path, role="trainer", rank=0, node=0)
    trainer.emit(EventKind.JOB_START, config={"checkpoint": {"enabled": True, "url": ""}}, steps=10)
    trainer.emit(EventKind.INIT_DONE, seconds=0.1)
    for step in (1, 2):
        trainer.emit(EventKind.STEP_BEGIN, step=step)
        time.sleep(0.05)
        trainer.emit(
            EventKind.STEP_END, step=step, step_seconds=0.05, tokens_per_second=1234.5, mfu=0.42, tokens=step * 64
        )
    trainer.close()
    manager = CheckpointManager(str(tmp_path / "checkpoints"))
    manager.save(1, {"w": torch.ones(8)}, verified=True)
    manager.save(2, {"w": torch.zeros(8)})
    manager.close()

    controller = make_controller(tmp_path)
    try:
        state = wait_for(
            lambda: (s := api_state(controller.http_address))["checkpoints"] and s, 60, "the checkpoint listing"
        )
        assert [(c["step"], c["verified"]) for c in state["checkpoints"]] == [(1, True), (2, False)]
        assert all(c["bytes"] > 0 and c["ts"] > 0 for c in state["checkpoints"])
        assert (
            state["step"] == 2
            and 0 < state["goodput"]["ratio"] <= 1
            and set(state["goodput"]["badput_s"]) == set(CATEGORIES)
        )
        assert set(state) == {
            "job",
            "updated",
            "step",
            "step_rate",
            "nodes",
            "incidents",
            "timeline",
            "checkpoints",
            "goodput",
        }
        assert state["timeline"]["step_rate"] and all(rate >= 0 for _, rate in state["timeline"]["step_rate"])

        families = {
            f.name: f for f in text_string_to_metric_families(http_get(controller.http_address, "/metrics").decode())
        }
        value = {name: f.samples[0].value for name, f in families.items() if len(f.samples) == 1}
        assert value["stalwart_tokens_per_second"] == 1234.5 and value["stalwart_mfu_ratio"] == 0.42
        assert value["stalwart_goodput_ratio"] == pytest.approx(state["goodput"]["ratio"], abs=0.2)
        assert value["stalwart_checkpoint_latest_verified_step"] == 1 and value["stalwart_training_step"] == 2
        assert {s.labels["category"] for s in families["stalwart_badput_seconds"].samples} == set(CATEGORIES)
        assert families["stalwart_incidents"].type == "counter"

        with grpc.insecure_channel(controller.grpc_address) as channel:
            api = controller_pb2_grpc.ControllerStub(channel)
            reply = api.RequestRollback(
                controller_pb2.RollbackRequest(token=TOKEN, latest_verified=True, reason="sdc on rank 3"), timeout=60
            )
            assert reply.step == 1
            order = read_rollback_order(tmp_path)
            assert order.step == 1 and order.reason == "sdc on rank 3"
            with pytest.raises(grpc.RpcError) as err:
                api.RequestRollback(controller_pb2.RollbackRequest(token=TOKEN, step=99), timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "[1, 2]" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:  # committed, but no SDC check vouches for it
                api.RequestRollback(controller_pb2.RollbackRequest(token=TOKEN, step=2), timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not verified" in err.value.details()
            (order_incident,) = wait_for(
                lambda: [
                    i
                    for i in json.loads(api.GetState(EMPTY, timeout=5).json)["incidents"]
                    if i["kind"] == "rollback_order"
                ],
                30,
                "the rollback order as a planned incident",
            )
            assert (
                order_incident["planned"]
                and "rollback to step 1 was ordered (sdc on rank 3)" in order_incident["summary"]
            )
        families = {
            f.name: f for f in text_string_to_metric_families(http_get(controller.http_address, "/metrics").decode())
        }
        assert {s.labels["kind"]: s.value for s in families["stalwart_incidents"].samples}["rollback_order"] == 1
    finally:
        controller.stop()


# ---------------------------------------------------------------- TLS


def make_pki(d: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(name, issuer_name, issuer_key, key, *, ca=False, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    paths = {}

    def write(stem, cert, key):
        paths[stem] = d / f"{stem}.pem"
        paths[stem].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{stem}-key"] = d / f"{stem}-key.pem"
        paths[f"{stem}-key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    write("ca", issue("stalwart test CA", "stalwart test CA", ca_key, ca_key, ca=True), ca_key)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", issue("stalwart-controller", "stalwart test CA", ca_key, server_key, san=san), server_key)
    write("client", issue("stalwart-healthd", "stalwart test CA", ca_key, client_key), client_key)
    return paths


def test_mutual_tls_round_trip(tmp_path):
    pki = make_pki(tmp_path)
    controller = make_controller(tmp_path / "run", tls=TlsConfig(pki["server"], pki["server-key"], pki["ca"]))
    client_tls = TlsConfig(pki["client"], pki["client-key"], pki["ca"])
    daemon = make_daemon(tmp_path / "run", 4, controller.grpc_address, controller_tls=client_tls)
    try:
        assert (
            serving(controller.grpc_address, credentials=client_tls.channel_credentials())
            == health_pb2.HealthCheckResponse.SERVING
        )
        for credentials in (TlsConfig(ca=pki["ca"]).channel_credentials(), None):  # no client certificate; plain text
            with pytest.raises(grpc.RpcError) as err:
                serving(controller.grpc_address, credentials=credentials)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        context = ssl.create_default_context(cafile=pki["ca"])
        context.load_cert_chain(pki["client"], pki["client-key"])
        assert http_get(controller.http_address, "/healthz", context) == b"ok\n"
        wait_for(
            lambda: node_of(api_state(controller.http_address, context), "4"), 10, "healthd's report over mutual TLS"
        )
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            http_get(
                controller.http_address, "/healthz", ssl.create_default_context(cafile=pki["ca"])
            )  # no client certificate
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            http_get(controller.http_address, "/healthz")  # plain HTTP to a TLS port
        assert http_get(controller.http_address, "/healthz", context) == b"ok\n"  # still serving
    finally:
        daemon.stop()
        controller.stop()


def test_controller_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    empty = tmp_path / "empty"
    empty.write_text("")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    base = ["--run-dir", str(tmp_path), "--grpc-bind", "127.0.0.1:0", "--http-bind", "127.0.0.1:0"]
    with JobController(ControllerConfig(tmp_path, "127.0.0.1:0", "127.0.0.1:0"), TOKEN) as running:
        for args, fix in (
            (["--token-file", str(empty)], "openssl rand"),
            ([], TOKEN_FILE_ENV),
            (["--token-file", str(token), "--tls-cert", str(token)], "--tls-key"),
            (["--token-file", str(token), "--grpc-bind", running.grpc_address], "could not bind"),
            (["--token-file", str(token), "--http-bind", running.http_address], "could not bind"),
        ):
            assert stalwart_main(["controller", *base, *args]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith("stalwart controller: error:") and fix in err[-1], err
