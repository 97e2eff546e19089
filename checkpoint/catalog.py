"""What is committed under a checkpoint root, torch-free: list, manifest, verify, mark, choose, prune.

The trainer's :class:`~stalwart.checkpoint.manager.CheckpointManager`, ``stalwart ckpt`` and the
controller all read checkpoints through this one class, so that they agree on what is committed
and intact. Reading never raises for a damaged step: a marker or manifest that is missing,
truncated or garbage makes that step *damaged* (named in the answer), and readers fall back past it.

Commit protocol (written by the manager, read here): a step directory holds its shards, then
``manifest.json``, then the ``COMMITTED`` marker, written last and exclusively. Under a run lease
(:mod:`stalwart.checkpoint.lease`) only markers of the lease's epoch, or inherited by it, count. Retention removes a
step's marker before any of its files (:meth:`CheckpointCatalog.prune`), so a crash mid-prune leaves
an uncommitted leftover, never a committed step with holes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from stalwart.checkpoint import naming
from stalwart.checkpoint.manifest import MANIFEST_NAME, CheckpointManifest, find_damage, list_damage
from stalwart.checkpoint.retention import steps_to_keep
from stalwart.checkpoint.storage import Storage
from stalwart.errors import UserError

logger = logging.getLogger(__name__)

_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError)


class CheckpointError(RuntimeError):
    """A save or load that did not happen; the message says what to do, ``reason`` only why."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class NoCheckpointError(CheckpointError):
    """No committed, intact checkpoint matches the request."""


class LastSaveFailed(CheckpointError, UserError):
    """The save the job cannot go on without (its last step, or the one a preemption asked for) did not commit.

    Periodic saves that fail are reported and retried at the next interval; only this one ends the job
    non-zero, with one line that names why and what is still committed.
    """


@dataclass(frozen=True)
class Choice:
    """Which committed step a load takes: ``step`` and its directory, or ``why`` there is none."""

    step: int | None = None
    name: str = ""
    bytes: int = 0
    why: str = ""


