"""Incidents: one root cause each, everything that followed from it, and what it cost, counted once.

A job's log holds many reports of one failure: healthd names the hung rank and the ranks blocked on
it and kills the group, every agent reports its failed ranks, the controller excludes a node, the
agents restart, the trainers reload. :func:`find_incidents` reads them as one story per root cause:

1. **Outages.** The lowest rank's completed steps are the job's busy time; the gaps between them
   are where it stood still. Every event belongs to a gap (one inside a step, to the gap after it).
2. **Root causes**, from what an event proves on its own (:meth:`_Builder.claim`): a GPU the probe
   found dead, a process found stopped, a rank killed by a signal stalwart did not send, replicas
   that disagree, a damaged checkpoint, a SIGTERM or an operator's order (planned). Reports of one
   cause merge: the culprits of one hang, the sdc reports of one step.
3. **Links.** Evidence that may be a cause or a consequence goes to the incident that explains it
   when one does: a node's exclusion after a fault on that node or in the same outage, a node's
   silence after it was taken out, a rollback after corruption, a hang report from a node that
   found no culprit while another rank was the cause, a node that joined in the place of one lost.
4. **Inference.** An outage with failures but no root cause: a node of the failed group whose agent
   said nothing from then on is a lost node; otherwise the failed rank, or the failed ranks as
   suspects when the evidence cannot decide. A restart nothing explains is an
   ``unexplained_restart``; a node joining a running job with no one to replace, a planned resize.
5. **Consequences.** Every other event of an outage goes to the incident that owns the outage:
   exits of the processes healthd killed (matched by pid), ranks blocked or failed after a peer,
   kills, restarts, reloads, rollbacks, requeues, and any event kind this module has no rule for
   (under its own name, less a ``_begin``/``_end`` suffix, with its ``seconds``): recovery events
   added later, such as an in-process re-formation, need no change here.
6. **Costs, counted once.** Each outage belongs to one incident, its strongest root cause:
   detection latency (last progress → detection), downtime (detection → the next step, plus every
   later outage its consequences caused, such as the restart when a replacement node joined), and
   the steps thrown away by restores inside its outages. A fallback past a damaged checkpoint
   charges the steps between the two checkpoints to the damage.

Standard library only; the event schema is :mod:`stalwart.events`.
"""

from __future__ import annotations

import bisect
import re
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stalwart.events import ABANDONED_SAVE, EventKind

if TYPE_CHECKING:
    from stalwart.goodput.accounting import StepRecord

# The fault taxonomy, then the planned interruptions (reported apart from faults).
FAULT_KINDS = (
    "rank_died",
    "hang",
    "gpu_fault",
    "sdc",
    "node_lost",
    "storage_damage",
    "save_failed",
    "straggler",
    "bad_data",
    "node_unhealthy",
    "rollback",
    "unexplained_restart",
)
PLANNED_KINDS = ("preemption", "resize", "rollback_order", "operator_exclusion")
# Fault names in ``fault_detected`` events → incident kinds (a name not listed is its own kind).
FAULT_NAMES = {
    "gpu": "gpu_fault",
    "xid": "gpu_fault",
    "ecc_uncorrectable": "gpu_fault",
    "rank_exit": "rank_died",
    "process_exit": "rank_died",
    "crash": "rank_died",
    "node_lost": "node_lost",
    "host": "node_lost",
    "hang": "hang",
    "sdc": "sdc",
    "bad_data": "bad_data",
    "straggler": "straggler",
}
# What a consequence is, by event kind. A kind without an entry is named after itself, less a
# ``_begin``/``_end`` suffix (``reform_begin`` and ``reform_end`` are both "reform").
ACTIONS = {
    EventKind.WORKER_START.value: "restart",
    EventKind.NODE_EXCLUDED.value: "exclusion",
    EventKind.ROLLBACK.value: "rollback",
    EventKind.CKPT_LOAD.value: "reload",
    EventKind.NODE_JOINED.value: "replacement",
    EventKind.WORKERS_KILLED.value: "kill",
    EventKind.JOB_START.value: "requeue",
    EventKind.CKPT_COMMIT.value: "commit",
    EventKind.CKPT_FAIL.value: "save_failed",
    EventKind.WORKER_STOP.value: "stop",
    EventKind.ROLLBACK_ORDERED.value: "rollback_order",
}
# Consequences that are effects of the cause, not something done about it.
EFFECTS = frozenset({"blocked", "failed", "stopped", "killed", "silence", "reported", "joined"})
HANG_WINDOW_S = 60.0  # each node declares a job-wide stall at its own limit: seconds to a minute apart
LINK_WINDOW_S = 900.0  # how long after a fault its node's exclusion or silence still follows from it
_ROUTINE = frozenset(
    {
        EventKind.CLOCK.value,
        EventKind.STEP_BEGIN.value,
        EventKind.STEP_END.value,
        EventKind.CKPT_STAGE.value,
        EventKind.INIT_DONE.value,
        EventKind.FAULT_INJECTED.value,  # the chaos tests' ground truth: never evidence
        EventKind.JOB_END.value,  # the ranks' worker_stop events say the same
    }
)
_STRONG, _LINKED, _INFERRED = 3, 2, 1
_SIGKILL, _SIGTERM = -signal.SIGKILL.value, -signal.SIGTERM.value


@dataclass
class Consequence:
    """One thing that followed from an incident: its ``action`` (restart, reload, kill, ...) in words."""

    ts: float
    action: str
    text: str
    seconds: float | None = None


@dataclass
class Incident:
    """One root cause: what, where, found by whom and when, what was done, what it cost."""

    ts: float  # when it was detected (planned: when it began), in the report's clock
    kind: str  # one of FAULT_KINDS or PLANNED_KINDS (or a fault name this module does not know)
    planned: bool
    target: str  # "rank 2", "node node2", "node1 gpu0", "checkpoint step 20", "suspects: ranks 1, 3"
    suspects: bool  # the evidence names candidates, not one culprit
    ranks: list[int]
    nodes: list[str]
    devices: list[str]
    detector: str | None
    last_progress_ts: float | None
    detection_latency: float | None
    downtime: float = 0.0
    lost_steps: int = 0
    lost_seconds: float = 0.0
    restored_step: int | None = None
    actions: list[str] = field(default_factory=list)  # what was done, in order: kill, exclusion, restart, ...
    consequences: list[Consequence] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)  # stacks (paths), why, phase, reason, ...
    summary: str = ""  # the incident in one sentence: the report's and the dashboard's text


