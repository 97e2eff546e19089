"""Child-process programs for the healthd tests: ``python tests/health_cases.py MODE ADDRESS RUN_DIR RANK``.

``beat``: a fake trainer that beats every 0.2 s forever (the test SIGSTOPs or kills it); it prints
``ready`` once the daemon acknowledged a heartbeat and writes each beat's time to ``RUN/beat-rank<r>``.
``stall``: the same, but after 5 steps the training thread blocks in ``stuck_in_collective`` while the
heartbeat thread keeps sending (a rank wedged in a collective looks exactly like this).
``recover``: stalls like ``stall`` until ``RUN/recover-rank<r>`` appears, then beats once in the INIT
phase and waits there (a rank released into an in-process recovery, waiting for the next formation).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from stalwart.health.client import HeartbeatClient, faulthandler_path, install_stack_dump_handler
from stalwart.health.hang import Phase


def stuck_in_collective(released: Path | None = None, client: HeartbeatClient | None = None, step: int = 0) -> None:
    while True:
        time.sleep(0.2)
        if released is not None and client is not None and released.exists():
            client.beat(step, Phase.INIT)  # into the recovery, which then waits for its peers
            released = None


def beat(address: str, run_dir: str, rank: int, stall_after: int | None = None, recover: bool = False) -> None:
    install_stack_dump_handler(faulthandler_path(run_dir, rank, os.getpid()))
    client = HeartbeatClient(address, rank=rank, local_rank=rank, interval_s=0.2)
    client.beat(0, Phase.INIT)
    step = 0
    announced = False
    last_beat = Path(run_dir) / f"beat-rank{rank}"
    while True:
        time.sleep(0.2)
        step += 1
        client.beat(step, Phase.STEP, step_seconds=0.2)
        last_beat.write_text(repr(time.time()))
        if not announced and client.sent >= 2 and step >= 2:
            print("ready", flush=True)
            announced = True
        if stall_after is not None and step >= stall_after:
            released = Path(run_dir) / f"recover-rank{rank}" if recover else None
            stuck_in_collective(released, client, step)


if __name__ == "__main__":
    mode, address, run_dir, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    beat(address, run_dir, rank, stall_after={"beat": None, "stall": 5, "recover": 5}[mode], recover=mode == "recover")
