"""README command 1's job as a benchmark: throughput, start-up and goodput on this machine.

    python bench/train_cpu.py [--ranks 4] [--steps 300] [--config debug] [extra --section.key value ...]

Runs ``stalwart train`` into a fresh run directory and prints the figures that go into
bench/RESULTS.md, computed from the run's own event log (the same data the goodput report uses).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from stalwart.events import read_events
from stalwart.goodput.accounting import compute_goodput


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--config", default="debug")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "stalwart",
            "train",
            "--config",
            args.config,
            "--nproc-per-node",
            str(args.ranks),
            "--training.steps",
            str(args.steps),
            "--job.run_dir",
            str(run_dir),
            *extra,
        ]
        t0 = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        events = list(read_events(run_dir))
        report = compute_goodput(events)
        steps = [e for e in events if e["kind"] == "step_end" and e["rank"] == 0]
        init = [e["seconds"] for e in events if e["kind"] == "init_done"]
        figures = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {psutil.cpu_count(logical=True)} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch CPU, {args.ranks} gloo ranks",
            "command": " ".join(["stalwart", *cmd[3:6], *cmd[6:8]]),
            "steps": len(steps),
            "first_loss": round(steps[0]["loss"], 4),
            "final_loss": round(steps[-1]["loss"], 4),
            "median_tokens_per_s": round(statistics.median(e["tokens_per_second"] for e in steps)),
            "median_step_s": round(statistics.median(e["step_seconds"] for e in steps), 4),
            "rank_init_s_max": round(max(init), 2),
            "command_wall_s": round(wall, 1),
            "job_wall_s": round(report.wall_seconds, 1),
            "goodput": round(report.goodput, 4),
            "badput_s": {k: round(v, 2) for k, v in report.badput.items() if v > 0},
        }
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
