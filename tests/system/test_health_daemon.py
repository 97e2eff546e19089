"""healthd end to end on CPU: real gRPC server, real heartbeating child processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from polling import wait_for

from stalwart.cli.main import main as stalwart_main
from stalwart.events import read_events
from stalwart.health import daemon as daemon_module
from stalwart.health.client import HeartbeatClient
from stalwart.health.daemon import MAX_MESSAGE_BYTES, HealthDaemon, _find_py_spy
from stalwart.health.hang import HangConfig, Phase
from stalwart.health.probes import FAULT_INJECTION_ENV, GpuProbe
from stalwart.health.proto import healthd_pb2, healthd_pb2_grpc
from stalwart.health.security import heartbeat_key
from stalwart.jobenv import TOKEN_FILE_ENV

CASES = Path(__file__).resolve().parents[1] / "health_cases.py"
TOKEN = "s3cret-job-token"
AUTH = heartbeat_key(TOKEN)
# Floor 3 s: beats every 0.2 s on a loaded 2-core CI box can stall past 2 s without a real hang.
FAST = HangConfig(
    warmup_steps=3,
    safety_factor=5.0,
    floor_s=3.0,
    initial_limits={Phase.INIT: 30, Phase.STEP: 30, Phase.CHECKPOINT: 30, Phase.EVAL: 30},
)


def token_file(run_dir: Path) -> Path:
    """The job token file a launcher would hand its ranks (they derive the heartbeat key from it)."""
    path = run_dir / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def spawn_beater(address: str, run_dir: Path, rank: int, mode: str = "beat", token: bool = True) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_FILE_ENV}
    if token:
        env[TOKEN_FILE_ENV] = str(token_file(run_dir))
    proc = subprocess.Popen(
        [sys.executable, str(CASES), mode, address, str(run_dir), str(rank)], stdout=subprocess.PIPE, text=True, env=env
    )
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"heartbeat child did not start (got {line!r}, exit {proc.poll()})"
    return proc


def faults(run_dir: Path, fault: str) -> list[dict]:
    return [e for e in read_events(run_dir) if e["kind"] == "fault_detected" and e["fault"] == fault]


@pytest.fixture
def daemon(tmp_path):
    d = HealthDaemon(tmp_path, TOKEN, hang_config=FAST, probe_interval_s=0.2)
    d.start()
    yield d
    d.stop()


def stub(address: str) -> healthd_pb2_grpc.NodeHealthStub:
    return healthd_pb2_grpc.NodeHealthStub(grpc.insecure_channel(address))


def test_sigstopped_rank_is_detected_dumped_and_killed(daemon, tmp_path):
    proc = spawn_beater(daemon.address, tmp_path, rank=0)
    try:
        wait_for(
            lambda: [
                r
                for r in stub(daemon.address).GetStatus(healthd_pb2.google_dot_protobuf_dot_empty__pb2.Empty()).ranks
                if r.step >= 3
            ],
            10,
            "3 steps",
        )
        proc.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        last_beat = float((tmp_path / "beat-rank0").read_text())
        try:
            (event,) = wait_for(lambda: faults(tmp_path, "hang"), 15, "a hang event")
        except AssertionError as e:
            raise AssertionError(f"{e}; daemon status: {daemon.status()}; child status {proc.poll()}") from None
        detected_after_stop = time.time() - stopped_at
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    latency = event["ts"] - event["last_progress_ts"]
    print(
        f"\nhang detection: {latency:.2f}s from the last heartbeat progress to the fault event "
        f"(limit {event['detail']['limit_s']}s; child's last beat {event['ts'] - last_beat:.2f}s before; observed by "
        f"the test {detected_after_stop:.2f}s after SIGSTOP)"
    )
    assert event["target"] == "rank0" and event["detector"] == "healthd" and event["role"] == "healthd"
    assert event["last_progress_ts"] <= last_beat + 0.01
    assert event["detail"]["limit_s"] == FAST.floor_s  # 5 x ~0.2 s steps is below the floor
    assert latency <= 10.0
    assert event["detail"]["killed_pids"] == [proc.pid]
    assert event["detail"]["culprit_found_here"] is True  # the stopped process is the culprit
    (stacks,) = event["detail"]["stacks"]
    text = Path(stacks).read_text()
    assert Path(stacks).parent == tmp_path / "health" and "rank0" in Path(stacks).name
    if _find_py_spy():  # ptrace reads the stopped process from outside
        assert "py-spy dump" in text and "beat (health_cases.py" in text, text
    else:  # a stopped process cannot run its SIGUSR1 handler; the dump says why
        assert "method: none" in text and "py-spy not found" in text, text
    assert daemon.status().ranks == []  # the killed group is forgotten; a restarted one registers afresh


def test_wedged_training_thread_is_caught_and_faulthandler_fallback_dumps(daemon, tmp_path, monkeypatch):
    """The heartbeat thread keeps sending, but beat() stopped: that is a hang. Without py-spy the
    daemon falls back to SIGUSR1 and the trainer's faulthandler (install_stack_dump_handler)."""
    monkeypatch.setattr(daemon_module, "_find_py_spy", lambda: None)
    proc = spawn_beater(daemon.address, tmp_path, rank=2, mode="stall")
    try:
        (event,) = wait_for(lambda: faults(tmp_path, "hang"), 20, "a hang event")
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    assert event["target"] == "rank2" and event["detail"]["phase"] == "STEP"
    assert event["detail"]["culprit_found_here"] is False  # running, just not progressing: no sure culprit
    text = Path(event["detail"]["stacks"][0]).read_text()
    assert "method: SIGUSR1 faulthandler" in text and "in stuck_in_collective" in text, text


