"""What one failure costs: the cost profiles the goodput simulator projects with.

A profile is a TOML file with a ``[costs]`` table (seconds) and a ``[sources]`` table saying where
each number comes from. Two ship in ``goodput/profiles/``: ``stalwart`` (this runtime's
figures: measured where a measurement exists, else a stated assumption) and ``llama3`` (what the
Llama 3 paper publishes, and assumptions where it publishes nothing). :func:`measured_profile`
replaces the figures a real run directory measures (checkpoint blocking, load, restart downtime,
detection latency, start-up) with the medians from its event log: restart downtime and detection
latency per fault incident of :func:`compute_goodput` (one per root cause, planned ones left out).
"""

from __future__ import annotations

import dataclasses
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stalwart.errors import UserError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
# How a failure is noticed: a device probe (gpu), the process exiting (crash), only a timeout
# because collectives stall (hang), the host vanishing (host), or a periodic corruption check (sdc).
DETECTORS = ("gpu", "crash", "hang", "host", "sdc")
# Incident kinds (:mod:`stalwart.goodput.incidents`) → the detector class whose latency they measure.
INCIDENT_DETECTOR = {
    "gpu_fault": "gpu",
    "rank_died": "crash",
    "hang": "hang",
    "node_lost": "host",
    "sdc": "sdc",
}


class CostProfileError(UserError, ValueError):
    """A profile name, file or run directory the simulator cannot use."""


@dataclass
class CostProfile:
    """Seconds each part of a failure costs; ``memory_interval_s == 0`` means no in-memory tier."""

    name: str
    detection_s: dict[str, float]
    restart_s: float
    load_s: float
    ckpt_blocking_s: float
    interval_s: float
    memory_interval_s: float = 0.0
    memory_blocking_s: float = 0.0
    memory_load_s: float = 0.0
    spare_s: float = 0.0
    startup_s: float = 0.0
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def has_memory_tier(self) -> bool:
        return self.memory_interval_s > 0

    def scaled(self, knob: str, factor: float) -> CostProfile:
        """A copy with one knob (a field name, or ``detection_s`` for every detector) times ``factor``."""
        if knob == "detection_s":
            return dataclasses.replace(self, detection_s={k: v * factor for k, v in self.detection_s.items()})
        return dataclasses.replace(self, **{knob: getattr(self, knob) * factor})


_SCALARS = [f.name for f in dataclasses.fields(CostProfile) if f.name not in ("name", "detection_s", "sources")]


def profile_from_dict(name: str, data: dict[str, Any]) -> CostProfile:
    costs = dict(data.get("costs", {}))
    detection = costs.pop("detection_s", {})
    missing = [d for d in DETECTORS if d not in detection] + [
        k for k in ("restart_s", "load_s", "ckpt_blocking_s", "interval_s") if k not in costs
    ]
    unknown = sorted(set(costs) - set(_SCALARS)) + sorted(set(detection) - set(DETECTORS))
    if missing or unknown:
        raise CostProfileError(
            f"cost profile {name!r}: "
            + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
            )
            + f"; see {PROFILES_DIR / 'stalwart.toml'} for the keys"
        )
    values = {k: float(v) for k, v in costs.items()}
    if any(v < 0 for v in [*values.values(), *map(float, detection.values())]) or values["interval_s"] <= 0:
        raise CostProfileError(f"cost profile {name!r}: costs must be >= 0 seconds and interval_s > 0")
    return CostProfile(
        name=str(data.get("name", name)),
        detection_s={k: float(v) for k, v in detection.items()},
        sources={str(k): str(v) for k, v in data.get("sources", {}).items()},
        **values,
    )