def find_incidents(
    events: list[dict[str, Any]],
    steps: list[StepRecord],
    partial: list[tuple[float, float, int]],
    restarts: list[float],
    lo: float,
    hi: float,
) -> list[Incident]:
    """The incidents of a job, from its events (one clock, sorted by ``ts``), the lowest rank's step
    records, the partial steps lost to deaths, when new incarnations of the worker group started,
    and the report's window ``[lo, hi]``."""
    return _Builder(events, steps, partial, restarts, lo, hi).build()


# ------------------------------------------------------------------------------------ reading events


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _rank_of(target: Any) -> int | None:
    text = str(target if target is not None else "")
    text = text[4:] if text.startswith("rank") else text
    return int(text) if text.isdigit() else None


def _detail(e: dict[str, Any]) -> dict[str, Any]:
    return e["detail"] if isinstance(e.get("detail"), dict) else {}


def _exit_code(e: dict[str, Any]) -> int | None:
    """The blamed rank's exit code (negative: the signal that killed it), from the field or the text."""
    if isinstance(e.get("exit_code"), int):
        return e["exit_code"]
    text = str(e.get("detail") or "")
    if m := re.search(r"signal (SIG[A-Z0-9]+)", text):
        return -signal.Signals[m.group(1)].value if m.group(1) in signal.Signals.__members__ else None
    if m := re.search(r"exit code (-?\d+)", text):
        return int(m.group(1))
    return None


def _failures(e: dict[str, Any]) -> dict[int, tuple[int | None, int | None]]:
    """rank → (exit code, pid) of every rank an agent's report lists (the blamed one alone in older logs)."""
    out: dict[int, tuple[int | None, int | None]] = {}
    raw = e.get("failures")
    if isinstance(raw, dict):
        for rank, entry in raw.items():
            if str(rank).isdigit() and isinstance(entry, dict):
                out[int(rank)] = (entry.get("exit_code"), entry.get("pid"))
    rank = _rank_of(e.get("target"))
    if rank is not None and rank not in out:
        out[rank] = (_exit_code(e), None)
    return out


def _how(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"failed (exit code {code})"


def ranks_text(ranks: list[int]) -> str:
    """``rank 3``, ``ranks 0-3``, ``ranks 0, 2, 5``."""
    ranks = sorted(set(ranks))
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks)) if ranks else "no rank"


@dataclass
class _Claim:
    """What one event proves: a root cause of ``kind``, or (``_LINKED``) one unless an incident explains it."""

    kind: str
    strength: int
    key: tuple  # claims with one key are reports of one cause
    planned: bool = False
    independent: bool = False  # costs no outage of its own (damage, failed saves, stragglers, bad data)
    ranks: list[int] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    suspects: bool = False
    evidence: dict[str, Any] = field(default_factory=dict)
    ts: float | None = None  # when it began, when the event says so (a preemption's signal)


@dataclass
class _Draft:
    """An incident being put together."""

    claim: _Claim
    root: dict[str, Any]
    ts: float
    detector: str | None
    last_progress: float | None = None
    roots: list[dict[str, Any]] = field(default_factory=list)
    linked: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # (event, how it follows)
    removed: list[str] = field(default_factory=list)  # nodes it took out that no node has replaced yet
    fallback_to: int | None = None
    first_gap: int = 0

    @property
    def kind(self) -> str:
        return self.claim.kind


