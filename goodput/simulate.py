"""``stalwart goodput simulate``: project goodput at cluster scale from a failure mix and a cost profile.

Failure mix (default): Llama 3 405B's 54-day pre-training snapshot on 16,384 H100s, "The Llama 3
Herd of Models" (Meta, 2024, arXiv:2407.21783), section 3.3.4, Table 5 "Root-cause categorization
of unexpected interruptions": 419 unexpected interruptions (148 faulty GPU, 72 GPU HBM3, 54 software
bug, 35 network switch/cable, 32 unplanned host maintenance, 19 GPU SRAM, 17 GPU system processor,
7 NIC, 7 NCCL watchdog timeouts, 6 silent data corruption, 6 GPU thermal interface + sensor, 3 SSD,
3 power supply, 2 server chassis, 2 IO expansion board, 2 dependency, 2 CPU, 2 system memory) plus
47 planned interruptions. Unexpected failures arrive as independent Poisson processes whose rates
scale linearly with the GPU count; planned ones are per job and keep their rate.

The model of one job (wall time ``days``): start-up, then cycles of *running* (exponential time to
the next interruption) and *recovery*. While running, the job computes ``interval_s`` then blocks
``ckpt_blocking_s`` to save, repeatedly (with an in-memory tier: a memory snapshot every
``memory_interval_s``, every n-th one also persisted). An interruption of type k costs detection
latency (by how it is noticed: :data:`~stalwart.goodput.costs.DETECTORS`), restart, the
wait for a spare if the node must go, the checkpoint load, and the work since the newest surviving
checkpoint (the memory snapshot where the type leaves host memory intact, else the persisted one);
a planned interruption saves first and loses nothing. Costs are categorised like the accounting
of real runs (:data:`~stalwart.goodput.accounting.CATEGORIES`).

Two estimates of the same model: Monte Carlo (numpy, seeded; mean over ``replicas`` jobs with a
95 % normal confidence interval) and the closed-form renewal-reward limit ``E[kept work per cycle]
/ E[cycle]`` (exact for exponential inter-failure times, ignoring the job's ends). The interval
sweep finds the interval that maximises goodput and prints Young/Daly's ``sqrt(2·δ·MTBF)`` beside it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stalwart.goodput.accounting import CATEGORIES, PRODUCTIVE
from stalwart.goodput.costs import CostProfile

DAY_S = 86400.0
Z95 = 1.959964


@dataclass(frozen=True)
class FailureType:
    name: str
    count: int  # in the reference window on the reference GPU count
    detector: str  # a key of CostProfile.detection_s
    memory_survives: bool  # host memory (an in-memory checkpoint) outlives the failure
    replaces_node: bool  # the node is excluded: a spare may have to join


@dataclass(frozen=True)
class FailureModel:
    name: str
    types: tuple[FailureType, ...]
    window_days: float
    reference_gpus: int
    planned: int  # planned interruptions in the window, per job (not scaled with GPUs)
    rate_factor: float = 1.0  # what-if multiplier on the unexpected failure rate

    def rates(self, gpus: int) -> np.ndarray:
        """Per second: one rate per unexpected type (scaled linearly with ``gpus``), then planned."""
        window = self.window_days * DAY_S
        scale = self.rate_factor * gpus / self.reference_gpus
        return np.array([t.count * scale / window for t in self.types] + [self.planned / window])


def _t(name: str, count: int, detector: str, memory: bool = True, replace: bool = True) -> FailureType:
    return FailureType(name, count, detector, memory, replace)


# Table 5 of the Llama 3 paper; detector and survival are our reading of each root cause.
LLAMA3_MIX = FailureModel(
    name="Llama 3 405B, 54 days on 16,384 H100s (Table 5)",
    types=(
        _t("faulty GPU", 148, "gpu"),
        _t("GPU HBM3 memory", 72, "gpu"),
        _t("software bug", 54, "crash", replace=False),
        _t("network switch/cable", 35, "hang"),
        _t("host maintenance (unplanned)", 32, "host", memory=False),
        _t("GPU SRAM memory", 19, "gpu"),
        _t("GPU system processor", 17, "gpu"),
        _t("NIC", 7, "hang"),
        _t("NCCL watchdog timeout", 7, "hang", replace=False),
        _t("silent data corruption", 6, "sdc", memory=False),  # roll back to the last verified save
        _t("GPU thermal interface + sensor", 6, "gpu"),
        _t("SSD", 3, "host", memory=False),
        _t("power supply", 3, "host", memory=False),
        _t("server chassis", 2, "host", memory=False),
        _t("IO expansion board", 2, "host", memory=False),
        _t("dependency", 2, "crash", replace=False),
        _t("CPU", 2, "host", memory=False),
        _t("system memory", 2, "host", memory=False),
    ),
    window_days=54.0,
    reference_gpus=16384,
    planned=47,
)


@dataclass
class _Outcomes:
    """Per-outcome constants (unexpected types, then planned) for one model, profile and GPU count."""

    rates: np.ndarray
    memory: np.ndarray  # bool: lost work counts from the memory snapshot
    planned: np.ndarray  # bool: saves first, loses nothing
    downtime: dict[str, np.ndarray]  # category -> seconds, in the order they happen

    @property
    def total_downtime(self) -> np.ndarray:
        return sum(self.downtime.values())


def _outcomes(model: FailureModel, costs: CostProfile, gpus: int) -> _Outcomes:
    types = model.types
    mem = costs.has_memory_tier
    load = [costs.memory_load_s if mem and t.memory_survives else costs.load_s for t in types]
    return _Outcomes(
        rates=model.rates(gpus),
        memory=np.array([mem and t.memory_survives for t in types] + [False]),
        planned=np.array([False] * len(types) + [True]),
        downtime={
            "checkpoint_save": np.array([0.0] * len(types) + [costs.ckpt_blocking_s]),
            "detection_latency": np.array([costs.detection_s[t.detector] for t in types] + [0.0]),
            "hot_spare_wait": np.array([costs.spare_s if t.replaces_node else 0.0 for t in types] + [0.0]),
            "restart_downtime": np.array([costs.restart_s] * len(types) + [costs.restart_s]),
            "checkpoint_load": np.array(load + [costs.load_s]),
        },
    )


@dataclass(frozen=True)
class _Schedule:
    """Saves while running: every ``n``-th of the snapshots ``tau_m`` apart is persisted (blocking ``delta``)."""

    tau_m: float
    delta_m: float
    n: int
    delta: float

    @classmethod
    def of(cls, costs: CostProfile, interval: float) -> _Schedule:
        if not costs.has_memory_tier:
            return cls(interval, costs.ckpt_blocking_s, 1, costs.ckpt_blocking_s)
        n = max(1, round(interval / costs.memory_interval_s))
        return cls(
            costs.memory_interval_s, costs.memory_blocking_s, n, max(costs.ckpt_blocking_s, costs.memory_blocking_s)
        )

    @property
    def unit(self) -> float:
        return self.tau_m + self.delta_m

    @property
    def period(self) -> float:
        return self.n * self.tau_m + (self.n - 1) * self.delta_m + self.delta

    def split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For running times ``x``: (work kept by the persisted saves, by the memory snapshots, blocking)."""
        k = np.floor(x / self.period)
        r = x - k * self.period
        j = np.minimum(np.floor(r / self.unit), self.n - 1)
        block_now = np.where(j == self.n - 1, self.delta, self.delta_m)
        partial = np.clip(r - j * self.unit - self.tau_m, 0.0, block_now)
        kept_p = k * self.n * self.tau_m
        blocking = k * ((self.n - 1) * self.delta_m + self.delta) + j * self.delta_m + partial
        return kept_p, kept_p + j * self.tau_m, blocking

    def expected(self, lam: float) -> tuple[float, float, float]:
        """E[split(X)] for X ~ Exp(lam), in closed form (see module docstring)."""
        S = self.period
        q = math.exp(-lam * S)
        ek = q / (1.0 - q)

        def tail(a: float) -> float:  # P(X mod S >= a), 0 <= a <= S
            return (math.exp(-lam * a) - q) / (1.0 - q)

        def clip_mean(a: float, b: float) -> float:  # E[clip(X mod S - a, 0, b)]
            return ((math.exp(-lam * a) - math.exp(-lam * (a + b))) / lam - q * b) / (1.0 - q)

        kept_p = ek * self.n * self.tau_m
        ej = sum(tail(j * self.unit) for j in range(1, self.n))
        blocks = [(j * self.unit + self.tau_m, self.delta_m) for j in range(self.n - 1)]
        blocks.append(((self.n - 1) * self.unit + self.tau_m, self.delta))
        blocking = ek * ((self.n - 1) * self.delta_m + self.delta) + sum(clip_mean(a, b) for a, b in blocks)
        return kept_p, kept_p + ej * self.tau_m, blocking


