"""The controller's rollback order: ``RUN_DIR/rollback_request.json``.

``RequestRollback`` (an operator, or an SDC verdict reaching the controller) resolves the target to
a committed step, writes it here and kills the worker groups; the restarted trainers load this step
instead of the newest one. Each request has a fresh ``id`` so a trainer can tell a request it has
already honoured (it records the id in its ``rollback`` event) from a new one.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stalwart.files import atomic_write_json

ROLLBACK_FILE = "rollback_request.json"


@dataclass(frozen=True)
class RollbackOrder:
    step: int
    reason: str
    ts: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


def write_rollback_order(run_dir: str | os.PathLike, order: RollbackOrder) -> Path:
    path = Path(run_dir) / ROLLBACK_FILE
    atomic_write_json(path, asdict(order))
    return path


def read_rollback_order(run_dir: str | os.PathLike) -> RollbackOrder | None:
    """The pending order, or None when there is none; a malformed file is an error naming it."""
    path = Path(run_dir) / ROLLBACK_FILE
    try:
        raw = json.loads(path.read_text())
        return RollbackOrder(int(raw["step"]), str(raw["reason"]), float(raw["ts"]), str(raw["id"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid rollback order ({e}); delete it to resume from the newest checkpoint") from e
