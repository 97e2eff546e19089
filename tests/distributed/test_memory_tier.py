"""The host-memory tier: peer copies survive a lost node, the newest complete copy among tiers wins."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks

from stalwart.checkpoint.manager import CheckpointManager, NoCheckpointError
from stalwart.checkpoint.memory_tier import MemoryTier, holder_of, scan, write_copy
from stalwart.events import EventLog, read_events


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_peer_placement_is_next_node_same_local_rank() -> None:
    assert [holder_of(r, 8, 4) for r in range(8)] == [4, 5, 6, 7, 0, 1, 2, 3]
    assert [holder_of(r, 6, 2) for r in range(6)] == [2, 3, 4, 5, 0, 1]
    assert [holder_of(r, 3, 3) for r in range(3)] == [1, 2, 0]  # one node: the next rank
    assert holder_of(0, 1, 1) == 0


def test_torn_and_foreign_copies_are_ignored(tmp_path: Path) -> None:
    good = write_copy(tmp_path, 0, 5, "fp", b"x" * 100)
    torn = write_copy(tmp_path, 1, 5, "fp", b"y" * 100)
    torn.write_bytes(torn.read_bytes()[:-10])  # a write that stopped half way
    flipped = write_copy(tmp_path, 2, 5, "fp", b"z" * 100)
    _flip_byte(flipped)
    write_copy(tmp_path, 3, 5, "other-layout", b"w" * 100)
    (tmp_path / "rank00004.step00000005.by00004.mem.partial-1234").write_bytes(b"partial")
    assert scan(tmp_path, "fp") == {(0, 5): good}


def test_newest_complete_copy_among_tiers(tmp_path: Path) -> None:
    run = tmp_path / "run"
    log = EventLog(run, role="trainer", rank=0)
    memory = MemoryTier(str(tmp_path / "shm"), "fp", events=log)
    manager = CheckpointManager(str(tmp_path / "ckpt"), events=log, memory=memory)
    state = lambda v: {"w": torch.full((8,), float(v)), "progress": {"step": v}}  # noqa: E731
    memory.save(2, state(2))
    manager.save(3, state(3))
    target = state(0)
    assert manager.load(target) == 3 and manager.last_load_tier == "local" and target["progress"] == {"step": 3}
    memory.save(4, state(4))
    assert (
        manager.load(target) == 4
        and manager.last_load_tier == "memory"
        and torch.equal(target["w"], torch.full((8,), 4.0))
    )
    assert sorted(p.name for p in (tmp_path / "shm").iterdir()) == [
        "rank00000.step00000004.by00000.mem"
    ]  # older copies go
    assert manager.load(target, step=3) == 3 and manager.last_load_tier == "local"
    manager.mark_verified(3)
    assert (
        manager.load(target, step="latest-verified") == 3 and manager.last_load_tier == "local"
    )  # memory: never verified
    # A torn memory copy is ignored: the persistent step is loaded instead.
    copy = next((tmp_path / "shm").iterdir())
    copy.write_bytes(copy.read_bytes()[:-3])
    assert manager.load(target) == 3 and manager.last_load_tier == "local"
    memory.discard()
    assert list((tmp_path / "shm").iterdir()) == []
    manager.close()
    log.flush()
    loads = [(e["step"], e["tier"]) for e in read_events(run) if e["kind"] == "ckpt_load"]
    assert loads == [(3, "local"), (4, "memory"), (3, "local"), (3, "local"), (3, "local")]
    stages = [(e["step"], e["tier"]) for e in read_events(run) if e["kind"] == "ckpt_stage"]
    assert stages == [(2, "memory"), (3, "local"), (4, "memory")]
    log.close()


def test_rollback_loads_and_records_the_event(tmp_path: Path) -> None:
    run = tmp_path / "run"
    log = EventLog(run, role="trainer", rank=0)
    manager = CheckpointManager(str(tmp_path / "ckpt"), events=log, memory=MemoryTier(str(tmp_path / "shm"), "fp"))
    for step in (1, 2):
        manager.save(step, {"w": torch.full((4,), float(step))})
    manager.mark_verified(1)
    manager.memory.save(3, {"w": torch.full((4,), 3.0)})
    target = {"w": torch.zeros(4)}
    assert manager.rollback(target, to="latest", reason="retry", from_step=3) == 3 and target["w"][0] == 3.0
    assert manager.rollback(target, reason="sdc: replica mismatch", from_step=3) == 1 and target["w"][0] == 1.0
    # Going back past step 2 flagged it and dropped the memory copies: only a request by number gets it.
    assert manager.load(target) == 1 and manager.memory.newest_complete() is None
    assert manager.rollback(target, to=2, reason="loss spike", from_step=3) == 2 and target["w"][0] == 2.0
    with pytest.raises(NoCheckpointError, match="step 7 is not committed"):
        manager.rollback(target, to=7, reason="typo", from_step=3)
    manager.close()
    log.flush()
    rollbacks = [
        (e["from_step"], e["to_step"], e["reason"], e["tier"]) for e in read_events(run) if e["kind"] == "rollback"
    ]
    assert rollbacks == [
        (3, 3, "retry", "memory"),
        (3, 1, "sdc: replica mismatch", "local"),
        (3, 2, "loss spike", "local"),
    ]
    log.close()


class _PruneWhileLoading:
    """A stateful entry whose state_dict() runs retention while the load of an old step is under way."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager
        self.pruned: list[str] = []

    def state_dict(self) -> dict:
        self.pruned = self.manager.prune()
        return {"x": torch.zeros(1)}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_retention_spares_the_step_being_read(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path / "ckpt"), keep_last=3)
    for step in (1, 2, 3):
        manager.save(step, {"w": torch.full((2,), float(step)), "p": {"x": torch.zeros(1)}})
    manager.keep_last = 1  # retention tightened while step 1 is read
    guard = _PruneWhileLoading(manager)
    target = {"w": torch.zeros(2), "p": guard}
    assert manager.load(target, step=1) == 1 and target["w"][0] == 1.0
    assert guard.pruned == ["step-00000002"]  # step 1 was being read, step 3 is the newest
    assert manager.committed_steps() == [1, 3]