def expected_goodput(
    model: FailureModel, costs: CostProfile, gpus: int, interval: float | None = None, days: float | None = None
) -> float:
    """Closed-form long-run goodput (renewal reward); ``days`` charges the start-up once per job."""
    out = _outcomes(model, costs, gpus)
    lam = float(out.rates.sum())
    sched = _Schedule.of(costs, interval or costs.interval_s)
    if lam > 0:
        p = out.rates / lam
        kept_p, kept_m, blocking = sched.expected(lam)
        kept = np.where(out.planned, 1.0 / lam - blocking, np.where(out.memory, kept_m, kept_p))
        g = float(p @ kept) / (1.0 / lam + float(p @ out.total_downtime))
    else:  # nothing ever fails: only the saves cost
        g = sched.n * sched.tau_m / sched.period
    if days:
        g *= max(0.0, 1.0 - costs.startup_s / (days * DAY_S))
    return g


@dataclass
class _Draws:
    """One Monte Carlo sample of jobs: cycle running times and what ended each, cut at the job's end."""

    run: np.ndarray  # running seconds of each cycle inside the job
    failed: np.ndarray  # bool: the cycle ended in an interruption inside the job
    outcome: np.ndarray
    downtime: dict[str, np.ndarray]  # category -> seconds inside the job


