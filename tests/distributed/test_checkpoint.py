"""Checkpoint save/commit/verify/load/prune on local disk, on S3 (moto) and across a reshard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks
from s3_server import LocalS3
from storage_faults import read_only, small_tmpfs
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from stalwart.checkpoint.catalog import LastSaveFailed
from stalwart.checkpoint.checkpointer import Checkpointer, SaveCadence, SaveMeta
from stalwart.checkpoint.manager import CheckpointError, CheckpointManager, NoCheckpointError
from stalwart.checkpoint.retention import steps_to_keep
from stalwart.events import EventLog, read_events
from stalwart.model.args import get_flavor
from stalwart.runtime.train import build_model


def _model_and_optimizer(seed: int, train: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(get_flavor("debug"), torch.device("cpu"), seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if train:
        tokens = torch.arange(32).reshape(2, 16) % 200
        model(tokens).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **extra) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, **extra}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _events(run_dir: Path, log: EventLog) -> list[dict]:
    log.flush()
    return list(read_events(run_dir))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip_model_optimizer_and_objects(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "run", role="trainer", rank=0)
    manager = CheckpointManager(str(tmp_path / "ckpt"), events=log)
    model, optimizer = _model_and_optimizer(seed=1)
    rng = torch.get_rng_state()
    state = _state(model, optimizer, loader={"position": 123, "epoch": 2}, **{manager.rank_key("rng"): rng})
    manager.save(5, state, layout={"dp_shard": 1}, config_hash="abc")

    assert manager.committed_steps() == [5] and manager.latest() == 5
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step-00000005"]
    manifest = manager.manifest(5)
    assert (manifest.step, manifest.world_size, manifest.layout, manifest.config_hash) == (5, 1, {"dp_shard": 1}, "abc")
    assert ".metadata" in manifest.files and all(len(f.checksum) == 8 for f in manifest.files.values())

    fresh_model, fresh_optimizer = _model_and_optimizer(seed=2, train=False)
    target = _state(
        fresh_model,
        fresh_optimizer,
        loader={"position": 0, "epoch": 0},
        **{manager.rank_key("rng"): torch.zeros_like(rng)},
    )
    assert manager.load(target) == 5
    set_state_dict(fresh_model, fresh_optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])

    _assert_same(model.state_dict(), fresh_model.state_dict())
    saved_optim, loaded_optim = optimizer.state_dict(), fresh_optimizer.state_dict()
    for index, moments in saved_optim["state"].items():
        _assert_same(moments, loaded_optim["state"][index])
    assert target["loader"] == {"position": 123, "epoch": 2}
    assert torch.equal(target["rng.rank0"], rng)
    kinds = [e["kind"] for e in _events(tmp_path / "run", log)]
    assert kinds.count("ckpt_stage") == 1 and kinds.count("ckpt_commit") == 1 and kinds.count("ckpt_load") == 1
    manager.close()
    log.close()


def test_interrupted_saves_stay_invisible(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    manager = CheckpointManager(str(root))
    manager.save(1, {"w": torch.ones(4)})
    # A writer that fails half way: the lambda cannot be pickled once DCP writes the objects.
    with pytest.raises(CheckpointError, match="step 2 was not saved"):
        manager.save(2, {"w": torch.full((4,), 2.0), "bad": lambda: None})
    leftovers = [n for n in os.listdir(root) if n.startswith("step-00000002.tmp-")]
    assert leftovers == []  # a failed save's partial directory goes at once (on a full disk it holds the space)
    # A save that wrote everything but died before its marker, and one whose marker vanished.
    manager.save(3, {"w": torch.full((4,), 3.0)})
    os.remove(root / "step-00000003" / "COMMITTED")
    assert manager.committed_steps() == [1] and manager.latest() == 1
    target = {"w": torch.zeros(4)}
    assert manager.load(target) == 1 and torch.equal(target["w"], torch.ones(4))
    with pytest.raises(NoCheckpointError, match="step 3 is not committed"):
        manager.load(target, step=3)
    # The next commit cleans up what the failures left behind.
    manager.save(4, {"w": torch.full((4,), 4.0)})
    assert sorted(os.listdir(root)) == ["step-00000001", "step-00000004"]
    with pytest.raises(FileExistsError):  # the commit marker is create-if-absent
        manager.storage.write_bytes("step-00000004/COMMITTED", b"{}", exclusive=True)


@pytest.mark.parametrize("async_saves", [True, False], ids=["async", "sync"])
def test_on_read_only_storage_a_periodic_save_is_skipped_and_only_the_last_one_raises(
    tmp_path: Path, async_saves: bool
) -> None:
    log = EventLog(tmp_path / "run", role="trainer", rank=0)
    with small_tmpfs(tmp_path / "ckpt", size_mb=16) as root:
        manager = CheckpointManager(str(root), events=log)
        cadence = SaveCadence(interval=2, async_saves=async_saves)
        checkpointer = Checkpointer(manager, {"w": torch.ones(4)}, cadence, SaveMeta())
        assert checkpointer.maybe_save(2)
        manager.wait()
        with read_only(root):
            checkpointer.maybe_save(4)  # fails (in the background when async): reported as ckpt_fail, never raised
            with pytest.raises(
                LastSaveFailed,
                match=r"the checkpoint of the last step \(5\) was not saved: .*mounted read-only.*step 2 is the newest",
            ):
                checkpointer.maybe_save(5, last=True)
        assert manager.committed_steps() == [2] and manager.verify(2) == []
        assert checkpointer.maybe_save(6)  # writable again: the next interval commits
        checkpointer.close()
    log.close()
    assert [e["step"] for e in read_events(tmp_path / "run") if e["kind"] == "ckpt_fail"] == [4, 5]


def test_resaving_a_step_after_rollback_replaces_it(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(1, {"w": torch.ones(2)})
    manager.save(1, {"w": torch.full((2,), 5.0)})
    assert os.listdir(tmp_path / "ckpt") == ["step-00000001"]
    target = {"w": torch.zeros(2)}
    assert manager.load(target) == 1 and torch.equal(target["w"], torch.full((2,), 5.0))


def test_damaged_shard_falls_back_to_previous_step(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "run", role="trainer", rank=0)
    root = tmp_path / "ckpt"
    manager = CheckpointManager(str(root), events=log)
    for step in (1, 2):
        manager.save(step, {"w": torch.full((64,), float(step))})
    shard = next((root / "step-00000002").glob("*.distcp"))
    _flip_byte(shard)

    target = {"w": torch.zeros(64)}
    assert manager.load(target) == 1
    assert torch.equal(target["w"], torch.ones(64))
    fails = [e for e in _events(tmp_path / "run", log) if e["kind"] == "ckpt_fail"]
    assert len(fails) == 1 and fails[0]["step"] == 2
    assert shard.name in fails[0]["reason"] and "crc32" in fails[0]["reason"]

    (root / "step-00000001" / shard.name).unlink()
    with pytest.raises(NoCheckpointError, match="start without --resume") as err:
        manager.load(target)
    assert "missing" in str(err.value)
    log.close()


def test_retention_keeps_last_periodic_and_newest_verified(tmp_path: Path) -> None:
    assert steps_to_keep(range(1, 10), keep_last=2, keep_every=4, protected=[3]) == {3, 4, 8, 9}
    root = tmp_path / "ckpt"
    manager = CheckpointManager(str(root), keep_last=2, keep_every=4)
    stale = root / "step-00000003.tmp-dead"
    in_flight = root / "step-00000099.tmp-beef"
    for step in range(1, 10):
        manager.save(step, {"w": torch.full((2,), float(step))})
        if step == 2:
            manager.mark_verified(2)
        if step == 5:
            stale.mkdir()
            in_flight.mkdir()
    assert manager.committed_steps() == [2, 4, 8, 9]
    assert manager.latest(verified_only=True) == 2
    assert not stale.exists() and in_flight.exists()
    manager.mark_verified(9)
    manager.save(10, {"w": torch.zeros(2)})
    assert manager.committed_steps() == [4, 8, 9, 10]
    target = {"w": torch.ones(2)}
    assert manager.load(target, step="latest-verified") == 9 and torch.equal(target["w"], torch.full((2,), 9.0))


def test_async_save_stages_then_commits_in_background(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "run", role="trainer", rank=0)
    manager = CheckpointManager(str(tmp_path / "ckpt"), events=log)
    big = torch.arange(8 << 20, dtype=torch.float32)  # 32 MiB: writing it outlasts the return
    manager.save(1, {"w": big}, async_=True)
    assert manager.committed_steps() == []
    big.fill_(-1.0)  # mutations after staging must not reach the checkpoint
    manager.save(2, {"w": torch.ones(3)}, async_=True)  # finishes step 1 first
    assert manager.committed_steps() == [1]
    assert manager.wait() == 2 and manager.poll()
    assert manager.committed_steps() == [1, 2]

    target = {"w": torch.zeros(8 << 20)}
    assert manager.load(target, step=1) == 1
    assert torch.equal(target["w"], torch.arange(8 << 20, dtype=torch.float32))
    events = _events(tmp_path / "run", log)
    stage = next(e for e in events if e["kind"] == "ckpt_stage" and e["step"] == 1)
    commit = next(e for e in events if e["kind"] == "ckpt_commit" and e["step"] == 1)
    assert stage["blocking_seconds"] < commit["seconds"] and commit["bytes"] > 32 << 20
    manager.close()
    log.close()


def test_fsdp_save_on_two_ranks_loads_on_one(tmp_path: Path) -> None:
    url = str(tmp_path / "ckpt")
    saved = run_ranks("tests/ckpt_cases.py:save_fsdp", world_size=2, timeout=120, url=url)[0]
    model, optimizer = _model_and_optimizer(seed=99, train=False)
    manager = CheckpointManager(url)
    assert manager.committed_steps() == [1, 2] and manager.manifest(2).world_size == 2
    state = _state(model, optimizer, step=0)
    assert manager.load(state) == 2 and state["step"] == 2
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _assert_same(saved["model"], model.state_dict())
    _, optim_sd = get_state_dict(model, optimizer)
    _assert_same(saved["exp_avg"], {fqn: st["exp_avg"] for fqn, st in optim_sd["state"].items()})


@pytest.fixture(scope="module")
def s3():
    server = LocalS3()
    server.start()
    yield server
    server.stop()


class _StopServerWhenSaved:
    """A stateful object whose state_dict() takes S3 down: the outage starts as the save begins."""

    def __init__(self, server: LocalS3) -> None:
        self.server = server

    def state_dict(self) -> dict:
        self.server.stop()
        return {"x": torch.zeros(1)}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_s3_round_trip_and_outage(s3: LocalS3, tmp_path: Path) -> None:
    s3.make_bucket("ckpt")
    url = "s3://ckpt/run-1"
    manager = CheckpointManager(url, s3.storage_options(), keep_last=2)
    model, optimizer = _model_and_optimizer(seed=3)
    manager.save(1, _state(model, optimizer))
    assert manager.committed_steps() == [1]

    with pytest.raises(CheckpointError, match="step 2 was not saved"):
        manager.save(2, {**_state(model, optimizer), "outage": _StopServerWhenSaved(s3)})
    s3.start()  # moto keeps the objects across the restart, as S3 keeps them across an outage
    assert manager.committed_steps() == [1]

    # The outage begins while the async save writes: nothing of step 3 may become visible.
    manager.save(3, _state(model, optimizer, pad=torch.zeros(4 << 20)), async_=True)
    s3.stop()
    with pytest.raises(CheckpointError, match="step 3 did not commit"):
        manager.wait()
    with pytest.raises(CheckpointError, match="retry when the store is reachable") as err:
        manager.load({"w": torch.zeros(1)})  # an outage is no reason to start from scratch
    assert not isinstance(err.value, NoCheckpointError)
    s3.start()
    assert manager.committed_steps() == [1]

    fresh_model, fresh_optimizer = _model_and_optimizer(seed=4, train=False)
    target = _state(fresh_model, fresh_optimizer)
    assert CheckpointManager(url, s3.storage_options()).load(target) == 1
    set_state_dict(fresh_model, fresh_optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    _assert_same(model.state_dict(), fresh_model.state_dict())

    manager.save(4, {"w": torch.ones(2)})
    assert manager.committed_steps() == [1, 4]
    step4 = next(n for n in manager.storage.list_dir() if n.startswith("step-00000004"))
    with pytest.raises(FileExistsError):  # If-None-Match: a committed marker is never replaced
        manager.storage.write_bytes(f"{step4}/COMMITTED", b"{}", exclusive=True)
    assert [
        n for n in manager.storage.list_dir() if ".tmp-" in n and n.startswith(("step-00000002", "step-00000003"))
    ] == []

    # An async save that fails is reported by the next save, which still goes ahead.
    manager.save(5, {"bad": lambda: None}, async_=True)
    manager.save(6, {"w": torch.ones(2)})
    assert manager.committed_steps() == [4, 6]
    manager.close()


def test_a_restart_after_a_rollback_never_resumes_from_the_rolled_back_steps(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(1, {"w": torch.full((4,), 1.0)}, verified=True)
    for step in (2, 3):  # saved after the corruption happened, before it was found
        manager.save(step, {"w": torch.full((4,), float(step))})
    target = {"w": torch.zeros(4)}
    assert manager.rollback(target, reason="sdc", from_step=3) == 1
    assert [manager.manifest(s).rolled_back for s in (1, 2, 3)] == [False, True, True]
    assert manager.load(target) == 1, "a restart must not pick up the corrupted newer steps"
    assert manager.load(target, step=3) == 3, "asking for a step by number still gets it"
    manager.save(2, {"w": torch.full((4,), 20.0)})  # training went on after the rollback
    assert manager.load(target) == 2 and torch.equal(target["w"], torch.full((4,), 20.0))
    manager.close()
