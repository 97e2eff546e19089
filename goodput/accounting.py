"""Goodput accounting: where every second of a job's wall-clock time went, from its event log.

The report is a pure function of the events (``stalwart.events``). The method:

1. **Clock skew.** Every host's timestamps are shifted by one offset so that they read in the
   reference host's clock (the host of the lowest trainer rank). Synchronous ranks finish a step
   within milliseconds of each other, so the offset of host H is the median, over steps that both
   hosts completed, of ``ts_ref(step_end) - ts_H(step_end)`` (steps keyed by attempt, step and
   occurrence, each host's value the median over its ranks). Hosts with no trainer step in
   common with the reference (agents or controllers alone on a host) keep offset 0.
   ``since``/``until`` and all report timestamps are in the reference clock.
2. **Incarnations.** Trainer processes are grouped into incarnations of the worker group: each
   process of the lowest rank starts one, and every other process joins the one whose lowest-rank
   process it overlaps most in time. (Restart counts cannot key this: every agent counts its own,
   and a job relaunched by hand starts again at 0.) The step timeline of an incarnation is that of
   its lowest rank (all ranks step in lockstep, so counting every rank would multiply time by the
   world size).
3. **Lost progress.** Walking the step timeline in time order, a step occurrence is thrown away
   when a later ``step_begin``/``step_end`` has a step number <= its own (the step was
   recomputed), when a later ``ckpt_load`` restores an earlier step, or when a ``rollback`` goes
   back before it. A step begun but never finished by a dead incarnation is lost too, up to the
   incarnation's last sign of life (its last event, or the ``last_progress_ts`` of the fault
   detected for it, whichever is earlier).
4. **Intervals, then one category per instant.** Every category is an interval set on the
   corrected time axis (a checkpoint's blocking part is ``[ts - blocking_seconds, ts]``, a
   step's data stall the first ``data_seconds`` of ``[end - step_seconds, end]``). Where
   intervals overlap, the category earlier in :data:`PRIORITY` owns the instant; instants no
   interval covers are ``other``. So productive time plus the badput categories sum to the
   wall time exactly, whatever the log looks like.

5. **Incidents.** The faults, planned interruptions and their consequences, one incident per root
   cause with its costs: :mod:`stalwart.goodput.incidents`.

Wall time runs from the earliest evidence of the job (its first event, or an ``init_done``
whose ``seconds`` reach further back) to its last event, clipped to ``[since, until]``.
"""

from __future__ import annotations

import bisect
import itertools
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from stalwart.goodput.incidents import Incident, find_incidents

PRODUCTIVE = "productive"
# Badput categories in report order; ``other`` is whatever no event explains.
CATEGORIES = (
    "startup",
    "checkpoint_save",
    "checkpoint_load",
    "lost_progress",
    "detection_latency",
    "restart_downtime",
    "data_stall",
    "hot_spare_wait",
    "other",
)
# Who owns an instant claimed by several intervals, highest first. Explicitly measured costs
# (checkpoint blocking) beat step time; step time beats the inferred gaps around failures.
PRIORITY = (
    "checkpoint_save",
    "checkpoint_load",
    "lost_progress",
    "data_stall",
    PRODUCTIVE,
    "detection_latency",
    "hot_spare_wait",
    "startup",
    "restart_downtime",
)
_RANK = {name: i for i, name in enumerate(PRIORITY)}
# Faults found while the job keeps stepping: their detection is no stall.
_NO_STALL_FAULTS = frozenset({"straggler", "bad_data"})
_PROGRESS_KINDS = frozenset({"step_end", "ckpt_stage", "ckpt_commit", "ckpt_load", "init_done"})


@dataclass
class Segment:
    """A maximal stretch of time owned by one category (``productive`` or a badput name)."""

    start: float
    end: float
    category: str


@dataclass
class StepRecord:
    """One occurrence of a step on the reference rank's timeline."""

    step: int
    attempt: int
    incarnation: int
    start: float
    end: float
    data_seconds: float
    loss: float | None
    kept: bool = True
    discarded_at: float | None = None  # when a restore or a recompute threw it away