def _draw(out: _Outcomes, costs: CostProfile, days: float, replicas: int, rng: np.random.Generator) -> _Draws:
    horizon = days * DAY_S
    lam = float(out.rates.sum())
    span = max(0.0, horizon - costs.startup_s)
    if lam <= 0:  # one cycle that runs to the job's end
        zeros = np.zeros((replicas, 1))
        return _Draws(zeros + span, zeros.astype(bool), zeros.astype(int), {c: zeros for c in out.downtime})
    p = out.rates / lam
    m = int(lam * span + 8.0 * math.sqrt(lam * span) + 16)
    x = rng.exponential(1.0 / lam, (replicas, m))
    o = rng.choice(len(p), size=(replicas, m), p=p)
    down = out.total_downtime
    while True:
        length = x + down[o]
        end = costs.startup_s + np.cumsum(length, axis=1)
        if (end[:, -1] >= horizon).all():
            break
        x = np.hstack([x, rng.exponential(1.0 / lam, (replicas, m))])
        o = np.hstack([o, rng.choice(len(p), size=(replicas, m), p=p)])
    start = end - length
    run = np.clip(np.minimum(x, horizon - start), 0.0, None)
    failed = start + x < horizon
    left = np.where(failed, horizon - (start + x), 0.0)  # recovery seconds inside the job
    downtime = {}
    for cat, secs in out.downtime.items():  # in order: each category gets what time is left
        got = np.minimum(secs[o], left)
        downtime[cat] = got
        left = left - got
    return _Draws(run, failed, o, downtime)


