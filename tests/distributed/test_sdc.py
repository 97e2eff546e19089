"""Silent data corruption: fingerprints, golden workload, spike replay, and the trainer's rollback."""

from __future__ import annotations

import json
import math
import random
import threading
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks

from stalwart.checkpoint.manager import CheckpointManager
from stalwart.events import read_events
from stalwart.health import sdc
from stalwart.health.daemon import HealthDaemon
from stalwart.health.hang import HangConfig, Phase

CASES = "tests/sdc_cases.py"


def events(run_dir: Path, kind: str) -> list[dict]:
    return sorted((e for e in read_events(run_dir) if e["kind"] == kind), key=lambda e: e["ts"])


# ------------------------------------------------------------------------------------ fingerprints


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fingerprint_is_equal_for_equal_tensors_and_catches_every_single_bit_flip(dtype):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    print(f"seed {seed}")
    rng.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=gen).to(dtype) for n in (1, 7, 4096, 3 * 1024 + 5)]
    reference = sdc.fingerprint(tensors)
    assert torch.equal(reference, sdc.fingerprint([t.clone() for t in tensors]))
    nbits = 8 * tensors[0].element_size()
    for _ in range(300):
        which = rng.randrange(len(tensors))
        index, bit = rng.randrange(tensors[which].numel()), rng.randrange(nbits)
        corrupted = [t.clone() for t in tensors]
        sdc.flip_bit(corrupted[which], index, bit)
        fp = sdc.fingerprint(corrupted)
        changed = (fp != reference).any(dim=1).nonzero().flatten().tolist()
        assert changed == [which], (which, index, bit)


def test_fingerprint_spans_chunks_and_positions():
    """A flip in the second chunk is caught; swapping two different elements is caught too."""
    t = torch.randn(sdc._CHUNK + 17)
    reference = sdc.tensor_fingerprint(t)
    flipped = t.clone()
    sdc.flip_bit(flipped, sdc._CHUNK + 3, 0)
    assert not torch.equal(sdc.tensor_fingerprint(flipped), reference)
    swapped = t.clone()
    swapped[[0, 1]] = t[[1, 0]]
    assert not torch.equal(sdc.tensor_fingerprint(swapped), reference)


def test_flip_bit_flips_exactly_the_bit_and_rejects_bad_positions():
    t = torch.tensor([1.0, 2.0])
    sdc.flip_bit(t, 1, 31)
    assert t.tolist() == [1.0, -2.0]
    sdc.flip_bit(t, 0, 23)  # lowest exponent bit: 1.0 (exponent 127) -> 0.5 (126)
    assert t[0].item() == 0.5
    with pytest.raises(ValueError, match="choose 0..31"):
        sdc.flip_bit(t, 0, 32)
    with pytest.raises(ValueError, match="outside the local shard"):
        sdc.flip_bit(t, 2, 0)


def test_odd_ones_out_majority_and_ties():
    a, b = torch.tensor([1, 2]), torch.tensor([1, 3])
    assert sdc.odd_ones_out([a, a, a]).agree
    assert sdc.odd_ones_out([a, b, a, a]) == sdc.Vote(agree=False, odd=(1,))
    assert sdc.odd_ones_out([a, b]) == sdc.Vote(agree=False, odd=(0, 1), undetermined=True)
    assert sdc.odd_ones_out([a, a, b, b]).undetermined
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert sdc.odd_ones_out([x, x * (1 + 1e-9), x], rtol=1e-6).agree
    assert sdc.odd_ones_out([x, x * (1 + 1e-9), x]).odd == (1,)


# ---------------------------------------------------------------------------------- golden workload


def test_golden_workload_is_deterministic_and_leaves_the_training_rng_alone():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = sdc.golden_workload(torch.device("cpu"))
    assert torch.equal(first, sdc.golden_workload(torch.device("cpu")))
    assert torch.equal(state, torch.get_rng_state())


def test_golden_workload_names_the_rank_that_computes_wrong():
    votes = run_ranks(f"{CASES}:golden_vote", world_size=3, timeout=300, bad_rank=2)
    assert all(v == sdc.Vote(agree=False, odd=(2,)) for v in votes), votes


# ----------------------------------------------------------------------------- spikes and replay


