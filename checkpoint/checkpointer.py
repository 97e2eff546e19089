"""The training loop's one checkpoint component: it decides when to save, where, and what to resume.

The loop calls :meth:`Checkpointer.maybe_save` after every step; the checkpointer writes a
persistent checkpoint every ``interval`` steps and at the last step (synchronously there, so the
job ends committed), and a host-memory copy every ``memory_interval`` steps in between. Around
each persistent save it enters ``on_save(step)``, a context manager supplied by the health side
that yields whether the state is SDC-verified (and marks the heartbeat phase). Collective: every
rank calls it at every step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stalwart.checkpoint.catalog import LastSaveFailed
from stalwart.checkpoint.manager import CheckpointError, CheckpointManager, LeaseLost, NoCheckpointError

logger = logging.getLogger(__name__)

SaveHook = Callable[[int], AbstractContextManager[bool]]


@contextlib.contextmanager
def _unverified(step: int) -> Iterator[bool]:
    yield False


@dataclass(frozen=True)
class SaveCadence:
    interval: int
    """A persistent save every this many steps (and at the last one)."""
    memory_interval: int = 0
    """A host-memory copy every this many steps in between; 0 is off (the manager has no memory tier)."""
    async_saves: bool = True
    """Periodic saves block only while the state is staged; the last and preemption saves are sync."""


@dataclass(frozen=True)
class SaveMeta:
    """What every manifest of this job records beside the tensors."""

    layout: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = ""
    """The tokenizer's identity: a run directory's checkpoints must be read with the same one."""


class Checkpointer:
    """Saves and restores ``state`` (the job's ``Stateful`` objects, held for the life of the job)."""

    def __init__(
        self,
        manager: CheckpointManager,
        state: dict[str, Any],
        cadence: SaveCadence,
        meta: SaveMeta,
        on_save: SaveHook = _unverified,
    ) -> None:
        self.manager = manager
        self.state = state
        self.cadence = cadence
        self.meta = meta
        self.on_save = on_save

    def maybe_save(self, step: int, *, last: bool = False) -> bool:
        """Save what is due after ``step``; True when a persistent save started.

        A periodic save that fails (full disk, read-only or unreachable storage) costs nothing but
        itself: the manager reported it (``ckpt_fail`` and one line), training goes on and the next
        interval tries again. The last save failing raises :class:`LastSaveFailed`.
        """
        if last:
            self.save_or_raise(step, "the last step")
            return True
        if step % self.cadence.interval == 0:
            try:
                self.save(step)
            except LeaseLost:
                raise
            except CheckpointError as e:
                logger.info("periodic checkpoint of step %d failed (%s); the next interval tries again", step, e)
                return False
            return True
        memory = self.manager.memory
        if memory is not None and self.cadence.memory_interval and step % self.cadence.memory_interval == 0:
            memory.save(step, self.state)
        return False

    def save(self, step: int, *, sync: bool = False) -> None:
        """A persistent save of ``step`` now (async unless ``sync`` or the cadence says otherwise)."""
        with self.on_save(step) as verified:
            self.manager.save(
                step,
                self.state,
                layout=self.meta.layout,
                config_hash=self.meta.config_hash,
                verified=verified,
                async_=self.cadence.async_saves and not sync,
                model=self.meta.model,
                tokenizer=self.meta.tokenizer,
            )

    def save_or_raise(self, step: int, what: str) -> None:
        """A sync save the job cannot end without; :class:`LastSaveFailed` (one line) when it does not commit."""
        try:
            self.save(step, sync=True)
        except LeaseLost:
            raise
        except CheckpointError as e:
            newest = self._newest_committed()
            kept = f"step {newest} is the newest committed step" if newest is not None else "no step is committed"
            raise LastSaveFailed(
                f"the checkpoint of {what} ({step}) was not saved: {e.reason}; {kept}: fix the storage (space, "
                "permissions, reachability) and rerun the same command to resume from there"
            ) from None

    def _newest_committed(self) -> int | None:
        try:
            return self.manager.latest()
        except Exception:  # the storage that refused the save may refuse listing too
            return None

    def resume(self, request: int | str = "latest") -> int | None:
        """Load ``request`` into the state; the step loaded, or None when there is nothing to resume from."""
        try:
            return self.manager.load(self.state, step=request)
        except NoCheckpointError:
            if isinstance(request, int):
                raise
            return None

    def settle(self) -> None:
        """Let the in-flight save finish; one that fails is logged (a rollback does not need it)."""
        try:
            self.manager.wait()
        except LeaseLost:
            raise
        except CheckpointError as e:
            logger.warning("in-flight checkpoint did not commit (%s); going on", e)

    def abandon(self) -> None:
        """Give up in-flight saves after a peer was lost (in-process recovery); local."""
        self.manager.abandon()

    def rollback(
        self,
        *,
        reason: str,
        from_step: int | None,
        to: int | str = "latest-verified",
        verified_only: bool = False,
        **details: Any,
    ) -> int:
        """Load ``to`` into the live state and flag newer steps rolled back; collective. Returns the step."""
        return self.manager.rollback(
            self.state, to, reason=reason, from_step=from_step, verified_only=verified_only, **details
        )

    def committed_steps(self) -> list[int]:
        return self.manager.committed_steps()

    @property
    def last_load_tier(self) -> str | None:
        return self.manager.last_load_tier

    def finished(self) -> None:
        """The last step is committed: release the host-memory copies."""
        if self.manager.memory is not None:
            self.manager.memory.discard()

    def newest_local_dir(self) -> Path | None:
        """The newest committed step's directory when checkpoints are on local disk (fault injection)."""
        storage = self.manager.storage
        step = self.manager.latest()
        if not storage.is_local or step is None:
            return None
        return Path(storage.path(self.manager.step_dir(step)))

    def close(self) -> None:
        self.manager.close()
