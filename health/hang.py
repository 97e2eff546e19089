"""Adaptive hang detection: a rank hangs when it stops making progress for longer than its limit.

Progress is a new ``beat()`` from the trainer (a new heartbeat timestamp), not the arrival of a
heartbeat message: the heartbeat client resends the latest state from a background thread, which
keeps running while the training thread is stuck in a collective.

The limit is per rank and per phase (``INIT``, ``STEP``, ``CHECKPOINT``, ``EVAL``), because a
checkpoint save legitimately takes far longer than a step. During the first ``warmup_steps`` beats of
a phase the generous ``initial_limits`` apply (compile, allocator warm-up, data pipeline fill); after
that the limit is ``safety_factor x longest interval seen`` in that phase, never below ``floor_s``
(NVIDIA's resiliency extension uses the same scheme with a factor of 5). The first interval of a
phase is left out of the longest-interval statistic once a later one exists, since it carries the
one-off first-iteration costs that would otherwise inflate the limit for the rest of the run.

Pure logic with explicit timestamps, so it is tested with a fake clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Phase(str, enum.Enum):
    INIT = "INIT"
    STEP = "STEP"
    CHECKPOINT = "CHECKPOINT"
    EVAL = "EVAL"


DEFAULT_INITIAL_LIMITS: dict[Phase, float] = {
    Phase.INIT: 300.0,
    Phase.STEP: 60.0,
    Phase.CHECKPOINT: 600.0,
    Phase.EVAL: 300.0,
}


@dataclass(frozen=True)
class HangConfig:
    warmup_steps: int = 3
    safety_factor: float = 5.0
    floor_s: float = 2.0
    initial_limits: dict[Phase, float] = field(default_factory=lambda: dict(DEFAULT_INITIAL_LIMITS))

    def __post_init__(self) -> None:
        if self.warmup_steps < 1:
            raise ValueError(
                f"warmup_steps must be >= 1 (got {self.warmup_steps}): the first beat of a phase has no interval to "
                "adapt to"
            )
        if self.safety_factor < 1.0:
            raise ValueError(
                f"safety_factor must be >= 1 (got {self.safety_factor}); a factor below 1 flags every normal step as "
                "a hang"
            )
        if self.floor_s <= 0:
            raise ValueError(f"floor_s must be > 0 (got {self.floor_s})")
        missing = set(Phase) - {Phase(p) for p in self.initial_limits}
        if missing:
            raise ValueError(
                f"initial_limits lacks phases {sorted(p.value for p in missing)}; give a limit in seconds for every "
                "phase"
            )


@dataclass(frozen=True)
class Hang:
    rank: int
    phase: Phase
    last_progress_ts: float
    limit_s: float
    waited_s: float


@dataclass
class _PhaseStats:
    beats: int = 0
    first_interval: float = 0.0
    longest_later_interval: float = 0.0


@dataclass
class _RankState:
    phase: Phase
    last_progress_ts: float
    phase_stats: dict[Phase, _PhaseStats] = field(default_factory=dict)
    reported: bool = False


class HangDetector:
    """Per-rank, per-phase adaptive progress timeouts; see the module docstring."""

    def __init__(self, config: HangConfig | None = None) -> None:
        self.config = config or HangConfig()
        self._ranks: dict[int, _RankState] = {}

    def observe(self, rank: int, phase: Phase | str, ts: float) -> bool:
        """Record a heartbeat; returns True when it is progress (newer than the last one seen)."""
        phase = Phase(phase)
        state = self._ranks.get(rank)
        if state is None:
            state = self._ranks[rank] = _RankState(phase=phase, last_progress_ts=ts)
            state.phase_stats[phase] = _PhaseStats(beats=1)
            return True
        if ts <= state.last_progress_ts and phase == state.phase:
            return False
        stats = state.phase_stats.setdefault(phase, _PhaseStats())
        if phase == state.phase:
            interval = ts - state.last_progress_ts
            if stats.beats == 1 and stats.first_interval == 0.0:
                stats.first_interval = interval
            else:
                stats.longest_later_interval = max(stats.longest_later_interval, interval)
        # A phase change restarts the clock for the new phase at this beat; its interval is not a
        # sample of either phase's normal duration.
        stats.beats += 1
        state.phase = phase
        state.last_progress_ts = max(ts, state.last_progress_ts)
        state.reported = False
        return True

    def limit(self, rank: int) -> float:
        """The current limit for ``rank`` in its current phase (seconds without progress)."""
        state = self._ranks[rank]
        stats = state.phase_stats[state.phase]
        cfg = self.config
        initial = float(cfg.initial_limits[state.phase])
        if stats.beats < cfg.warmup_steps:
            return initial
        longest = stats.longest_later_interval or stats.first_interval
        if longest <= 0.0:
            return initial
        return max(cfg.floor_s, cfg.safety_factor * longest)

    def check(self, now: float) -> list[Hang]:
        """Ranks without progress past their limit; each hang is reported once until progress resumes."""
        hangs = []
        for rank, state in self._ranks.items():
            if state.reported:
                continue
            limit = self.limit(rank)
            waited = now - state.last_progress_ts
            if waited > limit:
                state.reported = True
                hangs.append(Hang(rank, state.phase, state.last_progress_ts, limit, waited))
        return hangs

    def forget(self, rank: int) -> None:
        """Drop a rank (its process exited or was replaced by a restarted worker group)."""
        self._ranks.pop(rank, None)

    def ranks(self) -> list[int]:
        return sorted(self._ranks)

    def last_progress(self, rank: int) -> tuple[Phase, float]:
        state = self._ranks[rank]
        return state.phase, state.last_progress_ts
