"""Sharded checkpoints with atomic commit, integrity, tiers and rollback.

Import from the modules (``stalwart.checkpoint.manager``): this package imports nothing itself,
so that ``stalwart ckpt --help`` and the CLI's parser build without loading torch.
"""
