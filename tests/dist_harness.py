"""Run a test function on N real processes joined in a gloo process group.

``run_ranks("tests/parity_cases.py:check_tp", world_size=4, foo=1)`` starts 4 new processes,
each sets the torchrun environment, joins a gloo group, calls the function with the keyword
arguments and sends back its return value (anything ``torch.save`` can write). Results come back
in rank order. A rank that fails or a run that exceeds ``timeout`` fails the test with that rank's
output; no process is left behind.

The processes come from multiprocessing's fork server, which imports torch and the trainer once
per test session and forks every rank from that clean state (no thread started, no tensor op run):
a rank starts in milliseconds instead of re-importing torch for seconds, which on a 2-core CI box
was most of a 16-rank test. Each rank is still its own process with its own gloo group.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from stalwart.net import free_port

REPO = Path(__file__).resolve().parent.parent
PRELOAD = ["torch", "torch.distributed", "stalwart.runtime.train", "dist_harness"]


@functools.cache
def _context() -> Any:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _rank_entry(path: str, func: str, tmp: str, env: dict[str, str], log: str) -> None:
    """One rank, in a process forked from the fork server: its environment, its output file, its group."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.clear()
    os.environ.update(env)
    # The fork server read OMP_NUM_THREADS when it imported torch; a rank's own setting applies here.
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    import _rank_main

    _rank_main.run(path, func, Path(tmp))


def run_ranks(
    target: str, world_size: int, timeout: float = 300.0, env: dict[str, str] | None = None, **kwargs: Any
) -> list[Any]:
    file, _, func = target.partition(":")
    path = Path(file) if Path(file).is_absolute() else REPO / file
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        torch.save(kwargs, Path(tmp) / "kwargs.pt")
        port = free_port()
        procs = []
        for rank in range(world_size):
            rank_env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                "OMP_NUM_THREADS": "1",
                **(env or {}),
            }
            log = str(Path(tmp) / f"stderr-{rank}.txt")
            proc = _context().Process(target=_rank_entry, args=(str(path), func, tmp, rank_env, log))
            proc.start()
            procs.append(proc)
        deadline = time.monotonic() + timeout
        first_failed: list[int] = []  # ranks in the order they were seen failing: the first is the cause
        try:
            grace_until: float | None = None
            while any(p.exitcode is None for p in procs):
                for r, p in enumerate(procs):
                    if p.exitcode not in (None, 0) and r not in first_failed:
                        first_failed.append(r)
                now = time.monotonic()
                if first_failed and grace_until is None:
                    # Peers of a failed rank die of a closed connection within moments; let the
                    # failing rank finish writing its own traceback before anything is killed.
                    grace_until = now + 10.0
                if now > deadline or (grace_until is not None and now > grace_until):
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                p.join()
        codes = [p.exitcode for p in procs]
        if any(codes):
            failed = first_failed + [r for r, c in enumerate(codes) if c not in (0, -9) and r not in first_failed]
            failed = failed or list(range(world_size))
            logs = "\n".join(
                f"--- rank {r} (exit {codes[r]}):\n{(Path(tmp) / f'stderr-{r}.txt').read_text()[-4000:]}"
                for r in failed[:4]
            )
            reason = "timed out" if time.monotonic() > deadline else f"exit codes {codes}"
            raise AssertionError(f"{target} on {world_size} ranks {reason}\n{logs}")
        return [torch.load(Path(tmp) / f"result-{r}.pt", weights_only=False) for r in range(world_size)]