def _account(d: _Draws, out: _Outcomes, sched: _Schedule, horizon: float, startup: float) -> dict[str, np.ndarray]:
    """Seconds per category per replica (rows sum to the job's wall time)."""
    kept_p, kept_m, blocking = sched.split(d.run)
    kept = np.where(
        ~d.failed | out.planned[d.outcome],
        d.run - blocking,  # the job's end and planned stops save
        np.where(out.memory[d.outcome], kept_m, kept_p),
    )
    totals = {c: np.zeros(d.run.shape[0]) for c in (PRODUCTIVE, *CATEGORIES)}
    totals[PRODUCTIVE] = kept.sum(axis=1)
    totals["checkpoint_save"] = blocking.sum(axis=1)
    totals["lost_progress"] = (d.run - blocking - kept).sum(axis=1)
    for cat, secs in d.downtime.items():
        totals[cat] = totals[cat] + secs.sum(axis=1)
    totals["startup"] += min(startup, horizon)
    return totals


@dataclass
class Estimate:
    interval_s: float
    mean: float
    ci95: float  # half-width of the 95 % confidence interval of the mean
    p05: float
    p95: float
    closed_form: float
    breakdown: dict[str, float] = field(default_factory=dict)  # share of wall time per category

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _estimate(
    d: _Draws, out: _Outcomes, model: FailureModel, costs: CostProfile, gpus: int, days: float, interval: float
) -> Estimate:
    horizon = days * DAY_S
    totals = _account(d, out, _Schedule.of(costs, interval), horizon, costs.startup_s)
    g = totals[PRODUCTIVE] / horizon
    ci = Z95 * float(g.std(ddof=1)) / math.sqrt(len(g)) if len(g) > 1 else float("nan")
    return Estimate(
        interval_s=interval,
        mean=float(g.mean()),
        ci95=ci,
        p05=float(np.percentile(g, 5)),
        p95=float(np.percentile(g, 95)),
        closed_form=expected_goodput(model, costs, gpus, interval, days),
        breakdown={c: float(v.mean()) / horizon for c, v in totals.items() if c != PRODUCTIVE},
    )


def persistent_mtbf(model: FailureModel, costs: CostProfile, gpus: int) -> float:
    """Mean seconds between the failures that roll back to a persisted checkpoint."""
    rates = model.rates(gpus)[:-1]
    if costs.has_memory_tier:
        rates = rates[[not t.memory_survives for t in model.types]]
    return 1.0 / float(rates.sum()) if rates.sum() > 0 else math.inf


def young_daly(model: FailureModel, costs: CostProfile, gpus: int) -> float:
    """Young/Daly's first-order optimal interval sqrt(2·δ·MTBF)."""
    return math.sqrt(2.0 * costs.ckpt_blocking_s * persistent_mtbf(model, costs, gpus))


def best_interval(model: FailureModel, costs: CostProfile, gpus: int, days: float | None = None) -> float:
    """The interval that maximises the closed form (log-grid search, then golden-section refinement)."""
    lo_bound = max(costs.memory_interval_s, 1e-3)
    yd = young_daly(model, costs, gpus)
    hi_bound = max(100.0 * yd if math.isfinite(yd) else 0.0, 10.0 * costs.interval_s, 10.0 * lo_bound)
    grid = np.geomspace(lo_bound, hi_bound, 121)
    vals = [expected_goodput(model, costs, gpus, float(t), days) for t in grid]
    i = int(np.argmax(vals))
    a, b = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])

    def f(u: float) -> float:
        return -expected_goodput(model, costs, gpus, math.exp(u), days)

    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        c, d = b - g * (b - a), a + g * (b - a)
        a, b = (a, d) if f(c) < f(d) else (c, b)
    return math.exp((a + b) / 2)


