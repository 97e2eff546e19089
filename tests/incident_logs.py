"""Event logs for the incident tests, shaped like what real runs write (the demo's two nodes of ranks
0-3 and 4-7): agents, healthd, the controller and the trainers, each with the fields it really emits."""

from __future__ import annotations

from typing import Any

T0 = 1_800_000_000.0


class JobLog:
    """A job's events in the order they are added; ``t`` is seconds after ``T0``."""

    def __init__(self, ranks_per_node: int = 4) -> None:
        self.events: list[dict[str, Any]] = []
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
                "stacks": [f"/run/health/stacks-x-rank{r}.txt" for r in node_ranks],
                "why": "process stopped (SIGSTOP or a debugger)" if culprit and fault == "hang" else "no progress",
                "culprit_found_here": culprit,
            },
        )
