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
- **A lost store** (:mod:`~stalwart.launcher.store_watch`): the ranks keep training; peers are not
  judged while it is gone; when it answers again and the round's membership did not survive, the
  group re-forms.
- **Stops**: a failed group is stopped within ``failure_stop_s`` (its ranks are likely stuck in a
  collective); a healthy one (a node joins) gets the preemption grace to checkpoint first.
- **Replacing a lost rank** (in-process recovery, ``replace_lost_ranks``): a rank killed by a signal
  is not a reason to stop the group. The agent starts one process with the same global rank and
  ``$STALWART_REPLACEMENT`` (the generation the lost rank trained in, read from the job store); the
  survivors re-form around it in their own processes (runtime/recovery.py). A rank that exits with
  an error, or more losses than ``max_replacements``, still restart the whole group. The new process
  comes from the node's **warm spare** when there is one: a process that has already imported torch
  and the trainer and waits on stdin for a lost rank's environment (launcher/worker.py); the agent
  then starts the next spare.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from torch.distributed.elastic.agent.server.api import RunResult, Worker, WorkerGroup, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import LogsSpecs

from stalwart.events import EventKind, EventLog
from stalwart.jobenv import REPLACEMENT_ENV, WARM_SPARE_ENV
from stalwart.launcher.exclusion import ExclusionWatch, exclude_node
from stalwart.launcher.plan import NodePlan
from stalwart.launcher.services import HealthWatch
from stalwart.launcher.store_watch import StoreWatch
from stalwart.launcher.worker import EXIT_REJOIN
from stalwart.parallel.reform import JobStore

log = logging.getLogger(__name__)

DONE_KEY = "stalwart/job_done"
SPARE_RESTOCK_S = 1.0  # the next warm spare starts this long after one was used (its import would slow the recovery)


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
    replace_lost_ranks: bool = False
    max_replacements: int = 10
    job_store: str = ""  # host:port of the store the ranks form their world on


class PeerWatch:
    """Ring liveness in one rendezvous round: beat my counter, watch my successor's (O(1) per node)."""

    def __init__(
        self, store: Any, group_rank: int, group_world_size: int, timeout_s: float, interval_s: float = 1.0
    ) -> None:
        self.store = store
        self.peer = (group_rank + 1) % group_world_size if group_world_size > 1 else None
        self.timeout_s = timeout_s
        self._key = f"stalwart/alive/{group_rank}"
        self._member_key = f"stalwart/member/{group_rank}"
        store.set(self._member_key, b"1")  # gone when the store lost the round (restarted empty)
        self._last: int | None = None
        self._seen = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(interval_s,), name="peer-beat", daemon=True)
        self._thread.start()

    def _beat(self, interval_s: float) -> None:
        while True:
            try:
                self.store.add(self._key, 1)
            except Exception as e:  # the store is gone: the agent reports it (StoreWatch)
                log.debug("peer liveness beat failed: %s", e)
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

    def round_intact(self) -> bool:
        """This round's keys are still in the store (a store that restarted empty has lost them)."""
        return self.store.check([self._member_key])

    def restart_clock(self) -> None:
        """Forget the silence measured so far: nobody could beat while the store was gone."""
        self._last, self._seen = None, time.monotonic()

    def stop(self) -> None:
        self._stop.set()


class AdoptedProcess:
    """A warm spare turned worker, in the shape torch's process context expects of its handlers."""

    def __init__(self, proc: subprocess.Popen, local_rank: int) -> None:
        self.proc = proc
        self.local_rank_id = local_rank

    def close(self, death_sig: signal.Signals | None = None) -> None:
        try:
            os.killpg(self.proc.pid, death_sig or signal.SIGTERM)
        except ProcessLookupError:
            pass


