"""Sharded checkpoints with atomic commit, integrity, tiers and rollback."""

from stalwart.checkpoint.manager import CheckpointError, CheckpointManager, NoCheckpointError
from stalwart.checkpoint.manifest import CheckpointManifest

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointManifest", "NoCheckpointError"]
