"""The main thread of a long-running health service (``stalwart healthd``, ``stalwart controller``)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def serve_until_signalled(stop: Callable[[], None], poll_s: float = 1.0) -> int:
    """Block until SIGTERM or SIGINT, then ``stop()`` the service; returns the exit code (0).

    The handlers only set an event: stopping gRPC servers inside a signal handler could deadlock
    against a request in flight. The wait wakes every ``poll_s`` so that the signal is seen
    promptly (Python runs handlers between bytecodes of the main thread).
    """
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    while not stopped.wait(poll_s):
        pass
    stop()
    return 0
