"""Event logs for the incident tests, shaped like what real runs write (the demo's two nodes of ranks
0-3 and 4-7): agents, healthd, the controller and the trainers, each with the fields it really emits."""

from __future__ import annotations

from typing import Any

T0 = 1_800_000_000.0


class JobLog:
    """A job's events in the order they are added; ``t`` is seconds after ``T0``."""

    def __init__(self, ranks_per_node: int = 4, health_dir: str = "/run/health") -> None:
        self.events: list[dict[str, Any]] = []
        self.health_dir = health_dir
        self.ranks_per_node = ranks_per_node
        self._pid = 1000
        self.step = 0

    def pid(self) -> int:
        self._pid += 1
        return self._pid

    def ev(self, t: float, kind: str, role: str, pid: int, rank: int | None = None, node: Any = None, **fields):
        e = {"v": 1, "ts": T0 + t, "kind": kind, "role": role, "host": "h", "node": node, "pid": pid, "rank": rank}
        e.update(attempt=0, **fields)
        self.events.append(e)
        return e

    def agent(self, t: float, kind: str, node_rank: int, node: str, **fields):
        """An agent's event: the common ``node`` is its node rank; most kinds name its ``node_id`` too."""
        return self.ev(t, kind, "agent", 10 + int(node.removeprefix("node") or 0), node=node_rank, **fields)

    def healthd(self, t: float, kind: str, node: str, **fields):
        return self.ev(t, kind, "healthd", 50 + int(node.removeprefix("node") or 0), node=node, **fields)

    def controller(self, t: float, kind: str, **fields):
        return self.ev(t, kind, "controller", 99, **fields)

    def rendezvous(self, t: float, nodes: list[str], joined: list[str] = ()) -> None:
        """Every agent's round: node ranks in order; ``joined`` nodes also say they joined."""
        world = len(nodes) * self.ranks_per_node
        for rank, node in enumerate(nodes):
            if node in joined:
                self.agent(t, "node_joined", rank, node, node_id=node, nodes=len(nodes), world_size=world)
            self.agent(t, "worker_start", rank, node, node_id=node, world_size=world, nodes=len(nodes), spare=False)

    def incarnation(
        self, t: float, nodes: list[str], steps: int, step_s: float = 1.0, load: int | None = None, tier: str = "local"
    ) -> dict[int, int]:
        """Ranks start at ``t`` (rank 0 steps; the others say where they run), load ``load``, then step.

        Returns rank -> pid; ``self.step`` is the last step taken, ``self.t`` when it ended.
        """
        pids = {r: self.pid() for r in range(len(nodes) * self.ranks_per_node)}
        for rank, pid in pids.items():
            node = nodes[rank // self.ranks_per_node]
            self.ev(t, "clock", "trainer", pid, rank, mono=0.0)
            self.ev(t, "worker_start", "trainer", pid, rank, world_size=len(pids), node_id=node)
        p0 = pids[0]
        self.ev(t + 1.0, "init_done", "trainer", p0, 0, seconds=1.0)
        now = t + 1.0
        if load is not None:
            now += 1.0
            self.ev(now, "ckpt_load", "trainer", p0, 0, step=load, seconds=1.0, tier=tier)
            self.step = load
        for _ in range(steps):
            self.step += 1
            self.ev(now, "step_begin", "trainer", p0, 0, step=self.step)
            now += step_s
            self.ev(now, "step_end", "trainer", p0, 0, step=self.step, step_seconds=step_s, loss=1.0)
            if self.step % 5 == 0:
                self.ev(now + 0.1, "ckpt_commit", "trainer", p0, 0, step=self.step, blocking_seconds=0.0, tier="local")
        self.t = now
        return pids

    def begin_step(self, pids: dict[int, int]) -> None:
        """Rank 0 begins the next step, which the fault stops."""
        self.ev(self.t, "step_begin", "trainer", pids[0], 0, step=self.step + 1)

    def rank_exit(
        self, t: float, node_rank: int, node_id: str, codes: dict[int, int], pids: dict[int, int], blamed: int
    ):
        failures = {str(r): {"exit_code": c, "pid": pids[r]} for r, c in codes.items()}
        how = (
            f"signal SIG{'KILL' if codes[blamed] == -9 else 'TERM'}"
            if codes[blamed] < 0
            else f"exit code {codes[blamed]}"
        )
        return self.agent(
            t,
            "fault_detected",
            node_rank,
            node_id,
            fault="rank_exit",
            target=f"rank{blamed}",
            detector="agent",
            node_id=node_id,
            exit_code=codes[blamed],
            failures=failures,
            detail=f"rank {blamed} ended with {how}; {len(codes)} local rank(s) failed",
        )

    def healthd_kill(self, t: float, node_id: str, ranks: list[int], pids: dict[int, int], reason: str):
        return self.healthd(t, "workers_killed", node_id, pids=[pids[r] for r in ranks], ranks=ranks, reason=reason)

    def hang(
        self, t: float, node_id: str, rank: int, culprit: bool, node_ranks: list[int], pids, last: float, fault="hang"
    ):
        """healthd's report of one stalled rank: ``culprit`` when it found a stopped process on its node."""
        return self.healthd(
            t,
            "fault_detected",
            node_id,
            fault=fault,
            target=f"rank{rank}",
            detector="healthd",
            last_progress_ts=T0 + last,
            detail={
                "phase": "STEP",
                "killed_pids": [pids[r] for r in node_ranks],
                "stacks": [f"{self.health_dir}/stacks-{t:.0f}-rank{r}.txt" for r in node_ranks],
                "why": "process stopped (SIGSTOP or a debugger)" if culprit and fault == "hang" else "no progress",
                "culprit_found_here": culprit,
            },
        )


NODE0, NODE1 = [0, 1, 2, 3], [4, 5, 6, 7]


def chaos_log(health_dir: str = "/run/health") -> JobLog:
    """The demo's chaos plan as its run logs it (two nodes, the fault kinds in the plan's order):
    rank 5 killed, rank 2 SIGSTOPped, a flipped bit, a dead GPU whose restart finds the newest
    checkpoint damaged, node2 lost, a preemption and the requeue."""
    log = JobLog(health_dir=health_dir)
    nodes = ["node0", "node1"]
    log.rendezvous(0.0, nodes, joined=nodes)
    pids = log.incarnation(1.0, nodes, 3)
    # rank 5 is killed; node0's ranks block until healthd there kills them
    log.begin_step(pids)
    t = log.t
    log.rank_exit(t + 1.0, 1, "node1", {4: 1, 5: -9, 6: 1, 7: 1}, pids, blamed=5)
    log.healthd_kill(t + 9.0, "node0", NODE0, pids, "hang: rank1, rank2")
    for r in (1, 2):
        log.hang(t + 9.0, "node0", r, False, NODE0, pids, last=t)
    log.rendezvous(t + 10.0, nodes)
    pids = log.incarnation(t + 11.0, nodes, 6, load=3)
    # rank 2 is stopped: node1 sees its ranks stall first, node0 finds the culprit
    log.begin_step(pids)
    t = log.t
    log.healthd_kill(t + 8.0, "node1", NODE1, pids, "hang: rank5")
    log.hang(t + 8.0, "node1", 5, False, NODE1, pids, last=t)
    log.rank_exit(t + 8.4, 1, "node1", {r: -9 for r in NODE1}, pids, blamed=4)
    log.healthd_kill(t + 10.0, "node0", NODE0, pids, "hang: rank1")
    log.hang(t + 10.0, "node0", 1, True, NODE0, pids, last=t, fault="hang_blocked")
    log.hang(t + 10.0, "node0", 2, True, NODE0, pids, last=t - 0.5)
    log.rendezvous(t + 12.0, nodes)
    pids = log.incarnation(t + 13.0, nodes, 9, load=5)
    # a flipped bit: the replicas disagree, the trainers roll back in place
    t = log.t
    log.ev(
        t + 0.1,
        "fault_detected",
        "trainer",
        pids[0],
        0,
        fault="sdc",
        target="rank1,rank3",
        detector="sdc-fingerprint",
        detail={"step": log.step, "layer": "fingerprint", "undetermined": True},
    )
    log.ev(t + 0.7, "ckpt_load", "trainer", pids[0], 0, step=10, seconds=0.6, tier="local")
    log.ev(t + 0.8, "rollback", "trainer", pids[0], 0, from_step=log.step, to_step=10, reason="sdc (fingerprint)")
    log.step = 10
    for _ in range(12):
        log.step += 1
        log.ev(t + 0.8 + (log.step - 11), "step_begin", "trainer", pids[0], 0, step=log.step)
        log.ev(t + 1.8 + (log.step - 11), "step_end", "trainer", pids[0], 0, step=log.step, step_seconds=1.0)
    log.t = t + 1.8 + 11
    # the dead GPU; node0 re-forms alone, its load finds step 20 damaged and falls back to 15
    log.begin_step(pids)
    t = log.t
    log.healthd_kill(t + 0.5, "node1", NODE1, pids, "gpu fault: gpu0: xid 79")
    log.healthd(
        t + 0.5,
        "fault_detected",
        "node1",
        fault="gpu",
        target="node1/gpu0",
        detector="healthd",
        last_progress_ts=T0 + t,
        detail={"kind": "xid", "code": 79, "killed_pids": [pids[r] for r in NODE1]},
    )
    log.controller(t + 0.6, "node_excluded", node="node1", reason="unhealthy: gpu0: xid 79")
    log.agent(t + 0.9, "node_excluded", 1, "node1", node_id="node1", reason="healthd: gpu0: xid 79")
    log.rank_exit(t + 4.0, 0, "node0", {0: -15, 1: -15, 2: -15, 3: 1}, pids, blamed=3)
    log.rendezvous(t + 6.0, ["node0"])
    log.ev(
        t + 8.0,
        "ckpt_fail",
        "trainer",
        log.pid(),
        0,
        step=20,
        tier="file",
        reason="step 20 at /run/checkpoints/step-00000020 is damaged: __5_0.distcp: crc32 mismatch",
    )
    pids = log.incarnation(t + 7.0, ["node0"], 3, load=15)
    log.rendezvous(log.t + 1.0, ["node0", "node2"], joined=["node2"])
    pids = log.incarnation(log.t + 2.0, ["node0", "node2"], 14, load=18)
    # node2 is lost (agent and ranks killed together); node3 replaces it
    log.begin_step(pids)
    t = log.t
    log.rank_exit(t + 0.5, 0, "node0", {0: 1, 1: -15, 2: -15, 3: -15}, pids, blamed=0)
    log.rendezvous(t + 2.0, ["node0"])
    pids = log.incarnation(t + 3.0, ["node0"], 2, load=30)
    log.rendezvous(log.t + 1.0, ["node0", "node3"], joined=["node3"])
    pids = log.incarnation(log.t + 2.0, ["node0", "node3"], 9, load=32)
    # preemption: the ranks commit step 41 and stop; the scheduler requeues the job on new nodes
    t = log.t
    log.ev(t + 0.5, "ckpt_commit", "trainer", pids[0], 0, step=log.step, tier="local", blocking_seconds=0.4)
    for r in pids:
        log.ev(t + 0.6, "worker_stop", "trainer", pids[r], r, reason="preempted", signalled_ts=T0 + t - 0.3)
    log.rendezvous(t + 20.0, ["node4", "node5"], joined=["node4", "node5"])
    log.ev(t + 21.0, "job_start", "trainer", log.pid(), 0, steps=60)
    log.incarnation(t + 21.0, ["node4", "node5"], 19, load=log.step)
    return log


def write_run(run_dir, log: JobLog) -> None:
    """The log as a run directory: one events file per process, as the processes write them."""
    import json
    from pathlib import Path

    events = Path(run_dir) / "events"
    events.mkdir(parents=True, exist_ok=True)
    by_process: dict[tuple, list[str]] = {}
    for e in log.events:
        by_process.setdefault((e["role"], e["pid"]), []).append(json.dumps(e))
    for (role, pid), lines in by_process.items():
        (events / f"{role}-h-{pid}.jsonl").write_text("\n".join(lines) + "\n")