@pytest.mark.slow
def test_lost_node_recovers_from_peer_copies(tmp_path: Path) -> None:
    """4 ranks on 2 simulated nodes: node 1's host memory is lost; its ranks' state comes from node 0."""
    kwargs = dict(
        url=str(tmp_path / "ckpt"), memory_dir=str(tmp_path / "shm" / "node{node}"), run_dir=str(tmp_path / "run")
    )
    env = {"LOCAL_WORLD_SIZE": "2"}
    saved = run_ranks("tests/memory_tier_cases.py:save", world_size=4, timeout=180, env=env, **kwargs)[0]
    assert len(list((tmp_path / "shm" / "node1").iterdir())) == 4  # own copies of ranks 2, 3 + peers of 0, 1
    shutil.rmtree(tmp_path / "shm" / "node1")  # the node is gone, and its tmpfs with it

    loaded = run_ranks("tests/memory_tier_cases.py:load", world_size=4, timeout=180, env=env, **kwargs)
    for rank, out in enumerate(loaded):
        assert (out["step"], out["tier"], out["progress"]) == (3, "memory", {"step": 3, "rank": rank})
        for name, tensor in saved[3].items():
            torch.testing.assert_close(out["full"][name], tensor, rtol=0, atol=0, msg=name)
    loads = {e["rank"]: e for e in read_events(tmp_path / "run") if e["kind"] == "ckpt_load"}
    assert [loads[r]["peer_bytes"] > 0 for r in range(4)] == [False, False, True, True]

    # Damage rank 0's only copy left: step 3 is incomplete, so storage's step 1 is what loads.
    _flip_byte(next((tmp_path / "shm" / "node0").glob("rank00000.step00000003.by00000.mem")))
    loaded = run_ranks("tests/memory_tier_cases.py:load", world_size=4, timeout=180, env=env, **kwargs)
    assert {(out["step"], out["tier"]) for out in loaded} == {(1, "local")}
    for name, tensor in saved[1].items():
        torch.testing.assert_close(loaded[0]["full"][name], tensor, rtol=0, atol=0, msg=name)