def load_profile(spec: str) -> CostProfile:
    """A shipped profile by name (``stalwart``, ``llama3``) or a TOML file of the same shape."""
    path = PROFILES_DIR / f"{spec}.toml"
    if not path.is_file():
        path = Path(spec)
    if not path.is_file():
        names = sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
        raise CostProfileError(
            f"no cost profile {spec!r}: use one of {', '.join(names)}, 'measured RUN', or a TOML file"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise CostProfileError(f"cannot read cost profile {path}: {e}") from None
    return profile_from_dict(path.stem, data)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measured_profile(run_dir: str | Path, base: CostProfile) -> CostProfile:
    """``base`` with every figure that ``run_dir``'s events measure replaced by the run's median."""
    from stalwart.events import read_events
    from stalwart.goodput.accounting import compute_goodput

    if not (Path(run_dir) / "events").is_dir():
        raise CostProfileError(f"{Path(run_dir) / 'events'} does not exist: 'measured RUN' needs a run directory")
    events = list(read_events(run_dir))
    if not events:
        raise CostProfileError(f"no readable events under {run_dir}/events: did the job start?")
    report = compute_goodput(events)
    trainer0 = [e for e in events if e.get("role") == "trainer" and e.get("rank") == 0]
    blocking: dict[tuple, float] = {}
    for e in trainer0:  # one save = its stage and commit blocking together, on rank 0
        if e["kind"] in ("ckpt_stage", "ckpt_commit") and isinstance(e.get("blocking_seconds"), (int, float)):
            key = (e.get("pid"), e.get("step"))
            blocking[key] = blocking.get(key, 0.0) + float(e["blocking_seconds"])
    loads = [
        float(e["seconds"]) for e in trainer0 if e["kind"] == "ckpt_load" and isinstance(e.get("seconds"), (int, float))
    ]
    inits = [
        float(e["seconds"]) for e in trainer0 if e["kind"] == "init_done" and isinstance(e.get("seconds"), (int, float))
    ]
    # Downtime runs from detection to training again. An in-process recovery's downtime is its
    # re-formation (the replacement's start and state included), as rank 0 measured it; a run that
    # recovered in place is measured by those. Otherwise per fault incident (one root cause, its
    # consequences folded in): its downtime less the reloads inside it (load_s stays apart).
    reforms = [
        float(e["seconds"])
        for e in trainer0
        if e["kind"] == "reform_end" and not e.get("newcomer") and isinstance(e.get("seconds"), (int, float))
    ]
    from_peers = bool(reforms) and all(
        e.get("source") == "peer" for e in trainer0 if e["kind"] == "reform_end" and not e.get("newcomer")
    )
    faults = [i for i in report.incidents if not i.planned and i.downtime > 0 and "restart" in i.actions]
    restarts = reforms or [
        max(0.0, i.downtime - sum(c.seconds or 0.0 for c in i.consequences if c.action in ("reload", "fallback")))
        for i in faults
    ]
    detections: dict[str, list[float]] = {}
    for i in report.incidents:
        if not i.planned and i.kind in INCIDENT_DETECTOR and i.detection_latency is not None:
            detections.setdefault(INCIDENT_DETECTOR[i.kind], []).append(i.detection_latency)

    measured = {
        "ckpt_blocking_s": (_median(list(blocking.values())), f"{len(blocking)} saves"),
        # A replacement's state from a peer is part of the re-formation: nothing is loaded after it.
        "load_s": (0.0, "state from peers inside the re-formations")
        if from_peers
        else (_median(loads), f"{len(loads)} loads"),
        "startup_s": (_median(inits[:1]), "first init_done"),
        "restart_s": (
            _median(restarts),
            f"{len(reforms)} in-process re-formations"
            if reforms
            else f"{len(restarts)} fault incidents' downtime less their reloads",
        ),
    }
    profile = dataclasses.replace(
        base, name=f"measured:{Path(run_dir).name}", detection_s=dict(base.detection_s), sources=dict(base.sources)
    )
    for key, (value, what) in measured.items():
        if value is not None:
            setattr(profile, key, value)
            profile.sources[key] = f"median over {what} in {run_dir} (compute_goodput)"
        else:
            profile.sources[key] = f"not measured in {run_dir}; {base.name}: {base.sources.get(key, 'default')}"
    for detector, values in detections.items():
        profile.detection_s[detector] = statistics.median(values)
        profile.sources[f"detection_s.{detector}"] = f"median over {len(values)} incident(s) in {run_dir}"
    return profile
