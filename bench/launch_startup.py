"""Start-up badput of ``stalwart launch``: launcher start → ranks spawned → ranks ready → first step.

    python bench/launch_startup.py [--ranks 2] [--repeat 3] [extra --section.key value ...]

Runs a one-node ``stalwart launch`` (c10d rendezvous on localhost, no healthd/controller) for 2 steps
into a fresh run directory, ``--repeat`` times, and prints the median of each phase, read from the
run's event log: the agent's ``worker_start`` (rendezvous done, ranks spawned), the last rank's
``init_done`` (process group, model, data, optimizer ready) and the last rank's first ``step_end``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import psutil

from stalwart.events import read_events
from stalwart.net import free_port


def one_run(ranks: int, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "stalwart",
            "launch",
            "--config",
            "debug",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(ranks),
            "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}",
            "--healthd",
            "off",
            "--controller",
            "off",
            "--run-dir",
            str(run_dir),
            "--training.steps",
            "2",
            "--checkpoint.enabled",
            "false",
            *extra,
        ]
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"launch failed ({done.returncode}):\n{done.stderr[-3000:]}")
        events = list(read_events(run_dir))
    spawned = min(e["ts"] for e in events if e["kind"] == "worker_start" and e["role"] == "agent")
    ready = max(e["ts"] for e in events if e["kind"] == "init_done")
    first = max(e["ts"] for e in events if e["kind"] == "step_end" and e["step"] == 1)
    return {"spawn": spawned - t0, "ready": ready - t0, "first_step": first - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args, extra = parser.parse_known_args()
    runs = [one_run(args.ranks, extra) for _ in range(args.repeat)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    machine = f"{platform.machine()}, {psutil.cpu_count()} cores, load average {psutil.getloadavg()[0]:.1f}"
    print(f"launcher start → ranks spawned (imports, config, rendezvous): {med['spawn']:.2f} s")
    print(f"launcher start → all ranks ready (init_done):                {med['ready']:.2f} s")
    print(f"launcher start → first step done:                            {med['first_step']:.2f} s")
    print(
        f"| {date.today()} | {machine} | {args.ranks} | {med['spawn']:.2f} s | {med['ready']:.2f} s | "
        f"{med['first_step']:.2f} s | "
        f"median of {args.repeat}: {', '.join(format(r['first_step'], '.2f') for r in runs)} s |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
