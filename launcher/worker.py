"""A rank's side of ``stalwart launch``: train, or idle as a hot spare, and exit with a code the agent can act on.

The agent narrows ``WORLD_SIZE`` to the ranks the layout can use; a rank with ``RANK >= WORLD_SIZE``
is on a spare node: it joins no process group and sleeps until its agent stops it (SIGTERM at the
next re-rendezvous, or when the job ends). A rank that stopped early because *another* rank was
preempted (the trainer agrees on preemption job-wide) exits :data:`EXIT_REJOIN`, so its agent
re-forms the group instead of taking exit 0 for "training finished". A rank ends with its agent
(SIGKILL, :mod:`stalwart.lifeline`, bound at the CLI's entry).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import NoReturn

from stalwart.jobenv import WARM_SPARE_ENV
from stalwart.runtime.config import Config

EXIT_REJOIN = 75  # EX_TEMPFAIL: stopped with the group, not finished; restart me


def wait_as_spare(rank: int, world_size: int) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # before saying so: a stop right after is a clean one
    print(
        f"rank {rank}: hot spare (the layout trains on {world_size} ranks); waiting for the next rendezvous", flush=True
    )
    while not stop.wait(3600):
        pass
    return 0


def warm_spare_main(cfg: Config) -> int:
    """A process that imports the trainer ahead of need, then takes a lost rank's place when the agent says.

    The agent writes the lost rank's environment as one JSON line on stdin (a closed stdin: not
    needed any more). Importing torch and the trainer is most of a replacement's start-up.
    """
    import stalwart.runtime.train  # noqa: F401  (the expensive part, done while nothing is waiting)

    line = sys.stdin.readline()
    if not line:
        return 0
    os.environ.update(json.loads(line))
    os.environ.pop(WARM_SPARE_ENV, None)
    return worker_main(cfg)


def worker_main(cfg: Config) -> int:
    """Entry of every rank under ``stalwart launch``; returns the process exit code."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank >= world_size:
        return wait_as_spare(rank, world_size)
    from stalwart.runtime.train import train

    trainer = train(cfg)
    leave(EXIT_REJOIN if trainer.step < cfg.training.steps and not trainer.preempted else 0)


def leave(code: int) -> NoReturn:
    """End a rank whose work is committed and closed, without the interpreter's teardown.

    That teardown destroys process groups and stores while their C++ threads may still run
    (``terminate called without an active exception``, exit -6, seen under torchrun on 2 cores), and
    after an in-process recovery it can wait on the lost generation's threads.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