@dataclass
class GoodputReport:
    wall_start: float
    wall_end: float
    wall_seconds: float
    productive_seconds: float
    goodput: float
    badput: dict[str, float]
    incidents: list[Incident]
    steps_kept: int
    steps_lost: int
    last_step: int | None
    incarnations: int
    clock_offsets: dict[str, float]
    segments: list[Segment] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    events_dropped: int = 0  # events the processes gave up writing (a full disk): this report never saw them
    event_write_failures: int = 0  # failed event writes that were retried

    def seconds(self, category: str) -> float:
        return self.productive_seconds if category == PRODUCTIVE else self.badput[category]


@dataclass
class _Process:
    host: str
    pid: Any
    rank: int
    attempt: int
    events: list[dict[str, Any]]  # sorted by corrected ts

    @property
    def first(self) -> float:
        return self.events[0]["ts"]

    @property
    def last(self) -> float:
        return self.events[-1]["ts"]


@dataclass
class _Incarnation:
    index: int
    attempt: int
    processes: list[_Process]
    start: float = 0.0  # worker start (earliest evidence)
    ready: float | None = None  # last init_done
    last_event: float = 0.0
    last_progress: float = 0.0

    @property
    def reference(self) -> _Process:
        return min(self.processes, key=lambda p: (p.rank, p.first))


