"""A fake rank for the controller tests: ``python tests/controller_cases.py HEALTHD CONTROLLER NODE RANK COMPUTE_S``.

Every step it "computes" for ``COMPUTE_S`` seconds (a sleep: the injected slowness of a straggler),
beats its node's healthd and reports the step's times to the controller, like a trainer does. The
job token comes from ``$STALWART_TOKEN_FILE``. It prints ``ready`` once healthd acknowledged a beat,
then runs until killed.
"""

from __future__ import annotations

import sys
import time

from stalwart.health.client import HeartbeatClient
from stalwart.health.controller_client import ControllerClient
from stalwart.health.hang import Phase


def main(healthd: str, controller: str, node: str, rank: int, compute_s: float) -> None:
    beats = HeartbeatClient(healthd, rank=rank, local_rank=rank, interval_s=0.2)
    reports = ControllerClient(controller, interval_s=0.2)
    beats.beat(0, Phase.INIT)
    step, announced = 0, False
    while True:
        t0 = time.perf_counter()
        time.sleep(compute_s)
        compute = time.perf_counter() - t0
        step += 1
        beats.beat(step, Phase.STEP, step_seconds=compute)
        reports.report_rank_metrics(rank, node, step, step_seconds=compute, compute_seconds=compute)
        if not announced and beats.sent >= 1:
            print("ready", flush=True)
            announced = True


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
