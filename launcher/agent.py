"""The node agent: torch's ``LocalElasticAgent`` with stalwart's membership rules.

What it adds, each on one of the agent's documented extension points:

- **Resize**: after every rendezvous the world is narrowed to the whole nodes the layout can use
  (:class:`~stalwart.launcher.plan.NodePlan`); TP/CP/PP stay fixed, the trainer derives DP
  from ``WORLD_SIZE`` and keeps the global batch by accumulation, and resumes by resharding.
- **Hot spares**: nodes past that count run idle ranks (``RANK >= WORLD_SIZE``); they join at the
  next re-rendezvous, and end with the job when a training node's agent marks the round done.
- **Exclusion**: an entry for this node in ``RUN/excluded_nodes.json``, or healthd reporting the node
  UNHEALTHY, raises :class:`NodeExcluded` (the launcher exits 93; the others re-form).
- **Lost peers**: torch's agent only notices a lost node when its own ranks fail, which a cut
  network cable never causes (collectives just wait). Each agent bumps a counter in the round's
  store every second and watches the next node's; a silent peer marks the group UNHEALTHY.
- **Stops**: a failed group is stopped within ``failure_stop_s`` (its ranks are likely stuck in a
  collective); a healthy one (a node joins) gets the preemption grace to checkpoint first.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from torch.distributed.elastic.agent.server.api import RunResult, Worker, WorkerGroup, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import LogsSpecs

from stalwart.events import EventKind, EventLog
from stalwart.launcher.exclusion import ExclusionWatch, exclude_node
from stalwart.launcher.plan import NodePlan
from stalwart.launcher.services import HealthWatch
from stalwart.launcher.worker import EXIT_REJOIN

log = logging.getLogger(__name__)

DONE_KEY = "stalwart/job_done"


class NodeExcluded(Exception):
    """This node is on the exclusion list (or healthd found it UNHEALTHY): it must leave the job."""


@dataclass(frozen=True)
class AgentOptions:
    node_id: str
    plan: NodePlan
    grace_s: float = 60.0
    failure_stop_s: float = 5.0
    peer_timeout_s: float = 30.0
    health_poll_s: float = 2.0


class PeerWatch:
    """Ring liveness in one rendezvous round: beat my counter, watch my successor's (O(1) per node)."""

    def __init__(
        self, store: Any, group_rank: int, group_world_size: int, timeout_s: float, interval_s: float = 1.0
    ) -> None:
        self.store = store
        self.peer = (group_rank + 1) % group_world_size if group_world_size > 1 else None
        self.timeout_s = timeout_s
        self._key = f"stalwart/alive/{group_rank}"
        self._last: int | None = None
        self._seen = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(interval_s,), name="peer-beat", daemon=True)
        self._thread.start()

    def _beat(self, interval_s: float) -> None:
        while True:
            try:
                self.store.add(self._key, 1)
            except Exception as e:  # the store is gone: the agent's own rendezvous calls fail too
                log.warning("peer liveness beat failed: %s", e)
            if self._stop.wait(interval_s):
                return

    def silent_for(self) -> float:
        """Seconds since the watched peer last beat, 0 while it does (or there is none)."""
        if self.peer is None:
            return 0.0
        value, now = int(self.store.add(f"stalwart/alive/{self.peer}", 0)), time.monotonic()
        if value != self._last:
            self._last, self._seen = value, now
        return now - self._seen

    def stop(self) -> None:
        self._stop.set()


