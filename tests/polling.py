"""Waiting on real processes in tests: poll a condition with a deadline; ``free_port`` is stalwart's own."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from stalwart.net import free_port

__all__ = ["free_port", "wait_for"]

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """``predicate()``'s first truthy value; an AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