def test_grpc_health_auth_and_malformed_requests(daemon, tmp_path):
    channel = grpc.insecure_channel(daemon.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "stalwart.health.NodeHealth"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    api = healthd_pb2_grpc.NodeHealthStub(channel)
    proc = spawn_beater(daemon.address, tmp_path, rank=1)
    try:
        for token in ("", "wrong", TOKEN + "x"):
            with pytest.raises(grpc.RpcError) as err:
                api.KillWorkers(healthd_pb2.KillRequest(token=token, reason="test"), timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert proc.poll() is None
        with pytest.raises(grpc.RpcError) as err:  # 2 MiB > the 1 MiB receive limit
            api.KillWorkers(healthd_pb2.KillRequest(token=TOKEN, reason="x" * (2 * MAX_MESSAGE_BYTES)), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert proc.poll() is None
        garbage = channel.unary_unary(
            "/stalwart.health.NodeHealth/Heartbeat", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as err:
            garbage(b"\xff\xff\xff\xff\x0f\x01", timeout=5)
        assert err.value.code() != grpc.StatusCode.OK
        for bad in (
            healthd_pb2.HeartbeatRequest(rank=2, pid=os.getpid(), ts=time.time(), auth=AUTH),  # the daemon itself
            healthd_pb2.HeartbeatRequest(rank=2, pid=2**31 - 1, ts=time.time(), auth=AUTH),  # no such process
            healthd_pb2.HeartbeatRequest(rank=-1, pid=proc.pid, ts=time.time(), auth=AUTH),
            healthd_pb2.HeartbeatRequest(rank=2, pid=proc.pid, phase=7, ts=time.time(), auth=AUTH),
            healthd_pb2.HeartbeatRequest(rank=2, pid=proc.pid, ts=float("nan"), auth=AUTH),
        ):
            with pytest.raises(grpc.RpcError) as err:
                api.Heartbeat(bad, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        status = api.GetStatus(healthd_pb2.google_dot_protobuf_dot_empty__pb2.Empty(), timeout=5)  # still serving
        assert [r.rank for r in status.ranks] == [1] and status.ranks[0].pid == proc.pid
        assert status.state == healthd_pb2.HEALTHY and not status.gpu.present
        assert status.host.mem_available_bytes > 0 and status.host.disk_free_bytes > 0
        reply = api.KillWorkers(healthd_pb2.KillRequest(token=TOKEN, reason="operator"), timeout=5)
        assert list(reply.killed_pids) == [proc.pid]
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_beat_timestamps_cannot_fake_or_postpone_a_hang(daemon):
    """Detection runs on the daemon's monotonic clock; a beat's wall-clock age only counts up to 5 s."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for ts in (time.time() - 1000.0, time.time() + 1000.0):  # a wall-clock step either way
            daemon.heartbeat(healthd_pb2.HeartbeatRequest(rank=4, pid=sleeper.pid, phase=healthd_pb2.INIT, ts=ts))
            (rank,) = daemon.status().ranks
            assert rank.last_progress_age_s <= daemon_module.MAX_BEAT_AGE_S + 0.5
        daemon.check_once()
        assert faults(Path(daemon.run_dir), "hang") == [] and len(daemon.status().ranks) == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    daemon.check_once()  # an exited rank is dropped, not reported as a hang
    assert daemon.status().ranks == [] and faults(Path(daemon.run_dir), "hang") == []


def test_gpu_probe_reports_not_present_cleanly():
    report = GpuProbe(expected_gpus=8).probe()
    assert not report.present and report.gpus == [] and "NVML" in report.reason
    assert GpuProbe().probe().fatal() == []  # asking twice stays quiet


def write_fault(run_dir: Path, node: int) -> None:
    (run_dir / "faults").mkdir(parents=True, exist_ok=True)
    (run_dir / "faults" / f"gpu-{node}.json").write_text(json.dumps({"gpu": 0, "fault": "xid", "code": 79}))


def test_injected_gpu_fault_marks_node_unhealthy(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_INJECTION_ENV, "1")
    with HealthDaemon(tmp_path, TOKEN, node=3, hang_config=FAST, probe_interval_s=0.2) as d:
        proc = spawn_beater(d.address, tmp_path, rank=0)
        try:
            write_fault(tmp_path, 3)
            t0 = time.monotonic()
            (event,) = wait_for(lambda: faults(tmp_path, "gpu"), 5, "a gpu fault event")
            marker = json.loads((tmp_path / "health" / "node-3.unhealthy").read_text())
            print(f"\ninjected XID 79 -> node unhealthy in {time.monotonic() - t0:.2f}s")
            assert proc.wait(timeout=5) == -signal.SIGKILL
        finally:
            proc.kill()
            proc.wait()
        assert event["target"] == "node3/gpu0" and event["node"] == "3" and event["detail"]["code"] == 79
        assert event["detail"]["killed_pids"] == [proc.pid]
        assert marker["issues"][0]["kind"] == "xid" and marker["issues"][0]["fatal"]
        status = d.status()
        assert status.state == healthd_pb2.UNHEALTHY and "xid 79" in status.reasons[0]
        assert [i.code for g in status.gpu.gpus for i in g.issues] == [79]
        newcomer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:  # a worker group restarted on this node is told to stop
            beat = healthd_pb2.HeartbeatRequest(
                rank=0, pid=newcomer.pid, phase=healthd_pb2.INIT, ts=time.time(), auth=AUTH
            )
            assert stub(d.address).Heartbeat(beat, timeout=5).action == healthd_pb2.STOP
        finally:
            newcomer.kill()
            newcomer.wait()
        time.sleep(0.5)
        assert len(faults(tmp_path, "gpu")) == 1  # reported once, not every probe


def test_fault_file_ignored_without_opt_in(tmp_path, monkeypatch):
    monkeypatch.delenv(FAULT_INJECTION_ENV, raising=False)
    write_fault(tmp_path, 0)
    with HealthDaemon(tmp_path, TOKEN, hang_config=FAST, probe_interval_s=0.1) as d:
        time.sleep(1.0)
        assert d.status().state == healthd_pb2.HEALTHY
    assert not (tmp_path / "health" / "node-0.unhealthy").exists() and faults(tmp_path, "gpu") == []


def test_client_keeps_going_without_daemon():
    with HeartbeatClient("127.0.0.1:1", rank=0, local_rank=0, interval_s=0.05, rpc_timeout_s=0.2) as client:
        t0 = time.perf_counter()
        for step in range(100):
            client.beat(step, Phase.STEP, 0.01)
        assert time.perf_counter() - t0 < 0.05  # beat() never waits on the network
        wait_for(lambda: client.failures >= 2, 5, "retries")
        assert client.sent == 0 and not client.stop_requested


def test_healthd_serves_on_unix_socket_until_sigterm(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    sock = tmp_path / "healthd.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stalwart",
            "healthd",
            "--run-dir",
            str(tmp_path),
            "--bind",
            f"unix:{sock}",
            "--token-file",
            str(token_file),
            "--node",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(2)]  # a log line (stderr) and the address line, in either order
        assert any(f"listening on unix:{sock}" in line for line in lines), lines
        assert (sock.stat().st_mode & 0o777) == 0o600
        assert json.loads((tmp_path / "health" / "healthd-node5.json").read_text())["address"] == f"unix:{sock}"
        reply = stub(f"unix:{sock}").KillWorkers(healthd_pb2.KillRequest(token=TOKEN), timeout=5)
        assert list(reply.killed_pids) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    empty = tmp_path / "empty"
    empty.write_text("")
    assert stalwart_main(["healthd", "--run-dir", str(tmp_path), "--token-file", str(empty)]) == 2
    with HealthDaemon(tmp_path, TOKEN) as running:  # a taken port is a clear error, not a silent second daemon
        with pytest.raises(OSError, match="could not bind"):
            HealthDaemon(tmp_path, TOKEN, bind=running.address).start()


def test_culprit_mode_kills_only_the_stopped_rank_and_escalates_to_the_ranks_still_stuck(tmp_path):
    """--hang-kill culprit (in-process recovery): the stopped rank dies, its blocked peers are left to re-form.

    The peers stall right after (blocked on the culprit): reported as ``hang_blocked``, not killed. One
    of them moves into the recovery (an INIT beat); the other does not within one more limit and is
    killed after all (its replacement, or the world-restart fallback, takes over); the recovering one lives.
    """
    with HealthDaemon(tmp_path, TOKEN, hang_config=FAST, probe_interval_s=0.2, hang_kill="culprit") as d:
        culprit = spawn_beater(d.address, tmp_path, rank=0)
        blocked = spawn_beater(d.address, tmp_path, rank=1, mode="stall")  # wedges after 5 steps, keeps beating
        recovering = spawn_beater(d.address, tmp_path, rank=2, mode="recover")
        try:
            culprit.send_signal(signal.SIGSTOP)
            (hang,) = wait_for(lambda: faults(tmp_path, "hang"), 15, "the culprit's hang event")
            assert hang["target"] == "rank0" and hang["detail"]["killed_pids"] == [culprit.pid]
            assert culprit.wait(timeout=5) == -signal.SIGKILL
            assert blocked.poll() is None and recovering.poll() is None  # not killed with it
            peers = wait_for(
                lambda: len(found := faults(tmp_path, "hang_blocked")) >= 2 and found, 15, "the blocked peers' events"
            )
            assert sorted(p["target"] for p in peers) == ["rank1", "rank2"], peers
            assert not {blocked.pid, recovering.pid} & {pid for p in peers for pid in p["detail"]["killed_pids"]}
            (tmp_path / "recover-rank2").touch()  # rank 2 is released into the recovery
            assert blocked.wait(timeout=15) == -signal.SIGKILL  # no recovery came for rank 1: killed after all
            time.sleep(1.0)
            assert recovering.poll() is None  # the rank that moved on is left to re-form
        finally:
            for proc in (culprit, blocked, recovering):
                proc.kill()
                proc.wait()


def test_an_unauthenticated_client_cannot_get_a_worker_killed_but_the_jobs_own_rank_is_declared_hung(tmp_path):
    """A real ``stalwart healthd``: heartbeats without the job's key register nothing; the job's rank still hangs."""
    from polling import free_port

    address = f"127.0.0.1:{free_port()}"
    log = open(tmp_path / "healthd.log", "wb")
    healthd = subprocess.Popen(
        [sys.executable, "-m", "stalwart", "healthd", "--run-dir", str(tmp_path), "--bind", address]
        + ["--token-file", str(token_file(tmp_path)), "--floor-s", "1", "--init-limit-s", "3", "--step-limit-s", "3"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    rank = None
    try:
        api = stub(address)
        empty = healthd_pb2.google_dot_protobuf_dot_empty__pb2.Empty()
        wait_for(lambda: _answers(api, empty), 60, "healthd to serve")
        refused = 0
        for step, key in enumerate(["", "not-the-key", heartbeat_key("another-job's-token")] * 3):
            beat = healthd_pb2.HeartbeatRequest(rank=0, pid=victim.pid, step=step, ts=time.time(), auth=key)
            with pytest.raises(grpc.RpcError) as err:
                api.Heartbeat(beat, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            refused += 1
        time.sleep(6)  # twice the hang limit of silence after the last "beat"
        status = api.GetStatus(empty, timeout=5)
        assert victim.poll() is None and list(status.ranks) == [] and status.refused_heartbeats == refused

        rank = spawn_beater(address, tmp_path, rank=1)  # the job's own rank: it has the token file
        rank.send_signal(signal.SIGSTOP)
        assert rank.wait(timeout=30) == -signal.SIGKILL  # declared hung and killed
        (hang,) = wait_for(lambda: faults(tmp_path, "hang"), 10, "the hang event")
        assert hang["target"] == "rank1" and hang["detail"]["killed_pids"] == [rank.pid]
        assert victim.poll() is None  # the process the unauthenticated client named is untouched
    finally:
        for proc in (victim, rank):
            if proc is not None:
                proc.kill()
                proc.wait()
        healthd.terminate()
        healthd.wait(30)
    text = (tmp_path / "healthd.log").read_text()
    assert "Traceback" not in text
    assert text.count("refused heartbeat #1 ") == 1  # one line for the peer's first refusal, not one per beat


def _answers(api: healthd_pb2_grpc.NodeHealthStub, empty) -> bool:
    try:
        api.GetStatus(empty, timeout=1)
        return True
    except grpc.RpcError:
        return False