# Cost knobs for the sensitivity analysis, with the words the report uses.
KNOBS = {
    "detection_s": "detection latency",
    "restart_s": "restart",
    "load_s": "checkpoint load",
    "ckpt_blocking_s": "checkpoint blocking",
    "spare_s": "spare wait",
    "failure_rate": "failure rate",
}


def _variant(model: FailureModel, costs: CostProfile, knob: str, factor: float) -> tuple[FailureModel, CostProfile]:
    if knob == "failure_rate":
        return dataclasses.replace(model, rate_factor=model.rate_factor * factor), costs
    return model, costs.scaled(knob, factor)


def _best_goodput(model: FailureModel, costs: CostProfile, gpus: int, days: float) -> float:
    return expected_goodput(model, costs, gpus, best_interval(model, costs, gpus, days), days)


def factor_needed(
    model: FailureModel, costs: CostProfile, gpus: int, days: float, knob: str, target: float
) -> float | None:
    """The largest factor on one knob that reaches ``target`` (best interval each time); None if 0 does not."""
    if _best_goodput(*_variant(model, costs, knob, 1.0), gpus, days) >= target:
        return 1.0
    if _best_goodput(*_variant(model, costs, knob, 0.0), gpus, days) < target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _best_goodput(*_variant(model, costs, knob, mid), gpus, days) >= target else (lo, mid)
    return lo


@dataclass
class ScaleResult:
    gpus: int
    unexpected_per_job: float
    planned_per_job: float
    mtbf_s: float
    at_profile: Estimate
    at_best: Estimate
    best_interval_closed_form_s: float
    best_interval_mc_s: float
    young_daly_s: float
    halved: dict[str, float]  # knob -> closed-form goodput at its best interval with the knob halved
    needed: dict[str, float | None]  # knob -> factor that reaches the target (None: not alone)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["at_profile"], out["at_best"] = self.at_profile.to_json(), self.at_best.to_json()
        return out


def simulate(
    model: FailureModel,
    costs: CostProfile,
    gpus: int,
    days: float = 54.0,
    replicas: int = 1000,
    seed: int = 0,
    target: float = 0.97,
) -> ScaleResult:
    """Monte Carlo at the profile's interval and at the best one, the sweep, and the sensitivity."""
    out = _outcomes(model, costs, gpus)
    draws = _draw(out, costs, days, replicas, np.random.default_rng(seed))
    best = best_interval(model, costs, gpus, days)
    # The Monte Carlo sweep reuses the same draws (common random numbers) on a grid around
    # Young/Daly, so its optimum is found independently of the closed form's.
    yd = young_daly(model, costs, gpus)
    centre = yd if math.isfinite(yd) else best
    grid = np.geomspace(max(centre / 4, costs.memory_interval_s or 1e-3), centre * 4, 41)
    mc = [
        _account(draws, out, _Schedule.of(costs, float(t)), days * DAY_S, costs.startup_s)[PRODUCTIVE].mean()
        for t in grid
    ]
    rate = float(out.rates[:-1].sum())
    return ScaleResult(
        gpus=gpus,
        unexpected_per_job=rate * days * DAY_S,
        planned_per_job=float(out.rates[-1]) * days * DAY_S,
        mtbf_s=1.0 / rate,
        at_profile=_estimate(draws, out, model, costs, gpus, days, costs.interval_s),
        at_best=_estimate(draws, out, model, costs, gpus, days, best),
        best_interval_closed_form_s=best,
        best_interval_mc_s=float(grid[int(np.argmax(mc))]),
        young_daly_s=yd,
        halved={k: _best_goodput(*_variant(model, costs, k, 0.5), gpus, days) for k in KNOBS},
        needed={k: factor_needed(model, costs, gpus, days, k, target) for k in KNOBS},
    )


def _knob_value(costs: CostProfile, knob: str) -> float:
    """Seconds one knob stands for (detection: the mean over detectors, for the report)."""
    return float(np.mean(list(costs.detection_s.values()))) if knob == "detection_s" else getattr(costs, knob)


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f} %"


