"""``stalwart demo``: the whole product on one machine, in one command.

Two simulated nodes (``stalwart launch`` each, 4 CPU ranks, tp2 × pp2 × 2 replicas of the debug
model) rendezvous on localhost; each launcher starts its node's health daemon; the demo starts the
job controller and prints its dashboard address. The demo itself plays the cluster scheduler: a
node whose launcher dies (lost node) or leaves as excluded (exit 93) is replaced by a fresh node,
and a job stopped by preemption is requeued, until the job reaches its target step. Then it prints
the goodput report.

``--chaos`` adds a schedule of injected faults (:mod:`stalwart.runtime.faults`), one of each kind: a killed
rank, a hung rank, a flipped bit, a corrupted checkpoint shard, a dead GPU, a lost node and a
preemption.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from stalwart.cli.command import Subparsers, subcommand, whole_number
from stalwart.errors import UserError
from stalwart.jobenv import TOKEN_FILE_ENV
from stalwart.launcher.exclusion import EXIT_NODE_EXCLUDED
from stalwart.net import answers, free_port

# One fault of each kind, spaced so that each recovery finishes before the next fault fires.
# Ranks 0-3 start on node0 and 4-7 on node1; node names are those the demo gives its launchers.
CHAOS_PLAN: tuple[dict, ...] = (
    {"kind": "kill_rank", "step": 4, "rank": 5},
    {"kind": "hang", "step": 9, "rank": 2},
    {"kind": "flip_bit", "step": 14, "rank": 1, "bit": 30},
    # The shard rots silently; the dead GPU's restart (a smaller world: the persistent tier) finds it.
    {"kind": "ckpt_corrupt", "step": 24},
    {"kind": "gpu_fault", "step": 24, "node": "node1"},
    {"kind": "kill_agent", "step": 32, "node": "node2"},
    {"kind": "sigterm", "step": 41},
)


REPLACEMENT_WAIT_S = 180.0  # longest the scheduler waits for the survivors to train alone before a replacement

# What a random soak plan draws from, with weights: mostly the common faults of a big job.
SOAK_KINDS: tuple[tuple[str, float], ...] = (
    ("kill_rank", 4),
    ("hang", 2),
    ("flip_bit", 1),
    ("slow", 1),
    ("ckpt_kill_during_write", 1),
    ("gpu_fault", 1),
    ("kill_agent", 1),
    ("sigterm", 0.5),
)


def soak_plan(faults: int, steps: int, world: int, seed: int) -> list[dict]:
    """``faults`` faults at distinct random steps in [3, steps - 2], seeded: the soak test's schedule."""
    import random

    rng = random.Random(seed)
    kinds, weights = zip(*SOAK_KINDS)
    at = sorted(rng.sample(range(3, steps - 1), faults))
    plan = []
    for step in at:
        kind = rng.choices(kinds, weights)[0]
        spec: dict = {"kind": kind, "step": step}
        if kind in ("gpu_fault", "kill_agent"):
            spec["node"] = "any"
        elif kind != "sigterm":
            spec["rank"] = rng.randrange(world)
        if kind == "slow":
            spec.update(seconds=0.5, steps=3)
        if kind == "flip_bit":
            spec["bit"] = 30
        plan.append(spec)
    return plan


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    healthd: str
    pump: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.pump = threading.Thread(target=self._forward, daemon=True)
        self.pump.start()

    def _forward(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kind = "-soak" if args.soak else "-chaos" if args.chaos else ""
        self.run_dir = Path(args.run_dir or f"runs/demo-{stamp}{kind}").resolve()
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise UserError(
                f"{self.run_dir} already holds a run; give a new --run-dir (the demo never writes over a run)"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rdzv = f"127.0.0.1:{free_port()}"
        self.controller_grpc = f"127.0.0.1:{free_port()}"
        self.controller_http = f"127.0.0.1:{free_port()}"
        # The ranks' library warnings (deprecations inside torch) would bury the progress lines.
        self.env = {**os.environ, TOKEN_FILE_ENV: str(self._token_file()), "PYTHONWARNINGS": "ignore"}
        faults = (
            soak_plan(args.soak, args.steps, args.nodes * args.nproc_per_node, args.seed)
            if args.soak
            else CHAOS_PLAN
            if args.chaos
            else ()
        )
        if faults:
            plan = self.run_dir / "faults" / "plan.json"
            plan.parent.mkdir(parents=True, exist_ok=True)
            plan.write_text(json.dumps(list(faults), indent=1))
            self.env.update(STALWART_FAULT_INJECTION="1", STALWART_FAULT_PLAN=str(plan))
        self.nodes: list[Node] = []
        self.next_node = 0
        self.requeues = 0
        self.max_requeues = 3 + sum(1 for f in faults if f["kind"] == "sigterm")
        self.services: list[subprocess.Popen] = []

    def _token_file(self) -> Path:
        import secrets

        path = self.run_dir / "health" / "token"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        return path

    def start_controller(self) -> None:
        log = open(self.run_dir / "health" / "controller.log", "ab")
        self.services.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "stalwart",
                    "controller",
                    "--run-dir",
                    str(self.run_dir),
                    "--grpc-bind",
                    self.controller_grpc,
                    "--http-bind",
                    self.controller_http,
                    "--token-file",
                    self.env[TOKEN_FILE_ENV],
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{self.controller_http}/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.3)
        print(f"stalwart demo: dashboard at http://{self.controller_http}/  (run dir {self.run_dir})", flush=True)

    def start_node(self) -> Node:
        name = f"node{self.next_node}"
        self.next_node += 1
        healthd = f"127.0.0.1:{free_port()}"
        argv = [
            sys.executable,
            "-m",
            "stalwart",
            "launch",
            "--config",
            self.args.config,
            "--nnodes",
            f"1:{self.args.nodes}",
            "--nproc-per-node",
            str(self.args.nproc_per_node),
            "--rdzv-endpoint",
            self.rdzv,
            "--rdzv-id",
            "demo",
            "--node-id",
            name,
            "--healthd",
            healthd,
            "--controller",
            self.controller_grpc,
            "--max-restarts",
            "20",
            # One machine: a lost peer or a finished round shows within seconds, not a datacenter's 30 s.
            "--peer-timeout",
            "6",
            "--monitor-interval",
            "0.2",
            "--rdzv-conf",
            "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=300,read_timeout=20",
            "--run-dir",
            str(self.run_dir),
            "--training.steps",
            str(self.args.steps),
            *self.args.overrides,
        ]
        proc = subprocess.Popen(
            argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            stdin=subprocess.DEVNULL,
        )
        node = Node(name, proc, healthd)
        self.nodes.append(node)
        if len(self.nodes) == 1:  # it hosts the rendezvous store (the node a c10d job can't lose): let it bind first
            deadline = time.monotonic() + 120
            while not answers(self.rdzv) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        return node

    def last_step(self) -> int:
        from stalwart.events import read_events

        return max((e.get("step", 0) for e in read_events(self.run_dir) if e["kind"] == "step_end"), default=0)

    def reformed_since(self, ts: float) -> bool:
        """Whether the running nodes re-formed in a smaller group after ``ts`` and stepped in it."""
        from stalwart.events import EventKind, read_events

        events = sorted(read_events(self.run_dir), key=lambda e: e["ts"])
        smaller = next(
            (
                e["ts"]
                for e in events
                if e["kind"] == EventKind.WORKER_START.value
                and e.get("role") == "agent"
                and e["ts"] > ts
                and (e.get("nodes") or self.args.nodes) < self.args.nodes
            ),
            None,
        )
        return smaller is not None and any(e["kind"] == EventKind.STEP_END.value and e["ts"] > smaller for e in events)

    def supervise(self) -> bool:
        """Play the scheduler until every launcher has exited; True when the target step was reached."""
        waiting: list[tuple[str, float]] = []  # (why, when): nodes gone, replacement not yet up
        while True:
            running = [n for n in self.nodes if n.proc.poll() is None]
            ended = [n for n in self.nodes if n.proc.poll() is not None and not getattr(n, "handled", False)]
            for node in ended:
                node.handled = True  # type: ignore[attr-defined]
                code = node.proc.returncode
                if (code == EXIT_NODE_EXCLUDED or code < 0) and self.last_step() < self.args.steps:
                    why = "was excluded" if code == EXIT_NODE_EXCLUDED else f"was lost ({signal.Signals(-code).name})"
                    print(f"stalwart demo: {node.name} {why}; the scheduler will bring up a replacement", flush=True)
                    waiting.append((f"{node.name} {why}", time.time()))
                elif code == 0 and self.last_step() < self.args.steps:
                    # A preempted node: the scheduler takes the whole job (its other nodes would re-form
                    # and wait for a peer that is not coming), then requeues it.
                    for other in running:
                        other.proc.terminate()
            # A replacement takes a while to arrive: the survivors re-form without the node and train
            # (or three minutes pass), as on a cluster, then the new node grows the job back.
            while waiting and (
                not running or self.reformed_since(waiting[0][1]) or time.time() - waiting[0][1] > REPLACEMENT_WAIT_S
            ):
                why, _ = waiting.pop(0)
                replacement = self.start_node()
                print(f"stalwart demo: {why}; the scheduler brings up {replacement.name}", flush=True)
                running.append(replacement)
            if not running:
                if self.last_step() >= self.args.steps or self.requeues >= self.max_requeues:
                    return self.last_step() >= self.args.steps
                self.requeues += 1  # preempted (exit 0 before the target): requeue the whole job
                print(
                    f"stalwart demo: the job stopped at step {self.last_step()} (preempted); requeueing it", flush=True
                )
                for _ in range(self.args.nodes):
                    self.start_node()
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in [n.proc for n in self.nodes] + self.services:
            if proc.poll() is None:
                proc.terminate()
        for proc in [n.proc for n in self.nodes] + self.services:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for node in self.nodes:
            node.pump.join(timeout=5)


def worst_incident(run_dir: Path) -> str:
    """How many incidents, and the fault that cost the most (downtime plus lost work), in one line."""
    from stalwart.events import read_events
    from stalwart.goodput.accounting import compute_goodput

    report = compute_goodput(read_events(run_dir))
    faults = [i for i in report.incidents if not i.planned]
    counts = f"{len(faults)} fault incident(s), {len(report.incidents) - len(faults)} planned"
    if not faults:
        return f"stalwart demo: {counts}"
    worst = max(faults, key=lambda i: i.downtime + i.lost_seconds)
    return f"stalwart demo: {counts}; costliest: {worst.kind} on {worst.target}: {worst.summary}"


def register(sub: Subparsers) -> None:
    p = subcommand(
        sub,
        "demo",
        run=run,
        overrides=True,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="the whole product on this machine: 2 nodes × 4 CPU ranks, health, dashboard, goodput (--chaos)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--chaos", action="store_true", help="inject one fault of every kind on the way")
    p.add_argument("--config", default="demo", help="config to train (default: the shipped demo config)")
    p.add_argument("--steps", type=whole_number(1, 10**9, 60), default=60, help="target step (default 60)")
    p.add_argument("--nodes", type=whole_number(1, 64, 2), default=2, help="simulated nodes (default 2)")
    p.add_argument("--nproc-per-node", type=whole_number(1, 1024, 4), default=4, help="CPU ranks per node (default 4)")
    p.add_argument("--run-dir", default=None, help="where the run goes (default runs/demo-<time>)")
    p.add_argument(
        "--soak",
        type=whole_number(0, 10**6, 30),
        default=0,
        metavar="N",
        help="soak test: N faults of random kinds at random steps (e.g. --soak 30 --steps 200)",
    )
    p.add_argument("--seed", type=whole_number(0, 2**63 - 1, 0), default=0, help="seed of the --soak schedule")


def check_demo(args: argparse.Namespace, overrides: list[str]) -> None:
    """The config and layout every node's launcher will run, checked before any process starts."""
    from stalwart.launcher.plan import plan_nodes
    from stalwart.runtime.config import load_config

    cfg = load_config(args.config, [*overrides, "--training.steps", str(args.steps)])
    plan_nodes(cfg, args.nproc_per_node, 1, args.nodes)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    args.overrides = overrides
    if args.chaos and args.nodes != 2:
        raise UserError("--chaos is written for --nodes 2")
    if args.soak and not 0 < args.soak <= args.steps - 4:
        raise UserError(f"--soak {args.soak} needs --steps of at least {args.soak + 4} (one fault per step at most)")
    check_demo(args, overrides)
    demo = Demo(args)
    started = time.monotonic()
    ok = False
    try:
        demo.start_controller()
        for _ in range(args.nodes):
            demo.start_node()
        ok = demo.supervise()
    except KeyboardInterrupt:
        print("stalwart demo: interrupted; stopping the nodes", flush=True)
    finally:
        demo.stop()
    from stalwart.cli.goodput import summarize_run

    print(summarize_run(demo.run_dir), end="", flush=True)
    if args.soak or args.chaos:
        print(worst_incident(demo.run_dir), flush=True)
    status = "reached" if ok else "did NOT reach"
    print(
        f"stalwart demo: the job {status} step {args.steps} in {time.monotonic() - started:.0f} s; run dir "
        f"{demo.run_dir}",
        flush=True,
    )
    return 0 if ok else 1
