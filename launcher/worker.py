"""A rank's side of ``stalwart launch``: train, or idle as a hot spare, and exit with a code the agent can act on.

The agent narrows ``WORLD_SIZE`` to the ranks the layout can use; a rank with ``RANK >= WORLD_SIZE``
is on a spare node: it joins no process group and sleeps until its agent stops it (SIGTERM at the
next re-rendezvous, or when the job ends). A rank that stopped early because *another* rank was
preempted (the trainer agrees on preemption job-wide) exits :data:`EXIT_REJOIN`, so its agent
re-forms the group instead of taking exit 0 for "training finished". A rank ends with its agent
(SIGKILL, :mod:`stalwart.lifeline`, bound at the CLI's entry).
"""

from __future__ import annotations

import os
import signal
import threading

from stalwart.runtime.config import Config

EXIT_REJOIN = 75  # EX_TEMPFAIL: stopped with the group, not finished; restart me


def wait_as_spare(rank: int, world_size: int) -> int:
    print(
        f"rank {rank}: hot spare (the layout trains on {world_size} ranks); waiting for the next rendezvous", flush=True
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    return 0


def worker_main(cfg: Config) -> int:
    """Entry of every rank under ``stalwart launch``; returns the process exit code."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank >= world_size:
        return wait_as_spare(rank, world_size)
    from stalwart.runtime.train import train

    trainer = train(cfg)
    if trainer.step < cfg.training.steps and not trainer.preempted:
        return EXIT_REJOIN
    return 0
