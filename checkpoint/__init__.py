"""Sharded checkpoints with atomic commit, integrity, tiers and rollback."""