class _Builder:
    def __init__(self, events, steps, partial, restarts, lo, hi) -> None:
        self.events, self.steps, self.partial, self.lo, self.hi = events, steps, partial, lo, hi
        stretches: list[list[float]] = []
        for a, b in sorted((r.start, r.end) for r in steps):
            if stretches and a <= stretches[-1][1]:
                stretches[-1][1] = max(stretches[-1][1], b)
            else:
                stretches.append([a, b])
        self.starts = [a for a, _ in stretches]
        self.ends = [b for _, b in stretches]
        self.first_gap = 1 if stretches else 0  # gap 0 is the start-up before the first step
        self.restarts = sorted(restarts)
        self.restart_gaps = {self.gap_of(t) for t in restarts}
        self.drafts: list[_Draft] = []
        self.owner_of: dict[int, _Draft] = {}  # id(event) -> its incident
        self.killed: dict[int, dict[str, Any]] = {}  # pid -> the event in which healthd killed it
        self.agent_ids: list[tuple[float, int, str]] = []  # (ts, node rank, node id) from agent events
        self.rounds: list[tuple[float, str, int | None]] = []  # (ts, node id, world size): agent worker_starts
        self.agent_starts: list[tuple[float, Any]] = []  # (ts, agent pid) of every agent worker_start
        self.trainers: dict[tuple, dict[str, Any]] = {}  # (host, pid) -> rank, node id, first and last ts
        self.commits: dict[Any, list[float]] = {}  # tier -> commit times
        for e in events:
            self._index(e)

    # ---------------------------------------------------------------- indexes and lookups

    def _index(self, e: dict[str, Any]) -> None:
        kind, role = e["kind"], e.get("role")
        if role == "agent" and isinstance(e.get("node"), int) and e.get("node_id"):
            self.agent_ids.append((e["ts"], e["node"], str(e["node_id"])))
            if kind == EventKind.WORKER_START.value:
                self.rounds.append((e["ts"], str(e["node_id"]), e.get("world_size")))
        if role == "agent" and kind == EventKind.WORKER_START.value:
            self.agent_starts.append((e["ts"], (e.get("host"), e.get("pid"))))
        if role == "trainer" and isinstance(e.get("rank"), int):
            t = self.trainers.setdefault(
                (e.get("host"), e.get("pid")), {"rank": e["rank"], "node": None, "first": e["ts"], "last": e["ts"]}
            )
            t["last"] = e["ts"]
            if kind == EventKind.WORKER_START.value and e.get("node_id"):
                t["node"] = str(e["node_id"])
        if kind == EventKind.CKPT_COMMIT.value and e.get("rank") in (None, 0):
            self.commits.setdefault(e.get("tier"), []).append(e["ts"])
        pids = e.get("pids") if kind == EventKind.WORKERS_KILLED.value else _detail(e).get("killed_pids")
        for pid in pids or []:
            if isinstance(pid, int):
                self.killed.setdefault(pid, e)

    def gap_of(self, ts: float) -> int:
        """The outage at ``ts``: gap i lies before busy stretch i (a moment inside a step, after it)."""
        return bisect.bisect_left(self.starts, ts)

    def in_step(self, ts: float) -> bool:
        i = bisect.bisect_left(self.starts, ts)
        return i > 0 and ts < self.ends[i - 1]

    def bounds(self, g: int) -> tuple[float, float]:
        start = self.ends[g - 1] if g > 0 else self.lo
        end = self.starts[g] if g < len(self.starts) else self.hi
        return start, max(start, end)

    def node_of_rank(self, rank: int, ts: float) -> str | None:
        """The node a rank's process ran on around ``ts`` (the trainers' ``worker_start`` names it)."""
        near = [t for t in self.trainers.values() if t["rank"] == rank and t["node"]]
        alive = [t for t in near if t["first"] - 1.0 <= ts <= t["last"] + 60.0]
        pick = min(alive or near, key=lambda t: abs(t["first"] - ts), default=None)
        return pick["node"] if pick else None

    def node_id(self, node_rank: int, ts: float) -> str:
        """An agent's node id for its node rank at ``ts``."""
        name = f"node{node_rank}"
        for t, rank, node in self.agent_ids:
            if t > ts + 1.0:
                break
            if rank == node_rank:
                name = node
        return name

    def event_node(self, e: dict[str, Any]) -> str | None:
        """The node an event is about, by id."""
        if e.get("node_id"):
            return str(e["node_id"])
        node = e.get("node")
        if node is None:
            return None
        if e.get("role") == "agent" and isinstance(node, int):
            return self.node_id(node, e["ts"])
        return f"node{node}" if str(node).isdigit() else str(node)

    def killer(self, e: dict[str, Any]) -> dict[str, Any] | None:
        """The event in which healthd killed the process an agent reports dead, if it did."""
        code, pid = _failures(e).get(_rank_of(e.get("target")), (None, None))
        if pid is not None:
            return self.killed.get(pid)
        if code != _SIGKILL:
            return None
        # Older logs give no pid: a kill by the same node's healthd just before is the answer.
        node = self.event_node(e)
        return next(
            (k for k in self.killed.values() if self.event_node(k) == node and 0 <= e["ts"] - k["ts"] <= 30.0), None
        )

    def detector(self, e: dict[str, Any]) -> str:
        kind, role, node = e["kind"], e.get("role"), self.event_node(e)
        if kind == EventKind.CKPT_FAIL.value:
            return "the checkpoint manager" + (" on load" if "is damaged" in str(e.get("reason")) else "")
        if kind == EventKind.WORKER_STOP.value:
            return "the ranks' SIGTERM handler"
        if kind == EventKind.NODE_EXCLUDED.value:
            return "the controller" if role == "controller" else f"the launcher on {node}"
        if kind in (EventKind.ROLLBACK_ORDERED.value, EventKind.ROLLBACK.value):
            return "the controller" if role == "controller" else "the trainers"
        who = str(e.get("detector") or role or "?")
        if who in ("agent", "healthd") and node:
            return f"{'the agent' if who == 'agent' else 'healthd'} on {node}"
        return who

    # ---------------------------------------------------------------- what an event proves

    def claim(self, e: dict[str, Any]) -> _Claim | None:
        """The root cause ``e`` proves or (``_LINKED``) points at; None when it can only be a consequence."""
        kind, gap = e["kind"], self.gap_of(e["ts"])
        if kind == EventKind.FAULT_DETECTED.value:
            return self._claim_fault(e, gap)
        if kind == EventKind.NODE_EXCLUDED.value:
            node = self.event_node(e) or "?"
            reason = str(e.get("reason") or "")
            if reason.startswith("operator"):
                return _Claim("operator_exclusion", _LINKED, ("exclusion", node), planned=True, nodes=[node])
            what = "straggler" if "straggler" in reason else "node_unhealthy"
            return _Claim(what, _LINKED, ("exclusion", node), nodes=[node], evidence={"reason": reason})
        if kind == EventKind.WORKER_STOP.value and e.get("role") == "trainer" and e.get("reason") == "preempted":
            if self.regrouped(gap):
                return None  # the agents stopped their ranks (who commit on SIGTERM) to let a node join
            return _Claim("preemption", _STRONG, ("preemption", gap), planned=True, ts=_num(e.get("signalled_ts")))
        if kind == EventKind.CKPT_FAIL.value and e.get("tier") != "preemption":
            reason, step = str(e.get("reason") or ""), e.get("step")
            if reason.startswith(ABANDONED_SAVE):
                return None  # given up by an in-process recovery: whatever the gap's incident is caused it
            if "is damaged" in reason:
                evidence = {"step": step, "reason": reason.split(" is damaged: ", 1)[-1]}
                return _Claim("storage_damage", _STRONG, ("storage_damage", step), independent=True, evidence=evidence)
            # Failures with no commit of their tier in between are one outage of that storage.
            commits = bisect.bisect_left(self.commits.get(e.get("tier"), []), e["ts"])
            evidence = {"tier": e.get("tier"), "reason": reason, "steps": [step]}
            key = ("save_failed", e.get("tier"), commits)
            return _Claim("save_failed", _LINKED, key, independent=True, evidence=evidence)
        if kind in (EventKind.ROLLBACK_ORDERED.value, EventKind.ROLLBACK.value):
            request = e.get("request") if kind == EventKind.ROLLBACK_ORDERED.value else e.get("rollback_request")
            evidence = {"to_step": e.get("to_step"), "reason": e.get("reason")}
            if request:
                strength = _STRONG if kind == EventKind.ROLLBACK_ORDERED.value else _LINKED
                return _Claim("rollback_order", strength, ("rollback_order", request), planned=True, evidence=evidence)
            if kind == EventKind.ROLLBACK.value:
                return _Claim("rollback", _LINKED, ("rollback", gap), evidence=evidence)
        return None

    def regrouped(self, g: int) -> bool:
        """Whether an agent of the group that ran before gap ``g`` started ranks again in it: the same
        launchers going on (a membership change), where a preemption ends them and the requeued job
        brings new ones."""
        start, end = self.bounds(g)
        before = [(ts, agent) for ts, agent in self.agent_starts if ts <= start]
        if not before:
            return False
        newest = before[-1][0]
        members = {agent for ts, agent in before if newest - 30.0 <= ts}
        return any(agent in members for ts, agent in self.agent_starts if start < ts <= end)

    def _claim_fault(self, e: dict[str, Any], gap: int) -> _Claim | None:
        fault, target, detail = str(e.get("fault") or "fault"), str(e.get("target") or ""), _detail(e)
        kind, node = FAULT_NAMES.get(fault, fault), self.event_node(e)
        rank = _rank_of(target)
        ranks, nodes = ([rank] if rank is not None else []), ([node] if node else [])
        if fault == "hang_blocked":
            return None
        if kind == "gpu_fault":
            where, _, device = target.partition("/")
            evidence = {k: detail[k] for k in ("kind", "code", "detail") if k in detail}
            return _Claim(
                kind, _STRONG, (kind, where, device), nodes=[where or node or "?"], devices=[device], evidence=evidence
            )
        if kind == "hang":
            evidence = {k: detail[k] for k in ("phase", "limit_s", "waited_s", "why", "stacks") if k in detail}
            culprit = detail.get("culprit_found_here") is not False  # older logs: every report names a culprit
            strength = _STRONG if culprit else _LINKED
            return _Claim(
                kind, strength, (kind, gap), ranks=ranks, nodes=nodes, suspects=not culprit, evidence=evidence
            )
        if kind == "sdc":
            ranks = [r for r in (_rank_of(t) for t in target.split(",")) if r is not None]
            evidence = {k: detail[k] for k in ("step", "layer") if k in detail}
            suspects = bool(detail.get("undetermined"))
            return _Claim(
                kind, _STRONG, (kind, detail.get("step", gap)), ranks=ranks, suspects=suspects, evidence=evidence
            )
        if kind in ("bad_data", "straggler"):
            evidence = {"step": target} if kind == "bad_data" else {"detail": e.get("detail")}
            return _Claim(kind, _STRONG, (kind, target), independent=True, ranks=ranks, nodes=nodes, evidence=evidence)
        if kind == "node_lost":
            lost = self.node_id(int(target[4:]), e["ts"]) if target[4:].isdigit() else target or "?"
            return _Claim(kind, _LINKED, (kind, lost), nodes=[lost], evidence={"why": e.get("detail")})
        if kind == "rank_died":
            code = _exit_code(e)
            # An error or torch's SIGTERM follows a peer's failure; a kill by healthd, healthd's finding.
            if code is not None and (code >= 0 or code == _SIGTERM or self.killer(e) is not None):
                return None
            return _Claim(kind, _STRONG, (kind, rank, gap), ranks=ranks, nodes=nodes, evidence={"exit_code": code})
        return _Claim(
            kind, _STRONG, (kind, target, gap), ranks=ranks, nodes=nodes, evidence={"detail": e.get("detail")}
        )

    # ---------------------------------------------------------------- putting incidents together

    def new_draft(self, e: dict[str, Any], c: _Claim) -> _Draft:
        d = _Draft(claim=c, root=e, ts=c.ts if c.ts is not None else e["ts"], detector=self.detector(e), roots=[e])
        if isinstance(e.get("last_progress_ts"), (int, float)):
            d.last_progress = min(float(e["last_progress_ts"]), d.ts)
        d.first_gap = self.gap_of(e["ts"])
        if c.kind == "node_lost":
            d.removed = list(c.nodes)
        self.drafts.append(d)
        self.owner_of[id(e)] = d
        return d

    def merge(self, d: _Draft, e: dict[str, Any], c: _Claim) -> None:
        """Another report of ``d``'s cause: a second culprit, a second sdc report, another failed save."""
        d.roots.append(e)
        self.owner_of[id(e)] = d
        for name in ("ranks", "nodes", "devices"):
            mine = getattr(d.claim, name)
            mine.extend(v for v in getattr(c, name) if v not in mine)
        d.claim.suspects = d.claim.suspects and c.suspects
        for key in ("stacks", "steps"):
            if key in c.evidence:
                d.claim.evidence[key] = list(dict.fromkeys(d.claim.evidence.get(key, []) + list(c.evidence[key])))
        for key, value in c.evidence.items():
            d.claim.evidence.setdefault(key, value)

    def link(self, d: _Draft, e: dict[str, Any], how: str) -> None:
        d.linked.append((e, how))
        self.owner_of[id(e)] = d

    def build(self) -> list[Incident]:
        notable = [e for e in self.events if e["kind"] not in _ROUTINE]
        claims = {id(e): self.claim(e) for e in notable}
        by_key: dict[tuple, _Draft] = {}
        for e in notable:  # what events prove on their own
            c = claims[id(e)]
            if c is not None and c.strength == _STRONG:
                if c.key in by_key:
                    self.merge(by_key[c.key], e, c)
                else:
                    by_key[c.key] = self.new_draft(e, c)
        # What they prove unless an incident explains them. Failed saves go last: a save that fails
        # because a peer died can fail seconds before that death is detected (a lost node's silence).
        for e in sorted(notable, key=lambda e: (c := claims[id(e)]) is not None and c.kind == "save_failed"):
            c = claims[id(e)]
            if c is None or c.strength != _LINKED:
                continue
            owner, how = self.explain(e, c)
            if owner is not None:
                self.link(owner, e, how)
                if e["kind"] == EventKind.NODE_EXCLUDED.value:
                    self.take_out(owner, c.nodes)
            elif c.key in by_key:
                self.merge(by_key[c.key], e, c)
            else:
                by_key[c.key] = self.new_draft(e, c)
                if e["kind"] == EventKind.NODE_EXCLUDED.value:
                    self.take_out(by_key[c.key], c.nodes)
        self.place()
        self.infer_failures(notable)
        self.place()
        self.join_nodes(notable)
        self.place()
        self.infer_restarts(notable)
        self.place()
        self.attach(notable)
        self.find_fallbacks()
        incidents = [self.finish(d) for d in self.drafts]
        return sorted((i for i in incidents if self.lo <= i.ts <= self.hi), key=lambda i: i.ts)

    def take_out(self, d: _Draft, nodes: list[str]) -> None:
        for node in nodes:
            if not any(node in x.removed for x in self.drafts):
                d.removed.append(node)

    def explain(self, e: dict[str, Any], c: _Claim) -> tuple[_Draft | None, str]:
        """The incident ``e`` follows from and how; (None, "") when none does."""
        ts, gap = e["ts"], self.gap_of(e["ts"])
        recent = [d for d in self.drafts if -5.0 <= ts - d.ts <= LINK_WINDOW_S]
        stalls = [d for d in self.drafts if d.first_gap == gap and not d.claim.independent and not d.claim.planned]
        if c.kind == "hang":  # a node that found no culprit: blocked on another node's, or on another cause
            hangs = [
                d
                for d in self.drafts
                if d.kind == "hang" and not d.claim.suspects and d.first_gap == gap and abs(d.ts - ts) <= HANG_WINDOW_S
            ]
            if hangs:
                return min(hangs, key=lambda d: abs(d.ts - ts)), "blocked"
            stalls = [d for d in stalls if d.kind != "hang"]  # other suspects of the same stall merge, below
            return (stalls[0], "blocked") if stalls else (None, "")
        if c.kind in ("node_unhealthy", "straggler", "operator_exclusion"):
            node = c.nodes[0]
            for d in reversed(recent):
                if d.claim.planned or (c.kind == "straggler") != (d.kind == "straggler"):
                    continue
                if (
                    node in self.nodes_of(d)
                    or d.kind in ("node_unhealthy", "operator_exclusion")
                    and node in d.claim.nodes
                ):
                    return d, "exclusion"
            return (stalls[0], "exclusion") if stalls and c.kind == "node_unhealthy" else (None, "")
        if c.kind == "node_lost":
            node = c.nodes[0]
            for d in reversed(recent):
                if node in self.nodes_of(d) or node in d.removed:
                    return d, "silence"
            return None, ""
        if c.kind == "save_failed":  # a save in flight when a peer died fails with it
            return (stalls[0], "save_failed") if stalls else (None, "")
        if c.kind == "rollback_order":
            return next(((d, "rollback") for d in self.drafts if d.claim.key == c.key), (None, ""))
        if c.kind == "rollback":
            for d in reversed(recent):
                if d.kind in ("sdc", "bad_data") and ts >= d.ts - 1.0:
                    return d, "rollback"
        return None, ""

    def nodes_of(self, d: _Draft) -> list[str]:
        """The nodes an incident is about: its own, and those its ranks ran on."""
        nodes = list(d.claim.nodes)
        for rank in d.claim.ranks:
            node = self.node_of_rank(rank, d.ts)
            if node and node not in nodes:
                nodes.append(node)
        return nodes

    def place(self) -> None:
        """Each outage's one owner: the strongest, earliest incident that began in it, else the one
        whose linked evidence (an exclusion, a replacement's join) falls in it."""
        self.owner: dict[int, _Draft] = {}
        best: dict[int, tuple] = {}
        for order, d in enumerate(self.drafts):
            if d.claim.independent:
                continue
            marks = [(d.first_gap, d.claim.strength)] + [(self.gap_of(e["ts"]), 0) for e, _ in d.linked]
            for g, strength in marks:
                rank = (-strength, d.ts, order)
                if g not in best or rank < best[g][0]:
                    best[g] = (rank, d)
        self.owner = {g: d for g, (_, d) in best.items()}

    def infer_failures(self, notable: list[dict[str, Any]]) -> None:
        """Outages with rank failures and no root cause: a silent node is lost; else the failed rank(s)."""
        unexplained: dict[int, list[dict[str, Any]]] = {}
        for e in notable:
            if (
                e["kind"] == EventKind.FAULT_DETECTED.value
                and FAULT_NAMES.get(str(e.get("fault"))) == "rank_died"
                and id(e) not in self.owner_of
                and self.killer(e) is None
            ):
                unexplained.setdefault(self.gap_of(e["ts"]), []).append(e)
        for g, failures in sorted(unexplained.items()):
            if g in self.owner:
                continue
            first = failures[0]
            silent = self.silent_nodes(g)
            if silent:
                why = "its agent and ranks stopped without a word and it did not come back"
                c = _Claim("node_lost", _INFERRED, ("node_lost", g), nodes=silent, suspects=len(silent) > 1)
                c.evidence = {"why": why}
            else:  # an error with no peer to blame: the rank(s) the agents put first
                errors = [r for e in failures for r, (code, _) in _failures(e).items() if code is None or code >= 0]
                ranks = sorted(set(errors or [_rank_of(e.get("target")) for e in failures]) - {None})
                code = next((code for e in failures for code, _ in _failures(e).values() if code and code > 0), None)
                c = _Claim("rank_died", _INFERRED, ("rank_died", g), ranks=ranks, suspects=len(ranks) != 1)
                c.evidence = {"exit_code": code}
            d = self.new_draft(first, c)
            d.last_progress = self.bounds(g)[0]
            for e in failures[1:]:
                self.link(d, e, "failed")

    def silent_nodes(self, g: int) -> list[str]:
        """Nodes of the group that failed in gap ``g`` whose agents said nothing from the outage on."""
        start, _ = self.bounds(g)
        before = [(ts, node) for ts, node, _ in self.rounds if ts <= start]
        if not before:
            return []
        newest = before[-1][0]
        members = {node for ts, node in before if newest - 30.0 <= ts}
        speaking = {self.event_node(e) for e in self.events if e.get("role") == "agent" and e["ts"] >= start}
        return sorted(members - speaking)

    def join_nodes(self, notable: list[dict[str, Any]]) -> None:
        """A node joining after the job stepped: a replacement for a node taken out, else part of its
        outage (a requeue), else a planned resize when the world grew."""
        for e in notable:
            if e["kind"] != EventKind.NODE_JOINED.value or id(e) in self.owner_of:
                continue
            g = self.gap_of(e["ts"])
            if g < self.first_gap or not self.starts:
                continue  # the job's first rendezvous
            node = self.event_node(e) or "?"
            short = next((d for d in self.drafts if d.removed and d.ts <= e["ts"] + 1.0), None)
            if short is not None:
                self.link(short, e, f"replacing {short.removed.pop(0)}")
            elif g in self.owner:
                self.link(self.owner[g], e, "joined")
            elif (e.get("world_size") or 0) > (self.world_before(e) or 0):
                self.new_draft(e, _Claim("resize", _STRONG, ("resize", g), planned=True, nodes=[node]))

    def infer_restarts(self, notable: list[dict[str, Any]]) -> None:
        """A restart after the job stepped that no incident explains: an ``unexplained_restart``."""
        gaps = set(self.restart_gaps)
        gaps |= {
            self.gap_of(e["ts"])
            for e in notable
            if e.get("role") == "agent" and e["kind"] == EventKind.WORKER_START.value
        }
        for g in sorted(gaps):
            if g < self.first_gap or g in self.owner or g > len(self.starts):
                continue
            start, _ = self.bounds(g)
            c = _Claim("unexplained_restart", _INFERRED, ("unexplained_restart", g))
            d = self.new_draft({"ts": start, "kind": "restart"}, c)
            d.detector = None
            self.owner[g] = d

    def attach(self, notable: list[dict[str, Any]]) -> None:
        """Every remaining event to the incident it follows from: blocked ranks to their hang, exits
        to the incident whose kill they were, the rest to the owner of their outage."""
        for e in notable:
            if id(e) in self.owner_of:
                continue
            d, how = None, "followed"
            if e["kind"] == EventKind.FAULT_DETECTED.value and e.get("fault") == "hang_blocked":
                g = self.gap_of(e["ts"])
                hangs = [
                    x
                    for x in self.drafts
                    if x.kind == "hang" and x.first_gap == g and abs(x.ts - e["ts"]) <= HANG_WINDOW_S
                ]
                d, how = min(hangs, key=lambda x: abs(x.ts - e["ts"]), default=None), "blocked"
            elif e["kind"] == EventKind.FAULT_DETECTED.value and (k := self.killer(e)) is not None:
                d, how = self.owner_of.get(id(k)), "killed"
            if d is None:
                d = self.owner.get(self.gap_of(e["ts"]))
            if d is not None:
                self.link(d, e, how)

    def find_fallbacks(self) -> None:
        """A load that went past a damaged checkpoint: the step it fell back to."""
        for d in self.drafts:
            step = d.claim.evidence.get("step")
            if d.kind != "storage_damage" or not isinstance(step, int):
                continue
            g, after = self.gap_of(d.root["ts"]), d.root["ts"]
            loads = [
                e
                for e in self.events
                if e["kind"] == EventKind.CKPT_LOAD.value
                and e["ts"] >= after
                and self.gap_of(e["ts"]) == g
                and isinstance(e.get("step"), int)
                and e.get("rank") in (None, self.lowest_rank(e))  # one load per restore, as consequence() reads it
            ]
            if loads and loads[0]["step"] < step:
                d.fallback_to = loads[0]["step"]
                d.linked.append((loads[0], "fallback"))

    # ---------------------------------------------------------------- costs and words

    def finish(self, d: _Draft) -> Incident:
        c = d.claim
        owned = sorted(g for g, o in self.owner.items() if o is d)
        downtime = 0.0
        for g in owned:
            start, end = self.bounds(g)
            begin = max(start, d.ts) if g == d.first_gap else start
            downtime += max(0.0, min(end, self.hi) - max(begin, self.lo))
        if d.last_progress is None and not c.planned and not c.independent and not self.in_step(d.root["ts"]):
            d.last_progress = min(self.bounds(d.first_gap)[0], d.ts)
        latency = (
            None if c.planned or d.detector is None or d.last_progress is None else max(0.0, d.ts - d.last_progress)
        )
        lost = [r for r in self.steps if not r.kept and self.charged(r) is d]
        lost_seconds = sum(r.end - r.start for r in lost)
        lost_seconds += sum(end - begun for begun, end, _ in self.partial if self.owner.get(self.gap_of(begun)) is d)
        consequences = self.consequences(d)
        incident = Incident(
            ts=d.ts,
            kind=c.kind,
            planned=c.planned,
            target=self.target(d),
            suspects=c.suspects,
            ranks=sorted(set(c.ranks)),
            nodes=self.nodes_of(d),
            devices=list(c.devices),
            detector=d.detector,
            last_progress_ts=d.last_progress,
            detection_latency=latency,
            downtime=downtime,
            lost_steps=len(lost),
            lost_seconds=lost_seconds,
            restored_step=self.restored(d, owned),
            actions=list(dict.fromkeys(x.action for x in consequences if x.action not in EFFECTS)),
            consequences=consequences,
            evidence=self.evidence(d),
        )
        incident.summary = summary(incident)
        return incident

    def evidence(self, d: _Draft) -> dict[str, Any]:
        """The claim's evidence, stack dumps ordered culprit first."""
        evidence = dict(d.claim.evidence)
        for e, _ in d.linked:  # the other nodes' dumps of the same stall
            for path in _detail(e).get("stacks") or [] if e["kind"] == EventKind.FAULT_DETECTED.value else []:
                evidence["stacks"] = list(dict.fromkeys([*evidence.get("stacks", []), path]))
        if evidence.get("stacks"):
            mine = tuple(f"-rank{r}.txt" for r in d.claim.ranks)
            evidence["stacks"] = sorted(evidence["stacks"], key=lambda p: not str(p).endswith(mine))
        return evidence

    def restored(self, d: _Draft, owned: list[int]) -> int | None:
        """The step the job went on from: a load, a rollback, a fallback, else the step before the next one."""
        if d.kind == "storage_damage":
            return d.fallback_to
        for e, _ in sorted(d.linked, key=lambda t: t[0]["ts"]):
            if e["kind"] in (EventKind.CKPT_LOAD.value,) and isinstance(e.get("step"), int):
                return e["step"]
            if e["kind"] == EventKind.ROLLBACK.value and isinstance(e.get("to_step"), int):
                return e["to_step"]
        if d.root.get("kind") == EventKind.ROLLBACK.value and isinstance(d.root.get("to_step"), int):
            return d.root["to_step"]
        if owned and owned[0] < len(self.starts):
            after = min(
                (r for r in self.steps if r.start >= self.starts[owned[0]]), key=lambda r: r.start, default=None
            )
            if after is not None and owned[0] in self.restart_gaps:  # restarted without a load: from scratch
                return after.step - 1
        return None

    def charged(self, r: StepRecord) -> _Draft | None:
        """Who a thrown-away step is charged to: the owner of the outage whose restore discarded it,
        or the damage a fallback went past."""
        g = self.gap_of(r.discarded_at if r.discarded_at is not None else r.end)
        for d in self.drafts:
            step = d.claim.evidence.get("step")
            if d.kind == "storage_damage" and d.fallback_to is not None and isinstance(step, int):
                if d.fallback_to < r.step <= step and self.gap_of(d.root["ts"]) == g:
                    return d
        return self.owner.get(g)

    def world_before(self, e: dict[str, Any]) -> int | None:
        worlds = [w for ts, _, w in self.rounds if ts < e["ts"] - 1.0 and isinstance(w, int)]
        return worlds[-1] if worlds else None

    def target(self, d: _Draft) -> str:
        c = d.claim
        if c.kind == "gpu_fault":
            return ", ".join(f"{n} {dev}".strip() for n, dev in zip(c.nodes, c.devices)) or "a GPU"
        if c.kind == "storage_damage":
            return f"checkpoint step {c.evidence.get('step')}"
        if c.kind == "save_failed":
            return f"checkpoint saves to {c.evidence.get('tier')}"
        if c.kind in ("preemption", "unexplained_restart", "rollback_order", "rollback"):
            return "the job"
        if c.kind == "bad_data":
            return f"the batch of {c.evidence.get('step')}"
        if c.kind in ("node_lost", "node_unhealthy", "operator_exclusion", "resize") or not c.ranks:
            text = ", ".join(f"node {n}" for n in c.nodes) or "?"
        else:
            text = ranks_text(c.ranks)
        return f"suspects: {text}" if c.suspects else text

    def consequences(self, d: _Draft) -> list[Consequence]:
        out: list[Consequence] = []
        seen: set[tuple[str, str]] = set()
        items = [(e, "root") for e in d.roots] + d.linked
        for e, how in sorted(items, key=lambda t: t[0]["ts"]):
            for x in self.consequence(d, e, how):
                if (x.action, x.text) not in seen:
                    seen.add((x.action, x.text))
                    out.append(x)
        # A new incarnation in an outage it owns is a restart, whether or not an agent said so.
        restarted = {self.gap_of(x.ts) for x in out if x.action == "restart"}
        for ts in self.restarts:
            g = self.gap_of(ts)
            if self.owner.get(g) is d and g not in restarted:
                restarted.add(g)
                out.append(Consequence(ts, "restart", "the ranks restarted"))
        return sorted(out, key=lambda x: x.ts)

    def consequence(self, d: _Draft, e: dict[str, Any], how: str) -> list[Consequence]:
        """``e`` as what followed from ``d``, in words (none for a root that only repeats the cause)."""
        kind, ts, node = e["kind"], e["ts"], self.event_node(e)
        on = f" on {node}" if node else ""
        if kind == EventKind.FAULT_DETECTED.value:
            fault = str(e.get("fault"))
            if FAULT_NAMES.get(fault) == "rank_died":
                return self.exits(d, e, how, on)
            if how == "root":
                return []
            if fault in ("hang", "hang_blocked"):
                return [
                    Consequence(ts, "blocked", f"rank {_rank_of(e.get('target'))} blocked waiting on it (healthd{on})")
                ]
            if fault == "node_lost":
                return [Consequence(ts, "silence", f"the agent{on}: {e.get('detail') or 'a peer fell silent'}")]
            return [Consequence(ts, "reported", f"{fault} on {e.get('target')} ({self.detector(e)})")]
        if how == "root" and kind != EventKind.NODE_EXCLUDED.value:
            return []
        if kind == EventKind.WORKERS_KILLED.value:
            ranks = [r for r in e.get("ranks") or [] if isinstance(r, int)]
            return [Consequence(ts, "kill", f"healthd{on} killed {ranks_text(ranks)}")]
        if kind == EventKind.NODE_EXCLUDED.value:
            if e.get("role") == "controller":
                return [Consequence(ts, "exclusion", f"the controller excluded {node} ({e.get('reason') or ''})")]
            return [Consequence(ts, "exclusion", f"{node} left the job, excluded (exit 93)")]
        if kind == EventKind.NODE_JOINED.value:
            action = "replacement" if how.startswith("replacing") else "joined"
            return [Consequence(ts, action, f"{node} joined" + (f", {how}" if action == "replacement" else ""))]
        if kind == EventKind.WORKER_START.value:
            if e.get("role") != "agent":
                return []
            world, before = e.get("world_size"), self.world_before(e)
            change = f"world {before} → {world}" if before not in (None, world) else f"world {world}"
            return [Consequence(ts, "restart", f"the ranks restarted ({change})")]
        if kind == EventKind.CKPT_LOAD.value:
            if e.get("rank") not in (None, self.lowest_rank(e)):
                return []
            seconds = _num(e.get("seconds"))
            if how == "fallback":
                return [Consequence(ts, "fallback", f"loaded step {e.get('step')} instead", seconds)]
            where = f"step {e.get('step')} from {e.get('tier') or '?'}"
            return [
                Consequence(ts, "reload", f"reloaded {where}" + (f" ({seconds:.1f} s)" if seconds else ""), seconds)
            ]
        if kind == EventKind.ROLLBACK.value:
            why = f" ({e['reason']})" if e.get("reason") else ""
            return [
                Consequence(ts, "rollback", f"rolled back from step {e.get('from_step')} to {e.get('to_step')}{why}")
            ]
        if kind == EventKind.CKPT_COMMIT.value:
            if d.kind != "preemption" or e.get("rank") not in (None, 0) or e["ts"] > d.root["ts"]:
                return []
            return [
                Consequence(ts, "commit", f"committed step {e.get('step')} to {e.get('tier')}", _num(e.get("seconds")))
            ]
        if kind == EventKind.CKPT_FAIL.value:
            return [Consequence(ts, "save_failed", f"the save of step {e.get('step')} failed: {e.get('reason')}")]
        if kind == EventKind.JOB_START.value:
            return [Consequence(ts, "requeue", "the job was started again")] if d.kind == "preemption" else []
        if kind == EventKind.WORKER_STOP.value:
            if e.get("reason") in (None, "ok", "failed") or e.get("rank") not in (None, self.lowest_rank(e)):
                return []
            if e.get("reason") == "preempted" and d.kind != "preemption":
                return [Consequence(ts, "regroup", "the ranks committed and stopped for the group to change")]
            return [Consequence(ts, "stop", f"the ranks stopped ({e.get('reason')})")]
        if kind == EventKind.ROLLBACK_ORDERED.value:
            return [Consequence(ts, "rollback_order", f"rollback to step {e.get('to_step')} ordered")]
        # A kind without a rule: its name, as the event gives its reason and its cost.
        action = ACTIONS.get(kind) or kind.removesuffix("_begin").removesuffix("_end")
        fields = ", ".join(
            f"{k} {e[k]}" for k in ("reason", "source", "target", "bytes", "step") if e.get(k) is not None
        )
        return [
            Consequence(ts, action, kind.replace("_", " ") + (f" ({fields})" if fields else ""), _num(e.get("seconds")))
        ]

    def exits(self, d: _Draft, e: dict[str, Any], how: str, on: str) -> list[Consequence]:
        """An agent's report of failed ranks: killed by healthd, failed with an error, stopped by torch."""
        blamed = _rank_of(e.get("target"))
        failures = _failures(e)
        if how == "root" and d.kind == "rank_died" and not d.claim.suspects:
            failures.pop(blamed, None)  # the cause itself is in the summary: only the ranks that went with it
        if how == "killed":
            return [Consequence(e["ts"], "killed", f"{ranks_text(list(failures))}{on} exited, killed by healthd")]
        groups: dict[str, list[int]] = {}
        for rank, (code, _) in failures.items():
            groups.setdefault(_how(code) if code != _SIGTERM else "stopped by torch (SIGTERM)", []).append(rank)
        out = []
        for what, ranks in groups.items():
            action = "stopped" if what.startswith("stopped") else "failed"
            out.append(Consequence(e["ts"], action, f"{ranks_text(ranks)}{on} {what}"))
        return out

    def lowest_rank(self, e: dict[str, Any]) -> int:
        alive = [t["rank"] for t in self.trainers.values() if t["first"] - 1.0 <= e["ts"] <= t["last"] + 1.0]
        return min(alive, default=0)


