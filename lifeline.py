"""Every process stalwart starts ends with the process that started it, even when that one is SIGKILLed.

torch's elastic agent starts each rank in a session of its own, so nothing ties a rank to its
launcher: a SIGKILLed ``stalwart train`` used to leave its ranks training on alone and committing
into the run directory. The rule here, applied once for every ``stalwart`` process at the CLI's
entry (:func:`bind_to_parent`):

- every stalwart process exports :data:`~stalwart.jobenv.PARENT_PID_ENV` = its own pid for the
  processes it starts; a stalwart process that finds the variable naming its parent binds itself
  to it (one started through another program, say plain ``torchrun``, sees a live pid that is not
  its parent and stays unbound: that program is not ours);
- binding sets Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``): the kernel signals us
  the moment the parent goes;
- a watchdog thread covers what that misses (and, for a process that handles the signal to stop
  cleanly, follows up with SIGKILL after :data:`STOP_GRACE_S`): the parent died before ``prctl`` took effect (we were
  re-parented already: checked at once), a re-parent to a subreaper, a death signal cleared by an
  exec of a set-uid binary, or a parent that is alive but is not the one that started us. It
  compares ``getppid()`` with the pid the parent exported, every ``poll_s``.

The death signal belongs to the parent *thread* that forked us, not its process: a child started
from a short-lived thread would be signalled when that thread ends. stalwart starts its children
from main threads (the agent, the launcher, the demo); the watchdog alone never misfires that way.

Standard library only.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

from stalwart.jobenv import PARENT_PID_ENV

log = logging.getLogger(__name__)

POLL_S = 1.0
STOP_GRACE_S = 5.0  # a process told to stop cleanly (SIGTERM) gets this long, then SIGKILL
_PR_SET_PDEATHSIG = 1
_bound: int | None = None  # the parent pid this process is bound to


def expected_parent(env: dict[str, str] | None = None) -> int | None:
    """The pid the process that started us exported, or None (started by someone else: a shell, a scheduler)."""
    value = (os.environ if env is None else env).get(PARENT_PID_ENV, "")
    try:
        pid = int(value)
    except ValueError:
        return None
    return pid if pid > 0 and pid != os.getpid() else None


def bind_to_parent(sig: signal.Signals = signal.SIGKILL, poll_s: float = POLL_S) -> int | None:
    """End this process with ``sig`` when the stalwart process that started it goes; returns that pid.

    Does nothing (returns None) for a process no stalwart process started. Then exports this
    process's own pid for the processes it starts. Idempotent.
    """
    global _bound
    parent = expected_parent()
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # our children bind to us
    if parent is None or _bound is not None:
        return _bound
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning(
                "prctl(PR_SET_PDEATHSIG) failed (errno %d); the watchdog alone ties us to pid %d",
                ctypes.get_errno(),
                parent,
            )
    if os.getppid() != parent:
        if _alive(parent):  # started through a program that is not ours (torchrun, a shell): it is not our parent
            if sys.platform.startswith("linux"):
                libc.prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0)
            return None
        _end(sig, parent)  # it died before prctl took effect: we are an orphan already
    _bound = parent
    watchdog = threading.Thread(target=_watch, args=(parent, sig, poll_s), name="lifeline", daemon=True)
    watchdog.start()
    return parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _watch(parent: int, sig: signal.Signals, poll_s: float) -> None:
    stop = threading.Event()
    while not stop.wait(poll_s):
        if os.getppid() != parent:
            _end(sig, parent)
            return


def _end(sig: signal.Signals, parent: int) -> None:
    """Send ``sig`` to this process; one that handles it (a service stopping cleanly) gets SIGKILL after a grace."""
    print(
        f"stalwart: the process that started this one (pid {parent}) is gone; pid {os.getpid()} ends with it "
        f"({sig.name})",
        file=sys.stderr,
        flush=True,
    )
    if sig != signal.SIGKILL:
        escalate = threading.Timer(STOP_GRACE_S, os.kill, (os.getpid(), signal.SIGKILL))
        escalate.daemon = True
        escalate.start()
    os.kill(os.getpid(), sig)