class StalwartAgent(LocalElasticAgent):
    def __init__(
        self,
        spec: WorkerSpec,
        logs_specs: LogsSpecs,
        opts: AgentOptions,
        exclusion: ExclusionWatch,
        health: HealthWatch | None,
        events: EventLog,
    ) -> None:
        super().__init__(spec, logs_specs, start_method="spawn", shutdown_timeout=opts.grace_s)
        self.opts = opts
        self.exclusion = exclusion
        self.health = health
        self.events = events
        self.spare = False
        self.rounds = 0
        self._peers: PeerWatch | None = None
        self._next_health = 0.0
        self._next_peer_check = 0.0

    # ------------------------------------------------------------ membership

    def check_membership(self, failed: bool = False) -> None:
        """Raise NodeExcluded when this node must leave; healthd is asked every few seconds, at once on a failure."""
        reason = self.exclusion.reason()
        now = time.monotonic()
        if reason is None and self.health is not None and (failed or now >= self._next_health):
            self._next_health = now + self.opts.health_poll_s
            reason = self.health.unhealthy_reason()
            if reason is not None:
                exclude_node(self.exclusion.list.path.parent, self.opts.node_id, reason)
        if reason is not None:
            self._shutdown_timeout = self.opts.failure_stop_s
            raise NodeExcluded(reason)

    def _assign_worker_ranks(
        self, store: Any, group_rank: int, group_world_size: int, spec: WorkerSpec
    ) -> list[Worker]:
        workers = super()._assign_worker_ranks(store, group_rank, group_world_size, spec)
        active = self.opts.plan.active_nodes(group_world_size)
        world = active * spec.local_world_size
        for w in workers:
            w.world_size = w.role_world_size = world
        was_spare, first = self.spare, self.rounds == 0
        self.spare = group_rank >= active
        self.rounds += 1
        if self._peers is not None:
            self._peers.stop()
        self._peers = PeerWatch(store, group_rank, group_world_size, self.opts.peer_timeout_s)
        self.events.node = group_rank
        role = "hot spare" if self.spare else f"{spec.local_world_size} ranks of {world}"
        print(
            f"stalwart launch: node {self.opts.node_id} is node rank {group_rank} of {group_world_size} "
            f"({active} training): {role}",
            flush=True,
        )
        if not self.spare and (first or was_spare):
            self.events.emit(EventKind.NODE_JOINED, node_id=self.opts.node_id, nodes=group_world_size, world_size=world)
        return workers

    # ------------------------------------------------------------ the agent's hooks

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        spec = worker_group.spec
        self.events.attempt = spec.max_restarts - self._remaining_restarts
        self.events.emit(
            EventKind.WORKER_START,
            node_id=self.opts.node_id,
            world_size=worker_group.workers[0].world_size,
            nodes=worker_group.group_world_size,
            spare=self.spare,
        )
        return super()._start_workers(worker_group)

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        self.check_membership()
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.FAILED:
            self._record_failure(result)
            self.check_membership(failed=True)  # healthd kills the ranks of a node it marks UNHEALTHY
        if result.state != WorkerState.HEALTHY or self._peers is None:
            return result
        now = time.monotonic()
        if now < self._next_peer_check:
            return result
        self._next_peer_check = now + 1.0
        if self.spare and self._store.check([DONE_KEY]):
            return RunResult(
                state=WorkerState.SUCCEEDED, return_values={w.global_rank: None for w in worker_group.workers}
            )
        silent = self._peers.silent_for()
        if silent > self.opts.peer_timeout_s:
            msg = (
                f"node rank {self._peers.peer} sent no liveness beat for {silent:.0f}s (lost node or network partition)"
            )
            print(f"stalwart launch: {msg}; restarting the worker group", flush=True)
            self.events.emit(
                EventKind.FAULT_DETECTED,
                fault="node_lost",
                target=f"node{self._peers.peer}",
                detector="agent",
                last_progress_ts=time.time() - silent,
                detail=msg,
            )
            return RunResult(state=WorkerState.UNHEALTHY)
        return result

    def _record_failure(self, result: RunResult) -> None:
        """One ``fault_detected`` per failed group, naming the rank that failed first (the cause; the rest followed)."""
        failures = {rank: f for rank, f in result.failures.items() if f.exitcode != EXIT_REJOIN}
        if not failures:
            return

        # The cause, most likely first: killed by a signal; then failed with an error (often a closed
        # connection to the dead peer); last SIGTERM, which torch sends the survivors itself.
        # Torch's failure timestamps are whole seconds: they only break ties.
        def blame(kv: tuple[int, Any]) -> tuple:
            code = kv[1].exitcode
            return (code == -signal.SIGTERM, code >= 0, kv[1].timestamp, kv[0])

        rank, first = min(failures.items(), key=blame)
        how = f"signal {signal.Signals(-first.exitcode).name}" if first.exitcode < 0 else f"exit code {first.exitcode}"
        self.events.emit(
            EventKind.FAULT_DETECTED,
            fault="rank_exit",
            target=f"rank{rank}",
            detector="agent",
            node_id=self.opts.node_id,
            exit_code=first.exitcode,
            # Every failed local rank, so that readers can tell who healthd killed (its pids), who
            # torch stopped (SIGTERM) and who failed with an error.
            failures={str(r): {"exit_code": f.exitcode, "pid": f.pid} for r, f in sorted(failures.items())},
            detail=f"rank {rank} ended with {how}; {len(failures)} local rank(s) failed",
        )

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        healthy = worker_group.state == WorkerState.HEALTHY
        self._shutdown(timeout=self.opts.grace_s if healthy else self.opts.failure_stop_s)

    def _exit_barrier(self) -> None:
        if not self.spare and self._store is not None:
            try:
                self._store.set(DONE_KEY, b"1")  # spare nodes of this round end with us
            except Exception as e:
                log.warning("could not mark the round done: %s", e)
        super()._exit_barrier()

    def close(self) -> None:
        if self._peers is not None:
            self._peers.stop()