class CheckpointCatalog:
    """The committed steps under one checkpoint root (a path, ``file://`` or ``s3://bucket/prefix``).

    ``threads`` checksum files in parallel when verifying. Writes (:meth:`mark_verified`,
    :meth:`mark_rolled_back`, :meth:`prune`) are the caller's to serialise: rank 0 of a job.
    """

    def __init__(self, storage: Storage, threads: int = 4) -> None:
        self.storage = storage
        self.threads = max(1, threads)

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None, threads: int = 4) -> CheckpointCatalog:
        return cls(Storage(url, storage_options), threads)

    @property
    def base_url(self) -> str:
        return self.storage.base_url

    # ----------------------------------------------------------------------------- listing

    def committed_dirs(self) -> dict[int, str]:
        """Committed step → its directory; the newest commit wins when a step was saved twice.

        A marker that cannot be read still marks its directory committed (it may be damaged; a
        load checks); between two copies of a step, one with a readable marker wins.
        """
        from stalwart.checkpoint.lease import current_record

        lease = current_record(self.storage)
        found: dict[int, list[str]] = {}
        for name in self.storage.list_dir():
            parsed = naming.parse(name)
            if parsed is None or not self.storage.exists(f"{name}/{naming.COMMIT_MARKER}"):
                continue
            if lease is not None and name not in lease.fence and self._fenced(name, lease.epoch):
                logger.warning("ignoring %s: committed by an older lease epoch after a takeover (fenced)", name)
                continue
            found.setdefault(parsed.step, []).append(name)
        return {step: max(names, key=self._committed_at) for step, names in found.items()}

    def _marker(self, name: str) -> dict[str, Any]:
        """The commit marker's JSON; {} when unreadable."""
        try:
            value = json.loads(self.storage.read_bytes(f"{name}/{naming.COMMIT_MARKER}"))
        except _READ_ERRORS:
            return {}
        return value if isinstance(value, dict) else {}

    def _fenced(self, name: str, epoch: int) -> bool:
        """Whether ``name``'s marker names an epoch other than the lease's ``epoch`` (a late writer).

        Only a readable marker that names its epoch is fenced: an unreadable one stays a damaged
        step that loads fall back past (every marker this code writes names its epoch).
        """
        written_by = self._marker(name).get("epoch")
        return isinstance(written_by, int) and not isinstance(written_by, bool) and written_by != epoch

    def _committed_at(self, name: str) -> float:
        """When ``name`` was committed; -1 for an unreadable marker (it loses against any intact copy)."""
        try:
            value = self._marker(name)["committed_at"]
            usable = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            return float(value) if usable else -1.0
        except _READ_ERRORS:
            return -1.0

    def committed_steps(self) -> list[int]:
        """Every committed step, oldest first (intactness is checked by :meth:`verify` and loads)."""
        return sorted(self.committed_dirs())

    def step_dir(self, step: int) -> str:
        """The directory (relative to the root) of committed ``step``."""
        dirs = self.committed_dirs()
        if step not in dirs:
            raise NoCheckpointError(f"step {step} is not committed under {self.base_url}; committed: {sorted(dirs)}")
        return dirs[step]

    def manifest(self, step: int, name: str | None = None) -> CheckpointManifest:
        """The manifest of committed ``step``; a :class:`CheckpointError` naming the step when it is unreadable."""
        name = name or self.step_dir(step)
        try:
            return CheckpointManifest.from_json(self.storage.read_bytes(f"{name}/{MANIFEST_NAME}"))
        except _READ_ERRORS as e:
            raise CheckpointError(
                f"step {step} at {self.storage.url(name)} is damaged: manifest unreadable ({_describe(e)})"
            ) from None

    def _readable_manifests(self, dirs: dict[int, str]) -> dict[int, CheckpointManifest]:
        out = {}
        for step, name in dirs.items():
            try:
                out[step] = self.manifest(step, name)
            except CheckpointError:
                continue
        return out

    def newest_manifest(self) -> tuple[int, CheckpointManifest] | None:
        """The newest committed step whose manifest can be read, with it; None when there is none."""
        dirs = self.committed_dirs()
        for step in sorted(dirs, reverse=True):
            try:
                return step, self.manifest(step, dirs[step])
            except CheckpointError:
                continue
        return None

    def verified_steps(self) -> list[int]:
        return sorted(s for s, m in self._readable_manifests(self.committed_dirs()).items() if m.verified)

    def latest(self, verified_only: bool = False) -> int | None:
        """The newest committed (or verified) step, None when there is none."""
        steps = self.verified_steps() if verified_only else self.committed_steps()
        return steps[-1] if steps else None

    # ---------------------------------------------------------------------------- integrity

    def verify(self, step: int) -> list[str]:
        """Every problem of committed ``step`` (a file that does not match, an unreadable manifest); [] = intact."""
        name = self.step_dir(step)
        try:
            manifest = self.manifest(step, name)
        except CheckpointError as e:
            return [str(e)]
        try:
            return list_damage(manifest, self.storage.walk_files(name), self._opener(name), self.threads)
        except _READ_ERRORS as e:
            return [f"cannot read {self.storage.url(name)}: {_describe(e)}"]

    def _opener(self, name: str):  # noqa: ANN202 (a context-manager factory)
        return lambda rel: self.storage.open_read(f"{name}/{rel}")

    def choose(self, request: int | str, on_damage: Any = None, verified_only: bool = False) -> Choice:
        """The newest intact committed step that satisfies ``request``: ``"latest"``,
        ``"latest-verified"`` or a step number (that step, or the newest intact one before it);
        ``verified_only`` takes only verified steps for a step number too.

        Damaged steps are skipped; ``on_damage(step, reason)`` hears of each. Steps flagged rolled
        back are skipped unless asked for by number. Storage errors propagate: an unreachable store
        is not "no checkpoint".
        """
        dirs = self.committed_dirs()
        candidates = sorted(dirs, reverse=True)
        if isinstance(request, int):
            if request not in dirs:
                return Choice(
                    why=f"step {request} is not committed under {self.base_url}; committed steps: {sorted(dirs)}"
                )
            candidates = [s for s in candidates if s <= request]
        skipped: list[str] = []
        for step in candidates:
            name = dirs[step]
            try:
                manifest = self.manifest(step, name)
            except CheckpointError as e:
                damage: str | None = str(e)
            else:
                if (verified_only or request == "latest-verified") and not manifest.verified:
                    if isinstance(request, int):
                        skipped.append(f"step {step} is not verified")
                    continue
                if manifest.rolled_back and request != step:
                    skipped.append(f"step {step} was rolled back past")
                    continue
                try:
                    damage = find_damage(manifest, self.storage.walk_files(name), self._opener(name), self.threads)
                    damage = None if damage is None else f"step {step} at {self.storage.url(name)} is damaged: {damage}"
                except _READ_ERRORS as e:
                    damage = f"step {step} at {self.storage.url(name)} is damaged: {_describe(e)}"
            if damage is None:
                if skipped:
                    logger.warning("loading step %d instead; skipped: %s", step, "; ".join(skipped))
                return Choice(step, name, manifest.total_bytes)
            logger.warning("%s; falling back to the previous committed step", damage)
            if on_damage is not None:
                on_damage(step, damage)
            skipped.append(damage)
        kind = "verified " if verified_only or request == "latest-verified" else ""
        why = f" (skipped: {'; '.join(skipped)})" if skipped else ""
        return Choice(
            why=(
                f"no intact {kind}committed checkpoint under {self.base_url}{why}; "
                f"start without --resume or point checkpoint.url at a directory holding step-* checkpoints"
            )
        )

    # ------------------------------------------------------------------------------ writes

    def _rewrite_manifest(self, step: int, name: str, **changes: Any) -> None:
        manifest = self.manifest(step, name)
        for key, value in changes.items():
            setattr(manifest, key, value)
        self.storage.write_bytes(f"{name}/{MANIFEST_NAME}", manifest.to_json().encode())

    def mark_verified(self, step: int) -> None:
        """Record that ``step`` passed an SDC check; retention then never deletes the newest such step."""
        self._rewrite_manifest(step, self.step_dir(step), verified=True)

    def mark_rolled_back(self, after: int) -> list[int]:
        """Flag every committed step newer than ``after`` so that a later restart never resumes from it."""
        marked = []
        for step, name in sorted(self.committed_dirs().items()):
            if step <= after:
                continue
            try:
                self._rewrite_manifest(step, name, rolled_back=True)
                marked.append(step)
            except (CheckpointError, OSError) as e:
                logger.warning("could not flag step %d as rolled back: %s", step, e)
        return marked

    def uncommit(self, name: str) -> None:
        """Delete a step directory crash-safely: its marker goes first, then its files."""
        try:
            self.storage.delete_file(f"{name}/{naming.COMMIT_MARKER}")
        except FileNotFoundError:
            pass
        self.storage.delete_tree(name)

    def prune(
        self, keep_last: int, keep_every: int = 0, protected: Iterable[int] = (), stale_before: int | None = None
    ) -> list[str]:
        """Delete the steps retention does not keep, and stale leftovers; returns the deleted names.

        Never deletes the newest verified step or a ``protected`` one. A leftover (uncommitted, or an
        older copy of a committed step) is deleted only when its step is at most ``stale_before``
        (default: the newest committed step), so a save in flight is never touched.
        """
        dirs = self.committed_dirs()
        if not dirs:
            return []
        verified = self.verified_steps()
        keep = steps_to_keep(dirs, keep_last, keep_every, set(protected) | set(verified[-1:]))
        newest = max(dirs) if stale_before is None else stale_before
        keep_names = {dirs[s] for s in keep}
        doomed = []
        for name in self.storage.list_dir():
            parsed = naming.parse(name)
            if parsed is None or name in keep_names:
                continue
            committed = parsed.step in dirs
            if (committed and parsed.step not in keep) or (parsed.step <= newest and name != dirs.get(parsed.step)):
                doomed.append(name)
        for name in doomed:
            self.uncommit(name)
        if doomed:
            logger.info("pruned %s under %s", doomed, self.base_url)
        return doomed


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