def format_text(
    results: list[ScaleResult],
    model: FailureModel,
    costs: CostProfile,
    days: float,
    replicas: int,
    seed: int,
    target: float,
) -> str:
    """Terminal report: one block per GPU count."""
    lines = [
        f"failure mix  {model.name}: {sum(t.count for t in model.types)} unexpected + {model.planned} planned, rates "
        "scaled with GPU count",
        f"costs        {costs.name}: detection {', '.join(f'{k} {v:.4g} s' for k, v in costs.detection_s.items())}; "
        f"restart {costs.restart_s:.4g} s; load {costs.load_s:.4g} s; checkpoint blocking {costs.ckpt_blocking_s:.4g} "
        "s "
        f"every {costs.interval_s:g} s; "
        + (
            f"memory tier every {costs.memory_interval_s:g} s (blocking {costs.memory_blocking_s:g} s, load "
            f"{costs.memory_load_s:g} s); "
            if costs.has_memory_tier
            else "no memory tier; "
        )
        + f"spare wait {costs.spare_s:g} s; start-up {costs.startup_s:.4g} s",
        f"job          {days:g} days; Monte Carlo over {replicas} jobs, seed {seed}; goodput = mean ± 95 % CI "
        "[5th..95th percentile job]",
    ]
    for r in results:
        lines += [
            "",
            (
                f"{r.gpus:,} GPUs: {r.unexpected_per_job:,.0f} unexpected + {r.planned_per_job:,.0f} planned "
                "interruptions "
                f"per job, MTBF {r.mtbf_s / 3600:.2f} h"
            ),
        ]
        for label, e in (("profile interval", r.at_profile), ("best interval", r.at_best)):
            lines.append(
                f"  {label:<17}{e.interval_s:>9,.1f} s  goodput {_pct(e.mean)} ± {100 * e.ci95:.3f}  "
                f"[{_pct(e.p05)} .. {_pct(e.p95)}]  closed form {_pct(e.closed_form)}"
            )
        lines.append(
            f"  best interval: sweep {r.best_interval_closed_form_s:,.1f} s (closed form), "
            f"{r.best_interval_mc_s:,.1f} s "
            f"(Monte Carlo); Young/Daly sqrt(2·δ·MTBF) = {r.young_daly_s:,.1f} s"
        )
        parts = sorted(r.at_best.breakdown.items(), key=lambda kv: -kv[1])
        lines.append("  badput at best interval: " + ", ".join(f"{c} {_pct(v)}" for c, v in parts if v > 0))
        lines.append("  halve one cost: " + ", ".join(f"{KNOBS[k]} {_pct(v)}" for k, v in r.halved.items()))
        if r.at_best.closed_form >= target:
            lines.append(f"  above {_pct(target)} already at the best interval")
        else:
            need = [
                f"{KNOBS[k]} x{f:.2f}" + (f" ({_knob_value(costs, k) * f:,.1f} s)" if k != "failure_rate" else "")
                if f is not None
                else f"{KNOBS[k]}: not alone"
                for k, f in r.needed.items()
            ]
            lines.append(f"  to reach {_pct(target)} (one cost at a time, best interval): " + ", ".join(need))
    sources = [f"  {k}: {v}" for k, v in costs.sources.items()]
    return "\n".join(lines + ["", "where the costs come from:", *sources]) + "\n"


def to_json(
    results: list[ScaleResult],
    model: FailureModel,
    costs: CostProfile,
    days: float,
    replicas: int,
    seed: int,
    target: float,
) -> dict[str, Any]:
    return {
        "failure_model": {
            "name": model.name,
            "window_days": model.window_days,
            "reference_gpus": model.reference_gpus,
            "planned": model.planned,
            "types": [t.__dict__ for t in model.types],
        },
        "costs": {k: v for k, v in costs.__dict__.items()},
        "days": days,
        "replicas": replicas,
        "seed": seed,
        "target": target,
        "results": [r.to_json() for r in results],
    }
