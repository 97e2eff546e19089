"""The controller's rollback order: ``RUN_DIR/rollback_request.json``.

``RequestRollback`` (an operator, or an SDC verdict reaching the controller) resolves the target to
a committed, verified step, writes it here and kills the worker groups; the restarted trainers load
this step instead of the newest one (:func:`pending_rollback`), flag the newer steps rolled back,
and rank 0 records the order's ``id`` in ``RUN/rollback_applied.json`` (:func:`mark_applied`), so a
later restart resumes from the newest step again instead of re-applying an old order. The id also
goes into the ``ckpt_load`` and ``rollback`` events.
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
APPLIED_FILE = "rollback_applied.json"


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
        raise ValueError(
            f"{path} is not a valid rollback order ({e}); delete it to resume from the newest checkpoint"
        ) from e


def pending_rollback(run_dir: str | os.PathLike) -> RollbackOrder | None:
    """The order a starting trainer must honour: the current one, unless its id was applied already."""
    order = read_rollback_order(run_dir)
    if order is None:
        return None
    try:
        applied = json.loads((Path(run_dir) / APPLIED_FILE).read_text()).get("id")
    except (OSError, ValueError, AttributeError):
        applied = None
    return None if applied == order.id else order


def mark_applied(run_dir: str | os.PathLike, order: RollbackOrder, step: int) -> None:
    """Record that ``order`` was carried out (the job now continues from ``step``)."""
    atomic_write_json(Path(run_dir) / APPLIED_FILE, {"id": order.id, "step": step, "ts": time.time()})
