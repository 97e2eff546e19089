"""Run a test function on N real processes joined in a gloo process group.

``run_ranks("tests/parity_cases.py:check_tp", world_size=4, foo=1)`` starts 4 fresh Python
processes, each sets the torchrun environment, joins a gloo group, calls the function with the
keyword arguments and sends back its return value (anything ``torch.save`` can write). Results
come back in rank order. A rank that fails or a run that exceeds ``timeout`` fails the test
with that rank's stderr; no process is left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from stalwart.net import free_port

REPO = Path(__file__).resolve().parent.parent
RANK_MAIN = Path(__file__).resolve().parent / "_rank_main.py"


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
            err = open(Path(tmp) / f"stderr-{rank}.txt", "w")
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, str(RANK_MAIN), str(path), func, tmp],
                        env=rank_env,
                        stdout=err,
                        stderr=subprocess.STDOUT,
                    ),
                    err,
                )
            )
        deadline = time.monotonic() + timeout
        first_failed: list[int] = []  # ranks in the order they were seen failing: the first is the cause
        try:
            grace_until: float | None = None
            while any(p.poll() is None for p, _ in procs):
                for r, (p, _) in enumerate(procs):
                    if p.poll() not in (None, 0) and r not in first_failed:
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
            for p, err in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
                err.close()
        codes = [p.returncode for p, _ in procs]
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
