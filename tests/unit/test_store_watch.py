"""What an agent does about a lost rendezvous store: the decisions of launcher/store_watch.py, on fakes."""

from __future__ import annotations

import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from stalwart.launcher.store_watch import OutageTolerantHandler, StoreWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_short_outage_with_the_round_intact_rebuilds_nothing(capsys):
    clock, reseeds = Clock(), []
    watch = StoreWatch("etcd at e0:2379", expiry_s=15.0, reseed=lambda: reseeds.append(1), clock=clock)
    assert watch.answered(round_intact=True) is None and capsys.readouterr().out == ""
    watch.lost(ConnectionError("refused"))
    watch.lost(ConnectionError("refused again"))  # one line per outage
    clock.now += 3.0
    assert watch.answered(round_intact=True) is None and not watch.down
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "lost etcd at e0:2379 (ConnectionError: refused)" in out[0]
    assert "answers again after 3.0s; membership intact" in out[1] and reseeds == []


def test_an_outage_past_the_keep_alive_expiry_rebuilds_membership(capsys):
    clock = Clock()
    watch = StoreWatch("the store at head:29400", expiry_s=15.0, clock=clock)
    watch.lost(RuntimeError("Broken pipe"))
    clock.now += 16.0
    why = watch.answered(round_intact=True)
    assert why and "gone 16s, past the rendezvous keep-alive expiry (15s)" in why
    assert "re-forming the group to rebuild membership" in capsys.readouterr().out


def test_a_store_that_restarted_empty_is_reseeded_and_membership_rebuilt():
    reseeds = []
    watch = StoreWatch("the store at head:29400", expiry_s=15.0, reseed=lambda: reseeds.append(1), clock=Clock())
    why = watch.answered(round_intact=False)  # even when no call failed in between (a fast restart)
    assert why and "lost this round's keys" in why and reseeds == [1]


class FailingHandler:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def num_nodes_waiting(self) -> int:
        self.calls += 1
        raise RendezvousConnectionError("store gone")

    def next_rendezvous(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise RendezvousConnectionError("store gone")
        return "round info"


def test_the_running_agent_sees_no_waiting_node_while_the_store_is_gone(monkeypatch, capsys):
    watch = StoreWatch("the store at head:29400", expiry_s=15.0)
    inner = FailingHandler(failures=0)
    handler = OutageTolerantHandler(inner, watch, join_timeout_s=30)
    assert handler.num_nodes_waiting() == 0 and watch.down
    assert handler.num_nodes_waiting() == 0 and inner.calls == 1  # a store known to be down is not asked
    assert capsys.readouterr().out.count("lost the store at head:29400") == 1


def test_a_rendezvous_waits_for_the_store_up_to_the_join_timeout(monkeypatch):
    monkeypatch.setattr("stalwart.launcher.store_watch.time.sleep", lambda s: None)
    reseeds = []
    watch = StoreWatch("the store at head:29400", expiry_s=15.0, reseed=lambda: reseeds.append(1))
    handler = OutageTolerantHandler(FailingHandler(failures=3), watch, join_timeout_s=30)
    assert handler.next_rendezvous() == "round info" and not watch.down and len(reseeds) == 3
    gone = OutageTolerantHandler(FailingHandler(failures=10**9), StoreWatch("x", 15.0), join_timeout_s=0)
    with pytest.raises(RendezvousConnectionError):
        gone.next_rendezvous()
