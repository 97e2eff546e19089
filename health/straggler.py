"""Straggler scoring: which ranks are persistently slower than the rest of the job.

In synchronous training every rank's *step* time converges on the slowest rank's (the fast ones
wait in collectives), so the telling figure is a rank's *compute* time: its own forward, backward
and optimizer work. It is used when every scored rank reports it; otherwise step times are used.

A rank's score is the median of its last ``window`` times divided by the median of the other
ranks' medians (leave-one-out, so two ranks still compare fairly and the slow rank does not pull
its own reference up). Medians make one slow step (a GC pause, a checkpoint) invisible; a rank is
a straggler when its score reaches ``threshold`` with at least ``min_samples`` samples. While it
stays one it earns a strike at once and then one per further ``window`` of samples, which the
exclusion policy counts.

A new process in a rank's place (a replacement, a restart: the report's ``pid`` changed) starts a
fresh history, and every process's first ``warmup_steps`` steps are not sampled: a process that
just joined runs its first steps cold (allocator, caches, a peer's state still arriving) and would
otherwise be flagged for it.

Pure logic with explicit timestamps; evaluation is O(ranks x window), run off the RPC path.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StragglerConfig:
    window: int = 20
    min_samples: int = 5
    threshold: float = 1.5
    stale_after_s: float = 300.0  # ranks silent this long (relative to the newest sample) are not scored
    warmup_steps: int = 5  # a new process's first steps, not sampled

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if not 1 <= self.min_samples <= self.window:
            raise ValueError(f"need 1 <= min_samples ({self.min_samples}) <= window ({self.window})")
        if self.threshold <= 1.0:
            raise ValueError(
                f"threshold must be > 1 (got {self.threshold}): it is a ratio to the other ranks' median time"
            )


@dataclass
class RankScore:
    rank: int
    node: str
    step: int
    step_seconds: float
    compute_seconds: float
    ts: float
    score: float = 0.0
    straggler: bool = False


@dataclass
class _RankHistory:
    node: str
    pid: int  # the reporting process (0: not told)
    warmup_left: int  # steps of this process still to skip
    step: int
    ts: float
    step_seconds: float
    compute_seconds: float
    steps: deque[float]
    computes: deque[float]
    since_strike: int  # samples since this rank's last strike


@dataclass
class StragglerDetector:
    config: StragglerConfig = field(default_factory=StragglerConfig)
    _ranks: dict[int, _RankHistory] = field(default_factory=dict)

    def observe(
        self, rank: int, node: str, step: int, step_seconds: float, compute_seconds: float, ts: float, pid: int = 0
    ) -> None:
        """Record one finished step; a repeat of the rank's last step (a resend) is ignored."""
        h = self._ranks.get(rank)
        if h is None or h.node != node or h.pid != pid:
            w = self.config.window
            h = self._ranks[rank] = _RankHistory(
                node, pid, self.config.warmup_steps, step - 1, ts, 0.0, 0.0, deque(maxlen=w), deque(maxlen=w), w
            )
        if step == h.step:
            return
        h.step, h.ts, h.step_seconds, h.compute_seconds = step, ts, step_seconds, compute_seconds
        if h.warmup_left > 0:
            h.warmup_left -= 1
            return
        h.steps.append(step_seconds)
        if compute_seconds > 0:
            h.computes.append(compute_seconds)
        h.since_strike += 1

    def forget_node(self, node: str) -> None:
        """Drop the ranks of a node that left the job: they no longer set or skew the reference."""
        for rank in [r for r, h in self._ranks.items() if h.node == node]:
            del self._ranks[rank]

    def evaluate(self) -> tuple[dict[int, RankScore], list[RankScore]]:
        """Every rank's score, and the stragglers that earned a strike in this evaluation."""
        scores = {
            r: RankScore(r, h.node, h.step, h.step_seconds, h.compute_seconds, h.ts) for r, h in self._ranks.items()
        }
        newest = max((h.ts for h in self._ranks.values()), default=0.0)
        live = {
            r: h
            for r, h in self._ranks.items()
            if newest - h.ts <= self.config.stale_after_s and len(h.steps) >= self.config.min_samples
        }
        use_compute = all(len(h.computes) >= self.config.min_samples for h in live.values())
        medians = {r: statistics.median(h.computes if use_compute else h.steps) for r, h in live.items()}
        if len(medians) < 2:
            return scores, []
        ordered = sorted(medians.values())
        position = {r: i for i, r in enumerate(sorted(medians, key=medians.__getitem__))}
        struck = []
        for rank, median in medians.items():
            reference = _median_without(ordered, position[rank])
            s = scores[rank]
            s.score = median / reference if reference > 0 else 0.0
            s.straggler = s.score >= self.config.threshold
            h = live[rank]
            if s.straggler and h.since_strike >= self.config.window:
                h.since_strike = 0
                struck.append(s)
        return scores, struck


def _median_without(ordered: list[float], i: int) -> float:
    """Median of sorted ``ordered`` with element ``i`` left out, in O(1)."""
    n = len(ordered) - 1

    def at(j: int) -> float:
        return ordered[j if j < i else j + 1]

    return at(n // 2) if n % 2 else (at(n // 2 - 1) + at(n // 2)) / 2
