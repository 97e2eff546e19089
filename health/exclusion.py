"""Which nodes are out of the job, and the policy that puts them there.

``RUN_DIR/excluded_nodes.json`` maps a node (its node rank, as a string) to ``{"reason", "ts",
"host"}``. The controller adds to it, the launcher reads it before every rendezvous and keeps an
excluded node out (exit 93 on that node). It is one small JSON object replaced atomically (write a
temporary file, fsync, rename), with a lock file serialising the read-modify-write of writers that
share the file system, so a reader never sees half a list and two writers never lose an entry.

Policy: a node reporting UNHEALTHY (a dead GPU, fatal XID, uncorrectable ECC) leaves at once; a
straggler or a node with network faults leaves after ``N`` strikes of that kind, because one slow
window or one timeout is more often congestion than broken hardware.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stalwart.files import atomic_write_json

log = logging.getLogger(__name__)

EXCLUDED_FILE = "excluded_nodes.json"


@dataclass(frozen=True)
class Exclusion:
    reason: str
    ts: float
    host: str = ""


class ExclusionList:
    """``RUN_DIR/excluded_nodes.json``; every call re-reads the file, so other writers are seen."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / EXCLUDED_FILE
        self._lock_path = Path(run_dir) / f".{EXCLUDED_FILE}.lock"

    def load(self) -> dict[str, Exclusion]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{self.path} is not a readable JSON object ({e}); fix or delete it (the controller rewrites it)"
            ) from e
        if not isinstance(raw, dict):
            raise ValueError(f"{self.path} must hold a JSON object node -> {{reason, ts}}; fix or delete it")
        return {
            str(node): Exclusion(str(v.get("reason", "")), float(v.get("ts", 0.0)), str(v.get("host", "")))
            for node, v in raw.items()
            if isinstance(v, dict)
        }

    def add(self, node: str | int, reason: str, host: str = "") -> bool:
        """Exclude ``node``; False (and the first reason kept) when it already was."""
        node = str(node)
        with self._locked():
            current = self.load()
            if node in current:
                return False
            current[node] = Exclusion(reason, time.time(), host)
            atomic_write_json(self.path, {n: asdict(e) for n, e in sorted(current.items())})
        log.warning("node %s excluded: %s", node, reason)
        return True

    def __contains__(self, node: object) -> bool:
        return str(node) in self.load()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class ExclusionPolicy:
    """Strike limits per fault kind; 0 means that kind never excludes a node."""

    straggler_strikes: int = 3
    network_strikes: int = 3

    def __post_init__(self) -> None:
        if self.straggler_strikes < 0 or self.network_strikes < 0:
            raise ValueError("strike limits must be >= 0 (0 never excludes for that kind)")

    def limit(self, kind: str) -> int:
        return {"straggler": self.straggler_strikes, "network": self.network_strikes}[kind]


@dataclass
class StrikeBook:
    """Strikes per node and kind; :meth:`strike` says when a node has used up its limit."""

    policy: ExclusionPolicy = field(default_factory=ExclusionPolicy)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def strike(self, node: str, kind: str) -> str | None:
        """Count one strike; returns the exclusion reason when this one reaches the limit."""
        per_node = self.counts.setdefault(node, {})
        per_node[kind] = per_node.get(kind, 0) + 1
        limit = self.policy.limit(kind)
        if limit and per_node[kind] >= limit:
            return f"{kind}: {per_node[kind]} strikes (limit {limit})"
        return None
