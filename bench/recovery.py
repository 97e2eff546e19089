"""Recovery from a killed rank: in-process re-formation vs a whole-world restart, on the same job and machine.

    python bench/recovery.py [--runs 2] [--kills 3] [--ranks 2] [extra --section.key value ...]

Each run is a one-node ``stalwart launch`` of the debug model (2 ranks, two replicas: every rank has
a peer holding its shard) that SIGKILLs rank 1 ``--kills`` times at spaced steps (the fault plan's
``kill_rank``). Runs alternate between in-process recovery (the default) and
``--recovery.in_process false`` (the whole worker group restarts and reloads the newest checkpoint),
so both see the same machine load. Every phase is read from the run's event log:

- in process: detection (kill → the survivors' ``reform_begin``), release (old groups torn down),
  re-formation (the new generation formed: includes waiting for the replacement), replacement start
  (the agent's ``rank_replaced`` → the new rank's ``init_done``), state transfer, first step;
- world restart: detection (kill → the agent's ``fault_detected``), stop + re-rendezvous (→ the
  agent's next ``worker_start``), spawn + import + init (→ the last ``init_done``), checkpoint load,
  first step.

``kill → next step`` runs from the kill to the end of the first step after the recovery. The last
line is a row for bench/RESULTS.md (medians, [min..max] spread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import psutil

from stalwart.events import read_events
from stalwart.net import free_port

JOB = [
    "--model.n_layers", "2", "--data.seq_len", "32", "--data.max_tokens", "20000", "--training.global_batch_size", "8",
    "--training.microbatch_size", "4", "--training.threads_per_rank", "1", "--training.warmup_steps", "2",
    "--checkpoint.interval", "4", "--health.golden_every", "0", "--health.fingerprint_every", "0",
    "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1",
]  # fmt: skip
FAST = ["--monitor-interval", "0.1", "--rdzv-conf", "last_call_timeout=1,join_timeout=120", "--max-restarts", "10",
        "--failure-stop-timeout", "2"]  # fmt: skip


def one_run(in_process: bool, kills: int, ranks: int, extra: list[str]) -> list[dict[str, float]]:
    """One job with ``kills`` rank kills; the phases of each recovery."""
    kill_steps = [6 + 10 * i for i in range(kills)]  # ~4 s apart: the node's warm spare is restocked
    plan = [{"kind": "kill_rank", "step": s, "rank": 1} for s in kill_steps]
    steps = kill_steps[-1] + 4
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [
            sys.executable, "-m", "stalwart", "launch", "--config", "debug", "--nnodes", "1",
            "--nproc-per-node", str(ranks), "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--healthd", "off",
            "--controller", "off", "--run-dir", str(run_dir), *FAST, *JOB, "--training.steps", str(steps),
            "--recovery.in_process", "true" if in_process else "false", *extra,
        ]  # fmt: skip
        env = {**os.environ, "STALWART_FAULT_INJECTION": "1", "STALWART_FAULT_PLAN": json.dumps(plan)}
        env["PYTHONWARNINGS"] = "ignore"
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"launch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        evs = sorted(read_events(run_dir), key=lambda e: e["ts"])
    kills_at = [e for e in evs if e["kind"] == "fault_injected"]
    return [(_in_process_phases if in_process else _restart_phases)(evs, k["ts"]) for k in kills_at]


def _after(evs: list[dict[str, Any]], ts: float, pred: Any) -> dict[str, Any]:
    return next(e for e in evs if e["ts"] >= ts and pred(e))


def _first_step_after(evs: list[dict[str, Any]], ts: float) -> dict[str, Any]:
    return _after(evs, ts, lambda e: e["kind"] == "step_end" and e.get("rank") == 0)


def _in_process_phases(evs: list[dict[str, Any]], kill: float) -> dict[str, float]:
    begin = _after(evs, kill, lambda e: e["kind"] == "reform_begin" and e.get("rank") == 0)
    end = _after(evs, kill, lambda e: e["kind"] == "reform_end" and e.get("rank") == 0)
    replaced = _after(evs, kill, lambda e: e["kind"] == "rank_replaced")
    joined = _after(evs, kill, lambda e: e["kind"] == "init_done" and e.get("replacement"))
    step = _first_step_after(evs, end["ts"])
    phases = end["phases"]
    return {
        "detection": begin["ts"] - kill,
        "release": phases["release"],
        "re-formation": phases["form"],
        "replacement start": joined["ts"] - replaced["ts"],
        "state transfer": phases["state"],
        "first step": step["ts"] - end["ts"],
        "kill -> next step": step["ts"] - kill,
    }


def _restart_phases(evs: list[dict[str, Any]], kill: float) -> dict[str, float]:
    found = _after(evs, kill, lambda e: e["kind"] == "fault_detected")
    started = _after(evs, found["ts"], lambda e: e["kind"] == "worker_start" and e.get("role") == "agent")
    ready = [e for e in evs if e["kind"] == "init_done" and e["ts"] > started["ts"]][:2]
    load = _after(evs, started["ts"], lambda e: e["kind"] == "ckpt_load")
    step = _first_step_after(evs, ready[-1]["ts"])
    return {
        "detection": found["ts"] - kill,
        "stop + re-rendezvous": started["ts"] - found["ts"],
        "spawn + import + init": ready[-1]["ts"] - started["ts"] - load.get("seconds", 0.0),
        "checkpoint load": load.get("seconds", 0.0),
        "first step": step["ts"] - ready[-1]["ts"],
        "kill -> next step": step["ts"] - kill,
    }


def _summary(samples: list[dict[str, float]]) -> dict[str, tuple[float, float, float]]:
    return {k: (statistics.median(s[k] for s in samples), min(s[k] for s in samples), max(s[k] for s in samples))
            for k in samples[0]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="runs of each kind, interleaved (default 2)")
    parser.add_argument("--kills", type=int, default=3, help="rank kills per run (default 3)")
    parser.add_argument("--ranks", type=int, default=2)
    args, extra = parser.parse_known_args()
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for i in range(args.runs):
        for in_process in (True, False):
            t0 = time.time()
            got = one_run(in_process, args.kills, args.ranks, extra)
            results[in_process] += got
            kind = "in-process" if in_process else "world restart"
            print(f"run {i + 1} {kind}: {len(got)} recoveries in {time.time() - t0:.0f} s: "
                  + ", ".join(f"{g['kill -> next step']:.2f}" for g in got), flush=True)  # fmt: skip
    for in_process in (True, False):
        print(f"\n{'in-process recovery' if in_process else 'whole-world restart'} ({len(results[in_process])} kills)")
        for name, (med, lo, hi) in _summary(results[in_process]).items():
            print(f"  {name:24} {med:6.2f} s  [{lo:.2f} .. {hi:.2f}]")
    fast = _summary(results[True])["kill -> next step"]
    slow = _summary(results[False])["kill -> next step"]
    machine = f"{platform.machine()}, {psutil.cpu_count()} cores, load average {psutil.getloadavg()[0]:.1f}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\nspeed-up (median kill -> next step): {slow[0] / fast[0]:.1f}x")
    print(f"| {date.today()} | {machine} | {commit} | {args.ranks} | {len(results[True])} + {len(results[False])} | "
          f"{fast[0]:.2f} s [{fast[1]:.2f}..{fast[2]:.2f}] | {slow[0]:.2f} s [{slow[1]:.2f}..{slow[2]:.2f}] | "
          f"{slow[0] / fast[0]:.1f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
