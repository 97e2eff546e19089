"""The controller's rollback order, end to end: ordered mid-run, carried out once, losses as fault-free.

A real ``stalwart controller`` and a real ``stalwart launch`` node (2 ranks, tp2, 16 steps). Rank 0
is slowed from step 5 to leave a window; once step 6 is committed the test orders a rollback to
verified step 4 through gRPC. The controller kills the workers, the agent restarts them, and they must load
step 4 (the ``ckpt_load`` event carries the order's id), flag the newer steps rolled back, and go
on. A rank killed later must resume from the newest step then, not from the old order. Every
step's final loss equals the fault-free run's, bit for bit.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from chaos import TP2, Cluster, events, trajectory
from polling import free_port, wait_for

from stalwart.health.proto import controller_pb2, controller_pb2_grpc
from stalwart.health.rollback import APPLIED_FILE, read_rollback_order

pytestmark = pytest.mark.slow

TOKEN = "rollback-order-token"
STEPS = 16
# A passing check at every save (each step is written verified), and a longer job than the chaos default.
EXTRA = ["--health.golden_every", "2", "--training.steps", str(STEPS)]


def test_controller_ordered_rollback_is_carried_out_once(tmp_path, monkeypatch):
    reference = Cluster(tmp_path / "reference", TP2, extra=EXTRA)
    try:
        reference.start("node0")
        assert reference.wait() == {"node0#0": 0}, reference.logs()
    finally:
        reference.kill_all()
    expected = trajectory(reference.run_dir)

    run_dir = tmp_path / "run"
    token = run_dir / "health" / "token"
    token.parent.mkdir(parents=True)
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    monkeypatch.setenv("STALWART_TOKEN_FILE", str(token))
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
            "--refresh-interval-s",
            "0.5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    # A window to order the rollback in (the first incarnation stays below step 12), then a later fault
    # after the rollback: the old order must not be applied again.
    plan = [
        {"kind": "slow", "step": 5, "rank": 0, "seconds": 2.0, "steps": 7},
        {"kind": "kill_rank", "step": 12, "rank": 1},
    ]
    cluster = Cluster(run_dir, TP2, plan, extra=EXTRA, controller=grpc_addr)
    try:
        cluster.start("node0")
        # Step 6 committed: the rollback to 4 must then flag it rolled back.
        wait_for(
            lambda: any(e["kind"] == "ckpt_commit" and e["step"] == 6 for e in events(run_dir)), 180, "step 6's commit"
        )
        with grpc.insecure_channel(grpc_addr) as channel:
            reply = controller_pb2_grpc.ControllerStub(channel).RequestRollback(
                controller_pb2.RollbackRequest(token=TOKEN, step=4, reason="operator: bad data after step 4"),
                timeout=60,
            )
        assert reply.step == 4
        order = read_rollback_order(run_dir)
        assert cluster.wait(300) == {"node0#0": 0}, cluster.logs()
    finally:
        cluster.kill_all()
        controller.terminate()
        controller.wait(10)

    evs = events(run_dir)
    loads = [e for e in evs if e["kind"] == "ckpt_load" and e.get("rank") == 0]
    ordered = [e for e in loads if e.get("rollback_request") == order.id]
    seen = [(e["step"], e.get("rollback_request")) for e in loads]
    assert [e["step"] for e in ordered] == [4], seen  # carried out, exactly once
    later = [e for e in loads if e["ts"] > ordered[0]["ts"]]
    assert later and all(e["step"] > 4 and "rollback_request" not in e for e in later), (
        seen
    )  # the kill resumed from the newest step
    (rollback,) = [e for e in evs if e["kind"] == "rollback"]
    assert rollback["to_step"] == 4 and rollback["rollback_request"] == order.id and rollback["superseded"], rollback
    assert (run_dir / APPLIED_FILE).is_file()
    killed = [e for e in evs if e["kind"] == "fault_injected" and e.get("fault") == "kill_rank"]
    assert len(killed) == 1 and killed[0]["ts"] > ordered[0]["ts"]

    got = trajectory(run_dir)
    assert max(got) == STEPS and sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == loss, f"step {step}: loss {got[step]!r} after the rollback, {loss!r} fault-free"