def _num(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def estimate_clock_offsets(events: list[dict[str, Any]]) -> dict[str, float]:
    """Per host, seconds to add to its ``ts`` to read the reference host's clock (see module doc)."""
    trainers = [e for e in events if e.get("role") == "trainer" and isinstance(e.get("rank"), int)]
    hosts = {str(e.get("host")) for e in events}
    if not trainers:
        return {h: 0.0 for h in hosts}
    reference = str(min(trainers, key=lambda e: (e["rank"], e["ts"])).get("host"))
    # host -> (attempt, step, occurrence) -> [ts of every rank on that host]
    per_host: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_process: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for e in trainers:
        if e["kind"] == "step_end" and isinstance(e.get("step"), int):
            by_process[(str(e.get("host")), e.get("pid"), e["rank"])].append(e)
    for (host, _, _), ends in by_process.items():
        seen: dict[int, int] = defaultdict(int)
        for e in sorted(ends, key=lambda e: e["ts"]):  # one host's clock: raw order is fine
            key = (e.get("attempt", 0), e["step"], seen[e["step"]])
            seen[e["step"]] += 1
            per_host[host][key].append(e["ts"])
    ref = per_host.get(reference, {})
    offsets = {h: 0.0 for h in hosts}
    for host, keyed in per_host.items():
        if host == reference:
            continue
        diffs = [statistics.median(ref[k]) - statistics.median(v) for k, v in keyed.items() if k in ref]
        if diffs:
            offsets[host] = statistics.median(diffs)
    return offsets


def _incarnations(events: list[dict[str, Any]]) -> list[_Incarnation]:
    procs: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("role") == "trainer":
            procs[(str(e.get("host")), e.get("pid"))].append(e)
    processes = []
    for (host, pid), evs in procs.items():
        rank = next((e["rank"] for e in evs if isinstance(e.get("rank"), int)), 0)
        attempt = next((int(e["attempt"]) for e in evs if isinstance(e.get("attempt"), int)), 0)
        processes.append(_Process(host, pid, rank, attempt, evs))
    processes.sort(key=lambda p: p.first)
    # Every worker group has one process of the lowest rank: each such process anchors an
    # incarnation, and every other process joins the anchor its lifetime overlaps most (the
    # nearest start breaks ties). Restart counts cannot key this: each agent counts its own, so a
    # node that joined late runs attempt 0 beside ranks on attempt 5 in the same group.
    lowest = min(p.rank for p in processes) if processes else 0
    anchors = [p for p in processes if p.rank == lowest]
    groups: dict[int, list[_Process]] = {i: [a] for i, a in enumerate(anchors)}
    for p in processes:
        if p.rank == lowest:
            continue
        best = max(
            range(len(anchors)),
            key=lambda i: (
                min(p.last, anchors[i].last) - max(p.first, anchors[i].first),
                -abs(p.first - anchors[i].first),
            ),
        )
        groups[best].append(p)
    incs = sorted(groups.values(), key=lambda ps: min(p.first for p in ps))
    out = []
    for i, ps in enumerate(incs):
        inc = _Incarnation(index=i, attempt=ps[0].attempt, processes=ps)
        starts, readies = [], []
        for p in ps:
            starts.append(p.first)
            for e in p.events:
                if e["kind"] == "init_done":
                    readies.append(e["ts"])
                    starts.append(e["ts"] - _num(e.get("seconds")))
        inc.start = min(starts)
        inc.ready = max(readies) if readies else None
        inc.last_event = max(p.last for p in ps)
        progress = [e["ts"] for p in ps for e in p.events if e["kind"] in _PROGRESS_KINDS]
        inc.last_progress = max(progress) if progress else inc.start
        out.append(inc)
    return out


def _step_timeline(
    incs: list[_Incarnation], events: list[dict[str, Any]], faults: list[dict[str, Any]]
) -> tuple[list[StepRecord], list[tuple[float, float, int]]]:
    """Reference-rank step occurrences (kept flag set) and partial steps lost to a death."""
    timeline: list[tuple[float, int, str, dict[str, Any], _Incarnation | None]] = []
    for inc in incs:
        for e in inc.reference.events:
            if e["kind"] in ("step_begin", "step_end") and isinstance(e.get("step"), int):
                timeline.append((e["ts"], 1, e["kind"], e, inc))
    # Restores and rollbacks from any process discard steps past the restored one.
    for e in events:
        if e["kind"] == "ckpt_load" and isinstance(e.get("step"), int):
            timeline.append((e["ts"], 0, "restore", {"step": e["step"]}, None))
        elif e["kind"] == "rollback" and isinstance(e.get("to_step"), int):
            timeline.append((e["ts"], 0, "restore", {"step": e["to_step"]}, None))
    timeline.sort(key=lambda t: (t[0], t[1]))
    records: list[StepRecord] = []
    live: list[StepRecord] = []  # completed, not (yet) recomputed, ascending step
    begins: dict[tuple[int, int], float] = {}
    open_begin: dict[int, tuple[int, float]] = {}  # incarnation -> (step, ts) of an unfinished step
    for ts, _, kind, e, inc in timeline:
        step = e["step"]
        horizon = step if kind == "restore" else step - 1  # steps > horizon are recomputed
        while live and live[-1].step > horizon:
            gone = live.pop()
            gone.kept, gone.discarded_at = False, ts
        if kind == "step_begin":
            begins[(inc.index, step)] = ts
            open_begin[inc.index] = (step, ts)
        elif kind == "step_end":
            seconds = _num(e.get("step_seconds"), -1.0)
            start = ts - seconds if seconds >= 0 else begins.get((inc.index, step), ts)
            rec = StepRecord(
                step,
                inc.attempt,
                inc.index,
                start,
                ts,
                min(_num(e.get("data_seconds")), ts - start),
                e.get("loss") if isinstance(e.get("loss"), (int, float)) else None,
            )
            records.append(rec)
            live.append(rec)
            if open_begin.get(inc.index, (None,))[0] == step:
                del open_begin[inc.index]
    partial = []
    for inc in incs:
        if inc.index in open_begin:
            step, begun = open_begin[inc.index]
            ref = inc.reference
            end = ref.last
            for f in faults:  # the victim's last progress bounds the work it did
                if f["ts"] >= begun and isinstance(f.get("last_progress_ts"), (int, float)):
                    end = min(end, max(begun, f["last_progress_ts"]))
            partial.append((begun, max(begun, end), inc.index))
    return records, partial


def _resolve(intervals: list[tuple[float, float, str]], lo: float, hi: float) -> list[Segment]:
    """Sweep the intervals; each instant goes to the highest-priority category covering it."""
    points: list[tuple[float, int, str]] = []
    for a, b, cat in intervals:
        a, b = max(a, lo), min(b, hi)
        if b > a:
            points += [(a, 1, cat), (b, -1, cat)]
    points.sort(key=lambda p: p[0])
    count: dict[str, int] = defaultdict(int)
    segments: list[Segment] = []
    cursor, i = lo, 0
    while cursor < hi:
        while i < len(points) and points[i][0] <= cursor:
            count[points[i][2]] += points[i][1]
            i += 1
        nxt = points[i][0] if i < len(points) else hi
        active = [c for c, n in count.items() if n > 0]
        cat = min(active, key=_RANK.__getitem__) if active else "other"
        if segments and segments[-1].category == cat and segments[-1].end == cursor:
            segments[-1].end = nxt
        else:
            segments.append(Segment(cursor, nxt, cat))
        cursor = nxt
    return segments


def _event_log_trouble(evs: list[dict[str, Any]]) -> tuple[int, int]:
    """(events dropped, event writes retried) over every process; each process's counts are cumulative."""
    newest: dict[tuple[Any, Any], tuple[int, int]] = {}
    for e in evs:
        if e["kind"] == "events_dropped":
            key = (e.get("host"), e.get("pid"))
            old = newest.get(key, (0, 0))
            newest[key] = (max(old[0], int(_num(e.get("dropped")))), max(old[1], int(_num(e.get("write_failures")))))
    return sum(d for d, _ in newest.values()), sum(f for _, f in newest.values())


def compute_goodput(
    events: Iterable[dict[str, Any]], since: float | None = None, until: float | None = None
) -> GoodputReport:
    """The goodput report of a job from its events (any order; see the module docstring)."""
    raw = [e for e in events if isinstance(e, dict) and isinstance(e.get("ts"), (int, float)) and "kind" in e]
    if not raw:
        raise ValueError("no events to account for: is this the run directory of a job that started?")
    offsets = estimate_clock_offsets(raw)
    evs = []
    for e in raw:
        shift = offsets.get(str(e.get("host")), 0.0)
        c = dict(e, ts=e["ts"] + shift)
        if isinstance(e.get("last_progress_ts"), (int, float)):
            c["last_progress_ts"] = e["last_progress_ts"] + shift
        evs.append(c)
    evs.sort(key=lambda e: e["ts"])

    incs = _incarnations(evs)
    # An agent's worker_start for an attempt marks when its workers were launched: start-up
    # (process spawn, imports) begins there, before the trainers' first events.
    agent_starts = [e for e in evs if e["kind"] == "worker_start" and e.get("role") != "trainer"]
    for prev_end, inc in zip([float("-inf")] + [i.last_progress for i in incs], incs):
        launches = [e["ts"] for e in agent_starts if prev_end <= e["ts"] <= inc.start]
        inc.start = min([inc.start] + launches)
    faults = [e for e in evs if e["kind"] == "fault_detected"]
    records, partial = _step_timeline(incs, evs, faults)

    first = min([evs[0]["ts"]] + [inc.start for inc in incs])
    last = evs[-1]["ts"]
    lo = first if since is None else max(first, since)
    hi = last if until is None else min(last, until)
    hi = max(lo, hi)

    intervals: list[tuple[float, float, str]] = []
    for r in records:
        cat = PRODUCTIVE if r.kept else "lost_progress"
        if r.kept and r.data_seconds > 0:
            intervals.append((r.start, r.start + r.data_seconds, "data_stall"))
            intervals.append((r.start + r.data_seconds, r.end, cat))
        else:
            intervals.append((r.start, r.end, cat))
    intervals += [(a, b, "lost_progress") for a, b, _ in partial]
    job_starts = [e["ts"] for e in evs if e["kind"] == "job_start"]
    for inc in incs:
        begin = min([inc.start] + [t for t in job_starts if t <= inc.start and inc.index == 0])
        intervals.append((begin, inc.ready if inc.ready is not None else inc.last_event, "startup"))
    for prev, nxt in itertools.pairwise(incs):
        intervals.append((prev.last_progress, nxt.start, "restart_downtime"))
    joins = [e["ts"] for e in evs if e["kind"] == "node_joined"]  # sorted: evs is
    for e in evs:
        kind = e["kind"]
        if kind in ("ckpt_stage", "ckpt_commit"):
            intervals.append((e["ts"] - _num(e.get("blocking_seconds")), e["ts"], "checkpoint_save"))
        elif kind == "ckpt_load":
            intervals.append((e["ts"] - _num(e.get("seconds")), e["ts"], "checkpoint_load"))
        elif kind == "fault_detected" and e.get("fault") not in _NO_STALL_FAULTS:
            intervals.append((_last_progress(e, records), e["ts"], "detection_latency"))
        elif kind == "node_excluded":
            k = bisect.bisect_left(joins, e["ts"])
            intervals.append((e["ts"], joins[k] if k < len(joins) else hi, "hot_spare_wait"))

    segments = _resolve(intervals, lo, hi)
    totals = {c: 0.0 for c in (PRODUCTIVE, *CATEGORIES)}
    for s in segments:
        totals[s.category] += s.end - s.start
    wall = hi - lo
    incidents = find_incidents(evs, records, partial, [inc.start for inc in incs[1:]], lo, hi)
    kept = [r for r in records if r.kept]
    dropped, failures = _event_log_trouble(evs)
    return GoodputReport(
        wall_start=lo,
        wall_end=hi,
        wall_seconds=wall,
        productive_seconds=totals[PRODUCTIVE],
        goodput=totals[PRODUCTIVE] / wall if wall > 0 else 0.0,
        badput={c: totals[c] for c in CATEGORIES},
        incidents=incidents,
        steps_kept=sum(1 for r in kept if lo <= r.end <= hi),
        steps_lost=sum(1 for r in records if not r.kept and lo <= r.end <= hi),
        last_step=max((r.step for r in kept), default=None),
        incarnations=len(incs),
        clock_offsets=offsets,
        segments=segments,
        steps=records,
        events_dropped=dropped,
        event_write_failures=failures,
    )


def _last_progress(fault: dict[str, Any], records: list[StepRecord]) -> float:
    """The victim's last progress: as the detector saw it, else the last step finished before."""
    if isinstance(fault.get("last_progress_ts"), (int, float)):
        return min(fault["last_progress_ts"], fault["ts"])
    return max((r.end for r in records if r.end <= fault["ts"]), default=fault["ts"])


def rolling_goodput(report: GoodputReport, window: float, points: int = 200) -> tuple[list[float], list[float]]:
    """Productive fraction of each trailing ``window`` seconds, sampled at ``points`` times."""
    lo, hi = report.wall_start, report.wall_end
    if hi <= lo or window <= 0:
        return [], []
    productive = [(s.start, s.end) for s in report.segments if s.category == PRODUCTIVE]
    times = [lo + (hi - lo) * i / (points - 1) for i in range(points)] if points > 1 else [hi]
    values = []
    for t in times:
        a = max(lo, t - window)
        span = t - a
        got = sum(max(0.0, min(e, t) - max(s, a)) for s, e in productive)
        values.append(got / span if span > 0 else 0.0)
    return times, values


def step_rate(report: GoodputReport, points: int = 120) -> list[tuple[float, float]]:
    """Steps finished per second (kept or not) in ``points`` equal bins of the window, as (bin end, rate)."""
    lo, hi = report.wall_start, report.wall_end
    if hi <= lo or points < 1:
        return []
    width = (hi - lo) / points
    counts = [0] * points
    for s in report.steps:
        if lo <= s.end <= hi:
            counts[min(points - 1, int((s.end - lo) / width))] += 1
    return [(lo + (k + 1) * width, n / width) for k, n in enumerate(counts)]