def test_spike_detector_flags_nan_and_spikes_but_not_a_noisy_falling_curve():
    det = sdc.SpikeDetector(factor=10.0, min_history=10)
    rng = random.Random(0)
    for i in range(200):
        loss = 6.0 * math.exp(-i / 40) + 1.5 + rng.gauss(0, 0.05)
        grad_norm = 20.0 * math.exp(-i / 10) + 1.0 + abs(rng.gauss(0, 0.2))
        assert det.check(loss=loss, grad_norm=grad_norm) is None, i
        det.accept(loss=loss, grad_norm=grad_norm)
    assert "non-finite loss" in det.check(loss=float("nan"), grad_norm=1.0)
    assert "non-finite grad_norm" in det.check(loss=1.6, grad_norm=float("inf"))
    assert "loss spike" in det.check(loss=9.0, grad_norm=1.0)
    assert "grad_norm spike" in det.check(loss=1.6, grad_norm=50.0)


def test_replay_verdict():
    good = [2.0, 2.1, 2.2]
    assert sdc.replay_verdict(good, list(good), list(good)).verdict == sdc.Verdict.BAD_DATA
    flaky = sdc.replay_verdict(good, [2.0, 2.1, 9.0], list(good))
    assert (flaky.verdict, flaky.ranks) == (sdc.Verdict.BAD_HARDWARE, (2,))
    disagree = sdc.replay_verdict(good, list(good), [2.0, 7.0, 2.2])
    assert (disagree.verdict, disagree.ranks) == (sdc.Verdict.BAD_HARDWARE, ())
    nan = [float("nan")] * 3
    assert sdc.replay_verdict(nan, list(nan), None).verdict == sdc.Verdict.BAD_DATA


# 2-rank plain DDP, 14 steps: spike detection needs 10 normal steps of history first.
SPIKE_RUN = [
    "--training.steps",
    "14",
    "--training.global_batch_size",
    "4",
    "--parallel.dp_replicate",
    "2",
    "--parallel.dp_shard",
    "1",
    "--checkpoint.enabled",
    "false",
    "--health.golden_every",
    "0",
    "--health.fingerprint_every",
    "0",
    "--health.spike_factor",
    "3",
]


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", ["data", "hardware"])
def test_spike_replay_tells_bad_data_from_bad_hardware(tmp_path, corrupt):
    run_dir = tmp_path / corrupt
    losses = run_ranks(
        f"{CASES}:train",
        world_size=2,
        timeout=420,
        run_dir=str(run_dir),
        overrides=SPIKE_RUN,
        corrupt_step=12,
        corrupt=corrupt,
    )
    faults = events(run_dir, "fault_detected")
    if corrupt == "data":
        assert [(f["fault"], f["target"], f["detector"]) for f in faults] == [("bad_data", "step12", "replay")], faults
    else:
        assert [(f["fault"], f["target"], f["rank"]) for f in faults] == [("sdc", "rank1", 1)], faults
        assert faults[0]["detector"] == "sdc-replay"
    # The anomalous step's update was dropped: training goes on at the loss level it had before.
    assert all(math.isfinite(x) for x in losses[0][12:]) and losses[0][-1] < losses[0][10] + 0.5, losses[0]


# ------------------------------------------------------------------------------ end to end: rollback

# 3 replicas (plain DDP) so that a majority names the corrupted one; checks and saves every 3 steps.
E2E = [
    "--training.steps",
    "9",
    "--training.global_batch_size",
    "6",
    "--parallel.dp_replicate",
    "3",
    "--parallel.dp_shard",
    "1",
    "--checkpoint.interval",
    "3",
    "--health.fingerprint_every",
    "3",
    "--health.golden_every",
    "3",
]


