"""What to break, where and when: a fault plan read from a file or the environment.

A plan is a TOML or JSON file of ``[[fault]]`` tables (or a JSON list), e.g.::

    [[fault]]
    kind = "kill_rank"   # see FaultKind
    step = 12            # fires at the start of this step (or the first step after it)
    rank = 3             # global rank that acts; omit for "every rank" kinds
    node = "node1"       # for node-level kinds (gpu_fault, lose_node, kill_agent)
    seconds = 30         # hang / slow duration

Plans are taken from ``$STALWART_FAULT_PLAN`` (a path, or inline JSON). They are refused unless
``STALWART_FAULT_INJECTION=1`` is also set: a plan left lying around on a production node, or a
config copied from a chaos test, must not break a real job by accident.
"""

from __future__ import annotations

import enum
import json
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from stalwart.errors import MissingInputError
from stalwart.health.probes import FAULT_INJECTION_ENV

FAULT_PLAN_ENV = "STALWART_FAULT_PLAN"


class FaultInjectionDisabled(RuntimeError):
    """A plan was given but injection is not enabled in this environment."""


class FaultKind(str, enum.Enum):
    KILL_RANK = "kill_rank"  # SIGKILL one rank: the agent restarts the group
    HANG = "hang"  # one rank stops making progress (SIGSTOP, or sleep with `seconds`)
    SLOW = "slow"  # one rank computes `seconds` longer per step for `steps` steps: a straggler
    FLIP_BIT = "flip_bit"  # one bit of one parameter element on one rank: silent data corruption
    GPU_FAULT = "gpu_fault"  # the node's health probe reports a fatal GPU fault (XID 79)
    KILL_AGENT = "kill_agent"  # SIGKILL one node's launcher agent and its workers: a lost node
    CKPT_KILL_DURING_WRITE = "ckpt_kill_during_write"  # SIGKILL a rank while a save is being written
    KILL_AFTER_COMMIT = "kill_after_commit"  # SIGKILL a rank right after its save returned (committed when sync)
    NAN_PARAMS = "nan_params"  # every local parameter of one rank turns NaN (what a diverged update leaves)
    CKPT_CORRUPT = "ckpt_corrupt"  # flip a byte in a committed shard of the newest step
    SIGTERM = "sigterm"  # preemption: SIGTERM to the launcher (or the rank without one)
    KILL_DURING_REFORM = "kill_during_reform"  # SIGKILL a rank while it re-forms after another rank's loss


@dataclass(frozen=True)
class FaultSpec:
    kind: FaultKind
    step: int
    rank: int | None = None
    """The acting global rank; rank 0 when omitted (node-level kinds use ``node`` instead)."""
    node: str | None = None
    """For node-level kinds: the node's name, or "any" for whichever node's first rank gets there first."""
    seconds: float = 0.0
    steps: int = 1
    bit: int = 30
    """For flip_bit: which bit of the fp32 element (30 = top exponent bit: a loud corruption)."""

    @property
    def id(self) -> str:
        """Stable name for the fire-once ledger: a restarted job replays steps but not faults."""
        where = f"r{self.rank}" if self.rank is not None else f"n{self.node}" if self.node else "all"
        return f"{self.kind.value}-s{self.step}-{where}"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FaultSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"fault {raw}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        try:
            kind = FaultKind(raw.get("kind"))
        except ValueError:
            raise ValueError(f"fault {raw}: kind must be one of {[k.value for k in FaultKind]}") from None
        if "step" not in raw or int(raw["step"]) < 1:
            raise ValueError(f"fault {raw}: needs step >= 1")
        return cls(**{**raw, "kind": kind})

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, FaultKind) else v) for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[FaultSpec, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.faults)

    @classmethod
    def parse(cls, text: str, source: str = "plan") -> FaultPlan:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            try:
                raw = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"fault plan {source}: not valid TOML or JSON: {e}") from None
        items = raw if isinstance(raw, list) else raw.get("fault", [])
        return cls(tuple(FaultSpec.from_dict(dict(item)) for item in items))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> FaultPlan:
        """The plan in ``$STALWART_FAULT_PLAN`` (path or inline JSON); empty when unset."""
        env = os.environ if env is None else env
        spec = env.get(FAULT_PLAN_ENV, "").strip()
        if not spec:
            return cls()
        if env.get(FAULT_INJECTION_ENV) != "1":
            raise FaultInjectionDisabled(
                f"{FAULT_PLAN_ENV} is set but fault injection is off; set {FAULT_INJECTION_ENV}=1 to run a "
                f"chaos plan, or unset {FAULT_PLAN_ENV} for a normal run"
            )
        if spec.startswith(("[", "{")):  # inline JSON
            return cls.parse(spec, FAULT_PLAN_ENV)
        path = Path(spec)
        if not path.is_file():
            raise MissingInputError(f"{FAULT_PLAN_ENV}={spec}: no such fault plan file")
        return cls.parse(path.read_text(), str(path))

    def to_json(self) -> str:
        return json.dumps([f.to_dict() for f in self.faults])
