"""The agent's view of the rendezvous store: one line when it is lost, one when it is back, and what then.

The ranks never touch the rendezvous store while they train (their process group has a store of
its own, hosted by rank 0 of each round), so losing it (the etcd quorum, the head node) need not
stop the job. What stops working is membership: a lost peer or a node that wants to join is not
seen until the store answers again. So the agent keeps its ranks running, says once what is gone,
and when the store answers again decides whether the round's membership survived:

- the store lost the round's keys (a head-node store that restarted empty), or
- it was gone longer than the rendezvous keep-alive expiry (``keep_alive_interval`` ×
  ``keep_alive_max_attempt``): torch drops every node whose heartbeat is that old, this one
  included, at the first sync after the outage;

in either case the round no longer knows its members, and the agent re-forms the group (a new
rendezvous round: membership rebuilt). A shorter outage with the keys intact costs nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousHandler, RendezvousInfo

log = logging.getLogger(__name__)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class StoreWatch:
    """Outage bookkeeping for one store; prints the launcher's lines about it."""

    def __init__(
        self,
        describe: str,
        expiry_s: float,
        reseed: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.describe = describe
        self.expiry_s = expiry_s
        self.reseed = reseed  # what the rendezvous backend needs in a store that restarted empty
        self.clock = clock
        self.down_since: float | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def lost(self, error: BaseException) -> None:
        """A store call failed; the first failure of an outage is reported."""
        if self.down_since is not None:
            return
        self.down_since = self.clock()
        print(
            f"stalwart launch: lost {self.describe} ({first_line(error)}); the ranks keep training, but lost "
            "peers and joining nodes are not seen until it answers again",
            flush=True,
        )

    def answered(self, round_intact: bool) -> str | None:
        """The store answered; returns why membership must be rebuilt, or None when nothing was lost."""
        if self.down_since is None and round_intact:
            return None
        gone_s = 0.0 if self.down_since is None else self.clock() - self.down_since
        self.down_since = None
        if not round_intact:
            why = f"{self.describe} lost this round's keys (it restarted empty)"
            self.reseed()
        elif gone_s >= self.expiry_s:
            why = f"{self.describe} was gone {gone_s:.0f}s, past the rendezvous keep-alive expiry ({self.expiry_s:g}s)"
        else:
            print(f"stalwart launch: {self.describe} answers again after {gone_s:.1f}s; membership intact", flush=True)
            return None
        print(f"stalwart launch: {why}: re-forming the group to rebuild membership", flush=True)
        return why


class OutageTolerantHandler(RendezvousHandler):
    """torch's rendezvous handler, with the two calls a running agent makes on its own made outage-proof.

    ``num_nodes_waiting`` (polled while the ranks train) answers 0 while the store is gone instead
    of ending the agent, without asking it (a call on a dead store costs its connect timeout, and
    the agent's own probe says when it is back); ``next_rendezvous`` waits for the store, up to the
    join timeout, instead of failing at the first refused connection. Everything else is torch's.
    """

    def __init__(self, inner: RendezvousHandler, watch: StoreWatch, join_timeout_s: float) -> None:
        self.inner = inner
        self.watch = watch
        self.join_timeout_s = join_timeout_s

    def next_rendezvous(self) -> RendezvousInfo:
        deadline = time.monotonic() + self.join_timeout_s
        while True:
            try:
                info = self.inner.next_rendezvous()
            except RendezvousConnectionError as e:
                self.watch.lost(e)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
                try:
                    self.watch.reseed()
                except Exception as again:  # still gone
                    log.debug("store still unreachable: %s", again)
                continue
            if self.watch.down:
                self.watch.answered(round_intact=True)  # a fresh round: its membership is new
            return info

    def num_nodes_waiting(self) -> int:
        if self.watch.down:
            return 0
        try:
            return self.inner.num_nodes_waiting()
        except Exception as e:  # RendezvousConnectionError, or a store error of the backend's own
            self.watch.lost(e)
            return 0

    def get_backend(self) -> str:
        return self.inner.get_backend()

    def is_closed(self) -> bool:
        return self.inner.is_closed()

    def set_closed(self) -> None:
        self.inner.set_closed()

    def get_run_id(self) -> str:
        return self.inner.get_run_id()

    def shutdown(self) -> bool:
        return self.inner.shutdown()

    @property
    def use_agent_store(self) -> bool:
        return self.inner.use_agent_store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