class StalwartAgent(LocalElasticAgent):
    def __init__(
        self,
        spec: WorkerSpec,
        logs_specs: LogsSpecs,
        opts: AgentOptions,
        exclusion: ExclusionWatch,
        health: HealthWatch | None,
        events: EventLog,
        store_watch: StoreWatch | None = None,
    ) -> None:
        super().__init__(spec, logs_specs, start_method="spawn", shutdown_timeout=opts.grace_s)
        self.opts = opts
        self.store_watch = store_watch or StoreWatch("the rendezvous store", expiry_s=15.0)
        self.exclusion = exclusion
        self.health = health
        self.events = events
        self.spare = False
        self.rounds = 0
        self._peers: PeerWatch | None = None
        self._next_health = 0.0
        self._next_peer_check = 0.0
        self.replacements = 0
        self._job_store: JobStore | None = None
        self._spare: subprocess.Popen | None = None
        self._next_spare_at: float | None = None  # after a replacement: the next spare, once the new rank is in

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
        pids = super()._start_workers(worker_group)
        if self.opts.replace_lost_ranks and not self.spare:
            self._ensure_spare()
        return pids

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        self.check_membership()
        if (
            self.opts.replace_lost_ranks
            and self._pcontext is not None
            and hasattr(self._pcontext, "subprocess_handlers")
        ):
            result = self._monitor_replacing(worker_group)
        else:
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
        try:
            if self.spare and self._store.check([DONE_KEY]):
                return RunResult(
                    state=WorkerState.SUCCEEDED, return_values={w.global_rank: None for w in worker_group.workers}
                )
            intact = self._peers.round_intact()
            silent = self._peers.silent_for()
        except Exception as e:  # the store is gone: the ranks train on, peers cannot be judged
            self.store_watch.lost(e)
            return result
        if self.store_watch.down or not intact:
            self._peers.restart_clock()
            why = self.store_watch.answered(intact)
            if why is None:
                return result
            self.events.emit(EventKind.FAULT_DETECTED, fault="store_lost", target="store", detector="agent", detail=why)
            return RunResult(state=WorkerState.UNHEALTHY)
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

    # ------------------------------------------------------------ replacing lost ranks

    def _monitor_replacing(self, worker_group: WorkerGroup) -> RunResult:
        """torch's monitor, except that a rank killed by a signal is replaced instead of failing the group."""
        from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

        pc = self._pcontext
        if self._next_spare_at is not None and time.monotonic() >= self._next_spare_at:
            self._next_spare_at = None
            self._ensure_spare()
        done, failures = [], {}
        for local_rank, handler in sorted(pc.subprocess_handlers.items()):
            code = handler.proc.poll()
            if code is None:
                continue
            if code == 0:
                done.append(local_rank)
            elif code < 0 and -code != signal.SIGTERM and self._replaceable(pc):
                self._replace(worker_group, local_rank, code)
            else:
                worker = worker_group.workers[local_rank]
                failures[worker.global_rank] = ProcessFailure(
                    local_rank, handler.proc.pid, code, pc.error_files[local_rank]
                )
        if failures:  # torch stops the rest and restarts the group (_stop_workers)
            return RunResult(state=WorkerState.FAILED, failures=failures)
        if len(done) == len(pc.subprocess_handlers):
            return RunResult(
                state=WorkerState.SUCCEEDED, return_values={w.global_rank: None for w in worker_group.workers}
            )
        return RunResult(state=WorkerState.HEALTHY)

    def _replaceable(self, pc: Any) -> bool:
        """A lost rank is replaced while the budget lasts and nobody on this node has finished training yet."""
        finished = any(h.proc.poll() == 0 for h in pc.subprocess_handlers.values())
        return not finished and self.replacements < self.opts.max_replacements

    def _replace(self, worker_group: WorkerGroup, local_rank: int, code: int) -> None:
        """Start a new process for ``local_rank`` with the same global rank; the survivors re-form around it."""
        from torch.distributed.elastic.multiprocessing.subprocess_handler import get_subprocess_handler

        started = time.monotonic()
        pc = self._pcontext
        worker = worker_group.workers[local_rank]
        old_pid = pc.subprocess_handlers[local_rank].proc.pid
        store = self._store_for(worker_group)
        try:
            generation = store.generation_of(worker.global_rank)
        except Exception:  # it died before it formed: the replacement joins whatever the survivors form next
            generation = store.generation()
        store.advance(generation)  # the survivors do the same when they notice; one move either way
        env = {**pc.envs[local_rank], REPLACEMENT_ENV: str(generation)}
        spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is None and not pc.stdouts[local_rank]:
            spare.stdin.write(json.dumps(env).encode() + b"\n")  # the lost rank's place, to a process that has imported
            spare.stdin.close()
            handler = AdoptedProcess(spare, local_rank)
        else:
            for stream in (pc.stdouts[local_rank], pc.stderrs[local_rank]):
                if stream and os.path.exists(stream):  # keep the lost rank's log: the new process would truncate it
                    os.replace(stream, f"{stream}.{old_pid}")
            handler = get_subprocess_handler(
                entrypoint=pc.entrypoint,
                args=pc.args[local_rank],
                env=env,
                stdout=pc.stdouts[local_rank],
                stderr=pc.stderrs[local_rank],
                local_rank_id=local_rank,
            )
        pc.subprocess_handlers[local_rank] = handler
        worker.id = handler.proc.pid
        self.replacements += 1
        self._next_spare_at = time.monotonic() + SPARE_RESTOCK_S
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        self.events.emit(
            EventKind.FAULT_DETECTED,
            fault="rank_exit",
            target=f"rank{worker.global_rank}",
            detector="agent",
            node_id=self.opts.node_id,
            detail=f"rank {worker.global_rank} ended with {how}; replaced in place",
        )
        self.events.emit(
            EventKind.RANK_REPLACED,
            replaced_rank=worker.global_rank,
            local_rank=local_rank,
            exit_code=code,
            old_pid=old_pid,
            new_pid=handler.proc.pid,
            generation=generation,
            spare=isinstance(handler, AdoptedProcess),
            seconds=time.monotonic() - started,
        )
        self.events.flush()
        print(
            f"stalwart launch: rank {worker.global_rank} (pid {old_pid}) ended with {how}; started pid "
            f"{handler.proc.pid} in its place, the others re-form around it",
            flush=True,
        )

    def _ensure_spare(self) -> None:
        """A warm spare for this node's next lost rank (it imports the trainer now, while nothing waits)."""
        if self._spare is not None and self._spare.poll() is None:
            return
        pc = self._pcontext
        env = {**os.environ, **pc.envs[0], WARM_SPARE_ENV: "1"}
        self._spare = subprocess.Popen(
            [pc.entrypoint, *map(str, pc.args[0])], env=env, stdin=subprocess.PIPE, start_new_session=True
        )

    def _stop_spare(self) -> None:
        if self._spare is not None and self._spare.poll() is None:
            self._spare.stdin.close()  # a closed stdin: the spare exits
            try:
                self._spare.wait(10)
            except subprocess.TimeoutExpired:
                self._spare.kill()
        self._spare = None

    def _store_for(self, worker_group: WorkerGroup) -> JobStore:
        """The job store, under this rendezvous round's name (the ranks' MASTER_ADDR:MASTER_PORT)."""
        from stalwart.parallel.job_store import StoreAddress, open_store

        round_id = f"{worker_group.master_addr}:{worker_group.master_port}"
        if self._job_store is None or self._job_store.round_id != round_id:
            store = (
                self._job_store.store
                if self._job_store is not None
                else open_store(StoreAddress.parse(self.opts.job_store))
            )
            self._job_store = JobStore(store, round_id)
        return self._job_store

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
        self._stop_spare()