def summary(i: Incident) -> str:
    """The incident as one sentence: what happened to whom, who found it and how fast, what was
    done and what it cost."""
    ev, who = i.evidence, i.target.removeprefix("suspects: ")
    if i.kind == "hang":
        phase = ev.get("phase") or "a step"
        if i.suspects:
            what = f"{who} stopped making progress in {phase} and no stopped process was found (suspects)"
        else:
            what = f"{who} stopped making progress in {phase}" + (f" ({ev['why']})" if ev.get("why") else "")
    elif i.kind == "rank_died":
        what = f"{who} {_how(ev.get('exit_code'))}"
        if i.suspects:
            what += "; the evidence cannot tell which failed first (suspects)"
    elif i.kind == "gpu_fault":
        code = " ".join(str(ev[k]) for k in ("kind", "code") if ev.get(k) is not None)
        what = f"GPU {who} failed" + (f" ({code})" if code else "")
    elif i.kind == "sdc":
        at = (f" at step {ev['step']}" if ev.get("step") is not None else "") + (
            f" ({ev['layer']} check)" if ev.get("layer") else ""
        )
        what = (
            f"{who} disagree{at} and no majority names one (suspects)"
            if i.suspects
            else f"{who} computed wrong numbers{at}"
        )
    elif i.kind == "node_lost":
        what = f"{who} was lost" + (f": {ev['why']}" if ev.get("why") else "")
    elif i.kind == "storage_damage":
        what = f"{who} is damaged ({ev.get('reason')})"
        if i.restored_step is not None:
            what += f"; the load fell back to step {i.restored_step}"
    elif i.kind == "save_failed":
        what = (
            f"saving step {', '.join(map(str, ev.get('steps') or []))} to {ev.get('tier')} failed ({ev.get('reason')})"
        )
    elif i.kind == "straggler":
        what = f"{who} was slow: {ev.get('detail')}"
    elif i.kind == "preemption":
        what = "the job was preempted (SIGTERM), a planned stop"
    elif i.kind == "resize":
        what = f"{who} joined the running job, a planned resize"
    elif i.kind == "rollback_order":
        what = f"a rollback to step {ev.get('to_step')} was ordered ({ev.get('reason') or 'no reason given'})"
    elif i.kind == "operator_exclusion":
        what = f"an operator excluded {who}"
    elif i.kind == "node_unhealthy":
        what = f"{who} was excluded ({ev.get('reason')})"
    elif i.kind == "unexplained_restart":
        what = "the ranks restarted and nothing reported why"
    elif i.kind == "rollback":
        what = f"the job rolled back to step {ev.get('to_step')} ({ev.get('reason') or 'no reason given'})"
    elif i.kind == "bad_data":
        what = f"{who} made the loss jump and its replay did too: bad data, the update was skipped"
    else:
        what = f"{i.kind} on {who}"
    parts = [what]
    if i.detector:
        parts.append(f"found by {i.detector}" + (f" after {i.detection_latency:.1f} s" if i.detection_latency else ""))
    if ev.get("stacks") and i.kind == "hang":  # the culprit's dump first (_Builder.evidence), then its peers'
        more = len(ev["stacks"]) - 1
        parts.append(f"stacks: {str(ev['stacks'][0]).rsplit('/', 1)[-1]}" + (f" (+{more} more)" if more else ""))
    if i.actions:
        parts.append("then " + ", ".join(i.actions))
    cost = f"{i.downtime:.1f} s down" + (
        f", {i.lost_steps} step{'s' * (i.lost_steps != 1)} lost" if i.lost_steps else ""
    )
    return "; ".join([*parts, cost])
