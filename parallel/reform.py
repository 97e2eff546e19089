"""Re-forming a job's process groups inside the running processes, keeping every object that uses them.

When a peer rank dies, the survivors' groups are dead, but their model (FSDP, TP, pipeline stages,
context parallelism), optimizer and loader are fine. torch resets its group-name counter when the
default group is destroyed, precisely so that groups re-created in the same order get the same names
after a failure (``destroy_process_group`` in distributed_c10d). DeviceMesh and DTensor resolve
groups by name at call time; a few objects cache the group object itself (FSDP's mesh infos, a
pipeline stage's ``group``, our context-parallel attention). :class:`GroupSlots` finds those before
the teardown and points them at the new groups of the same names afterwards.

The world re-forms on a fresh prefix of a store that outlives every rank (:class:`JobStore`): the
launcher's rendezvous store. Each formation has a *generation*; survivors of a failure in generation
``g`` move to ``g + 1`` (a compare-and-set, so one failure moves the job exactly once), and a
replacement rank waits for a generation after the one its predecessor died in.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stalwart.jobenv import JOB_STORE_ENV

# Messages of the errors a collective raises when a peer is gone (gloo, NCCL, the TCP store).
PEER_FAILURE_HINTS = (
    "connection closed by peer",
    "connection reset",
    "broken pipe",
    "connection refused",
    "timed out",
    "timeout",
    "socket",
    "read error",
    "write error",
    "nccl",
    "gloo",
    "process group",
    "peer",
)
_WALK_MODULES = ("torch.distributed", "stalwart")


class ReformError(RuntimeError):
    """The world could not be re-formed in place; the caller falls back to a whole-world restart."""


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is how a collective fails when another rank died or was killed.

    Wrappers count too: a pipeline stage re-raises its peer's failure as "failed to run forward"
    with the original as the cause.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError)):
            return True
        if isinstance(error, RuntimeError) and any(hint in str(error).lower() for hint in PEER_FAILURE_HINTS):
            return True
        error = error.__cause__ or error.__context__
    return False


class JobStore:
    """The job's store that outlives every rank, and the generations of formation on it.

    ``round_id`` names the launcher's rendezvous round (its workers share it), so generations of an
    earlier round never mix with this one's.
    """

    def __init__(self, store: dist.Store, round_id: str) -> None:
        self.store = store
        self.round_id = round_id

    @classmethod
    def from_env(cls, timeout_s: float = 60.0) -> JobStore | None:
        """The store the launcher named in ``$STALWART_JOB_STORE`` (parallel/job_store.py), or None without one."""
        if not os.environ.get(JOB_STORE_ENV):
            return None
        from stalwart.parallel.job_store import job_store

        round_id = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
        return cls(job_store(timeout_s), round_id)

    def _key(self, name: str) -> str:
        return f"stalwart/reform/{self.round_id}/{name}"

    def generation(self) -> int:
        """The current generation (0 until a failure moved it)."""
        return int(self.store.compare_set(self._key("generation"), "", "0").decode())

    def advance(self, past: int) -> int:
        """Move the job past generation ``past`` (once, however many ranks ask); the new generation."""
        key = self._key("generation")
        while (current := self.generation()) <= past:
            if int(self.store.compare_set(key, str(current), str(past + 1)).decode()) > past:
                break
        return self.generation()

    def wait_past(self, generation: int, timeout_s: float) -> int:
        """The first generation after ``generation`` (a replacement waits for the survivors to move)."""
        deadline = time.monotonic() + timeout_s
        while (current := self.generation()) <= generation:
            if time.monotonic() > deadline:
                raise ReformError(f"no re-formation after generation {generation} within {timeout_s:.0f}s")
            time.sleep(0.01)
        return current

    def prefix(self, generation: int) -> dist.PrefixStore:
        return dist.PrefixStore(self._key(f"g{generation}"), self.store)

    def record(self, rank: int, generation: int) -> None:
        """Which generation ``rank`` trains in (the launcher reads it when the rank dies)."""
        self.store.set(self._key(f"rank{rank}"), str(generation))

    def generation_of(self, rank: int) -> int:
        return int(self.store.get(self._key(f"rank{rank}")).decode())


@dataclasses.dataclass(frozen=True)
class _Slot:
    owner: Any
    key: Any  # attribute name, dict key or list index
    group_name: str


class GroupSlots:
    """Every place under ``roots`` that caches a process group object, by the group's name.

    Collected while the old groups live; :meth:`rebind` then points each slot at the group that now
    has the same name. The walk descends only into torch.distributed's and stalwart's own objects
    (FSDP states and mesh infos, pipeline stages, device meshes, context-parallel modules).
    """

    def __init__(self, roots: Iterable[Any]) -> None:
        self.slots: list[_Slot] = []
        seen: set[int] = set()
        for root in roots:
            self._walk(root, seen, depth=0)

    def _walk(self, obj: Any, seen: set[int], depth: int) -> None:
        if id(obj) in seen or depth > 8:
            return
        seen.add(id(obj))
        for key, value in _children(obj):
            if isinstance(value, dist.ProcessGroup):
                self.slots.append(_Slot(obj, key, value.group_name))
            elif _walkable(value):
                self._walk(value, seen, depth + 1)

    def release(self) -> None:
        """Drop every cached reference to the old groups, so that they are destroyed with the default group.

        A group's sockets close only when the group object goes away; peers still blocked in a
        collective with this rank (alive, but not yet aware of the failure) then fail at once
        instead of waiting out the group's timeout: the failure spreads in milliseconds. Groups held in
        reference cycles need the caller's ``gc.collect()`` after this.
        """
        for slot in self.slots:
            if isinstance(slot.owner, (dict, list)):
                slot.owner[slot.key] = None
            else:
                object.__setattr__(slot.owner, slot.key, None)

    def rebind(self) -> int:
        """Point every slot at the live group of its name; returns how many were rebound."""
        from torch.distributed.distributed_c10d import _resolve_process_group

        for slot in self.slots:
            group = _resolve_process_group(slot.group_name)
            if isinstance(slot.owner, (dict, list)):
                slot.owner[slot.key] = group
            else:
                object.__setattr__(slot.owner, slot.key, group)
        return len(self.slots)


def _children(obj: Any) -> Iterable[tuple[Any, Any]]:
    if isinstance(obj, dict):
        return list(obj.items())
    if isinstance(obj, list):
        return list(enumerate(obj))
    if isinstance(obj, nn.Module):
        return [(k, v) for k, v in vars(obj).items() if not k.startswith("_") or k.startswith("_fsdp")]
    try:
        return list(vars(obj).items())
    except TypeError:
        return []


def _walkable(value: Any) -> bool:
    if isinstance(value, (dict, list)):
        return True
    if isinstance(value, (torch.Tensor, nn.Module, str, bytes, int, float)) or value is None:
        return False
    return type(value).__module__.startswith(_WALK_MODULES)


def group_roots(parts: list[nn.Module], extra: Iterable[Any] = ()) -> list[Any]:
    """What caches process groups in a job: every submodule and its FSDP state, plus ``extra`` (stages, meshes)."""
    roots: list[Any] = list(extra)
    for part in parts:
        for module in part.modules():
            roots.append(module)
            state = getattr(module, "_get_fsdp_state", None)
            if callable(state):
                roots.append(state())
    return roots


def reset_fsdp(parts: list[nn.Module]) -> None:
    """Leave every FSDP module sharded and idle after a step was abandoned half way.

    A failed step can leave collectives' results (with their errors) parked in FSDP's state, to be
    waited on by the next step: all of it is dropped, and the unsharded buffers freed.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    for part in parts:
        for module in part.modules():
            if not isinstance(module, FSDPModule):
                continue
            state = module._get_fsdp_state()
            state._training_state = TrainingState.IDLE
            context = getattr(state, "_state_ctx", None)
            if context is not None:  # shared by the root's states: the failed backward's final callback never ran
                context.post_backward_final_callback_queued = False
                context.is_last_backward = True
            groups = list(getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)])
            for group in filter(None, groups):
                group._training_state = TrainingState.IDLE
                for name in (
                    "_all_gather_result",
                    "_all_reduce_state",
                    "_partial_reduce_output",
                    "_post_reduce_event",
                    "_reshard_after_forward_event",
                ):
                    if hasattr(group, name):
                        setattr(group, name, None)
                for fsdp_param in group.fsdp_params:
                    if hasattr(fsdp_param, "unsharded_accumulated_grad"):
                        fsdp_param.unsharded_accumulated_grad = None
                with torch.no_grad():
                    group.reshard()
                comm = getattr(group, "comm_ctx", None)
                if comm is not None:
                    comm.all_gather_state = None
                    if hasattr(comm, "reduce_scatter_states"):
                        comm.reduce_scatter_states.clear()
                    if hasattr(comm, "_last_post_reduce_events"):
                        comm._last_post_reduce_events.clear()
