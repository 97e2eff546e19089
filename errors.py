"""The errors a user can fix: each is printed by ``stalwart`` as one line, exit code 2, no traceback.

Library code raises these with the fix in the message (``"tp=3 does not divide n_kv_heads=8; choose
tp in {1, 2, 4, 8}"``); the CLI catches :class:`UserError` and nothing narrower. Standard library
only: every layer may import this module.
"""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix; the message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A bad configuration value or layout; the message names the key and what is allowed."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the user named (a config, corpus, tokenizer, run directory) is not there."""
