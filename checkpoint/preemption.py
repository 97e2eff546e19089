"""Preemption: commit within the grace period a scheduler allows after SIGTERM, or say so and exit.

A scheduler sends SIGTERM and, ``grace`` seconds later, SIGKILL. A save still running then dies
at an arbitrary point; the commit protocol keeps the previous step intact, but the job would exit
as if killed and nobody would learn why. :func:`grace_deadline` turns that into a decision taken
here: when the deadline passes before the save returns, the rank prints one line naming the fix,
records a ``ckpt_fail`` event and exits with :data:`GRACE_EXPIRED_EXIT` at once. The commit marker
is the last, atomic write of a save, so an exit at any moment leaves either a committed step or
none, never a half-written commit.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stalwart.events import EventKind, EventLog, read_events

GRACE_EXPIRED_EXIT = 1


@contextmanager
def grace_deadline(
    signalled_at: float, grace_s: float, step: int, events: EventLog | None = None, announce: bool = True
) -> Iterator[None]:
    """Run the body before ``signalled_at + grace_s`` (``time.monotonic``), or exit the process."""

    def expire() -> None:
        reason = (
            f"preemption save of step {step} did not finish within checkpoint.preemption_grace_s={grace_s:g}s; "
            f"exiting without committing it (the previous committed step is intact); "
            f"raise checkpoint.preemption_grace_s or make saves faster"
        )
        if announce:
            print(f"stalwart train: error: {reason}", file=sys.stderr, flush=True)
        if events is not None:
            events.emit(EventKind.CKPT_FAIL, step=step, reason=reason, tier="preemption")
            events.emit(EventKind.WORKER_STOP, reason="preemption_grace_expired")
            events.close()
        os._exit(GRACE_EXPIRED_EXIT)

    left = signalled_at + grace_s - time.monotonic()
    if left <= 0:
        expire()
    timer = threading.Timer(left, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def preempted_step(run_dir: str | Path, since: float) -> int | None:
    """The step a run's trainers committed on preemption after ``since`` (epoch seconds), if any."""
    for event in read_events(run_dir):
        if event["kind"] == "job_end" and event.get("status") == "preempted" and event["ts"] >= since:
            return int(event.get("steps", 0))
    return None