@pytest.mark.slow
def test_flipped_bit_in_one_replica_is_named_and_rolled_back_to_the_verified_step(tmp_path):
    clean = run_ranks(f"{CASES}:train", world_size=3, timeout=420, run_dir=str(tmp_path / "clean"), overrides=E2E)
    assert not events(tmp_path / "clean", "fault_detected") and not events(tmp_path / "clean", "rollback")

    run_dir = tmp_path / "faulty"
    plan = json.dumps(
        [{"kind": "flip_bit", "step": 5, "rank": 1, "bit": 3}]
    )  # a low mantissa bit: invisible in the loss
    env = {"STALWART_FAULT_INJECTION": "1", "STALWART_FAULT_PLAN": plan}
    faulty = run_ranks(f"{CASES}:train", world_size=3, timeout=420, env=env, run_dir=str(run_dir), overrides=E2E)

    (injected,) = [e for e in events(run_dir, "fault_injected") if e["fault"] == "flip_bit"]
    (detected,) = [e for e in events(run_dir, "fault_detected") if e["fault"] == "sdc"]
    assert (detected["target"], detected["rank"], detected["detector"]) == ("rank1", 1, "sdc-fingerprint")
    assert detected["detail"]["params"], detected  # the mismatching parameter is named
    detection_step = detected["detail"]["step"]
    assert injected["step"] <= detection_step < injected["step"] + 3, (injected, detected)  # within one check interval
    (rollback,) = events(run_dir, "rollback")
    assert (rollback["from_step"], rollback["to_step"]) == (6, 3)
    manager = CheckpointManager(str(run_dir / "checkpoints"))
    assert manager.manifest(3).verified and manager.latest() == 9 and manager.manifest(9).verified

    # Rank 0 ran steps 1-6, rolled back, then 4-9: from the restored step on, bit for bit the clean run.
    assert len(faulty[0]) == 12
    assert faulty[0][6:] == clean[0][3:], (faulty[0], clean[0])
    assert faulty[0][:4] == clean[0][:4]  # before the flip


# ----------------------------------------------------------------------------------- heartbeats


@pytest.mark.slow
def test_trainer_heartbeats_reach_a_real_health_daemon(tmp_path, token_file):
    config = HangConfig(initial_limits={p: 120.0 for p in Phase}, floor_s=30.0)
    daemon = HealthDaemon(tmp_path, token_file.read_text().strip(), hang_config=config, probe_interval_s=5.0)
    address = daemon.start()
    seen: dict[int, set[int]] = {}
    phases: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            for r in daemon.status().ranks:
                seen.setdefault(r.rank, set()).add(r.step)
                phases.add(r.phase)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_ranks(
            f"{CASES}:train",
            world_size=2,
            timeout=420,
            run_dir=str(tmp_path),
            overrides=[
                "--training.steps",
                "6",
                "--training.global_batch_size",
                "4",
                "--checkpoint.interval",
                "3",
                "--health.healthd",
                address,
                "--health.heartbeat_interval_s",
                "0.1",
            ],
        )
    finally:
        done.set()
        watcher.join()
        daemon.stop()
    assert set(seen) == {0, 1}
    for rank, steps in seen.items():
        assert len(steps) >= 3 and max(steps) == 6, (rank, sorted(steps))
    assert Phase.STEP in {Phase(daemon_phase_name(p)) for p in phases}
    assert not [e for e in read_events(tmp_path) if e["kind"] == "fault_detected"]


def daemon_phase_name(value: int) -> str:
    from stalwart.health.proto import healthd_pb2

    return healthd_pb2.Phase.Name(value)


def test_quarantine_needs_the_token_and_marks_the_node_unhealthy_without_a_kill(tmp_path):
    from stalwart.health.client import HeartbeatClient
    from stalwart.health.proto import healthd_pb2

    daemon = HealthDaemon(tmp_path, "job-token", probe_interval_s=5.0)
    address = daemon.start()
    client = HeartbeatClient(address, rank=3, local_rank=1, auth="")  # quarantine carries the token itself
    try:
        assert not client.quarantine("sdc", "fingerprint mismatch at step 6", token="wrong")
        assert daemon.status().state == healthd_pb2.HEALTHY
        assert client.quarantine("sdc", "fingerprint mismatch at step 6", token="job-token")
        status = daemon.status()
        assert status.state == healthd_pb2.UNHEALTHY and "rank3: sdc" in status.reasons[0]
        marker = json.loads(daemon.marker_path.read_text())
        assert marker["issues"] == [{"rank": 3, "kind": "sdc", "detail": "fingerprint mismatch at step 6"}]
    finally:
        client.close()
        daemon.stop()
