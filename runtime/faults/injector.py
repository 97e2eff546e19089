"""Carries out a fault plan from inside the trainer, at step boundaries.

Every fault fires once per job, however often the worker group restarts and replays the step:
the acting process claims it by creating ``RUN/faults/fired/<fault id>`` exclusively. Each
firing is logged as a ``fault_injected`` event first (flushed, since the next thing may be a
SIGKILL): that event is the ground truth the chaos tests hold detection and goodput against.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stalwart.events import EventKind, EventLog
from stalwart.files import atomic_write
from stalwart.jobenv import node_name
from stalwart.runtime.faults.plan import FaultKind, FaultPlan, FaultSpec

ANY_NODE = "any"  # a node fault for whichever node gets there first (random soak plans)
# Faults that one process of a node carries out for the whole node (its local rank 0).
NODE_KINDS = frozenset({FaultKind.GPU_FAULT, FaultKind.KILL_AGENT})
# Faults that fire right after a persistent save returned instead of at a step's start.
AFTER_SAVE_KINDS = frozenset({FaultKind.CKPT_KILL_DURING_WRITE, FaultKind.KILL_AFTER_COMMIT})
_ELSEWHERE = AFTER_SAVE_KINDS | {FaultKind.KILL_DURING_REFORM}  # not at a step's start


class FaultInjector:
    def __init__(
        self, plan: FaultPlan, run_dir: str | Path, rank: int, local_rank: int, node: str, events: EventLog
    ) -> None:
        self.plan, self.rank, self.local_rank, self.node, self.events = plan, rank, local_rank, node, events
        self.run_dir = Path(run_dir)
        self.ledger = self.run_dir / "faults" / "fired"
        self.ledger.mkdir(parents=True, exist_ok=True)
        self._slow_until: dict[str, tuple[int, float]] = {}

    @classmethod
    def from_env(cls, run_dir: str | Path, rank: int, local_rank: int, events: EventLog) -> FaultInjector | None:
        """The injector for ``$STALWART_FAULT_PLAN``; None (nothing to do) without a plan."""
        plan = FaultPlan.from_env()
        return cls(plan, run_dir, rank, local_rank, node_name(), events) if plan else None

    def mine(self, spec: FaultSpec) -> bool:
        if spec.kind in NODE_KINDS:
            return spec.node in (self.node, ANY_NODE) and self.local_rank == 0
        return (spec.rank or 0) == self.rank

    def _claim(self, spec: FaultSpec) -> bool:
        try:
            os.close(os.open(self.ledger / spec.id, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def _record(self, spec: FaultSpec, step: int) -> None:
        target = (
            (self.node if spec.node == ANY_NODE else spec.node) if spec.kind in NODE_KINDS else f"rank{spec.rank or 0}"
        )
        self.events.emit(EventKind.FAULT_INJECTED, fault=spec.kind.value, target=target, step=step, spec=spec.to_dict())
        if spec.kind != FaultKind.KILL_AFTER_COMMIT:  # that kill must find the log as the trainer left it
            self.events.flush()

    def before_step(
        self,
        step: int,
        parameters: Callable[[], list[torch.nn.Parameter]],
        newest_checkpoint: Callable[[], Path | None] = lambda: None,
    ) -> None:
        """Fire this process's due faults.

        ``parameters`` gives the local (sharded) parameters; ``newest_checkpoint`` the directory
        of the newest committed step on local disk (None when there is none).
        """
        for last_step, seconds in list(self._slow_until.values()):
            if step <= last_step:
                burn_cpu(seconds)
        for spec in self.plan.faults:
            if spec.step > step or not self.mine(spec) or spec.kind in _ELSEWHERE:
                continue  # these fire after a save or in a re-formation
            if spec.kind == FaultKind.CKPT_CORRUPT:
                directory = newest_checkpoint()
                if directory is None or not self._claim(spec):
                    continue
                self._record(spec, step)
                self.events.emit(
                    EventKind.FAULT_INJECTED,
                    fault="ckpt_corrupt_file",
                    target=str(corrupt_one_shard(directory, spec.step)),
                    step=step,
                )
                self.events.flush()
                continue
            if not self._claim(spec):
                continue
            self._record(spec, step)
            self._fire(spec, step, parameters)

    def during_reform(self, step: int) -> None:
        """In an in-process recovery, before the new generation forms: a second fault while recovering."""
        for spec in self.plan.faults:
            if (
                spec.kind == FaultKind.KILL_DURING_REFORM
                and spec.step <= step
                and self.mine(spec)
                and self._claim(spec)
            ):
                self._record(spec, step)
                os.kill(os.getpid(), signal.SIGKILL)

    def after_save_started(self, step: int) -> None:
        """Right after a save returned: an async one is still being written, a sync one is committed; kill this rank."""
        for spec in self.plan.faults:
            if spec.kind in AFTER_SAVE_KINDS and spec.step <= step and self.mine(spec) and self._claim(spec):
                self._record(spec, step)
                os.kill(os.getpid(), signal.SIGKILL)

    def _fire(self, spec: FaultSpec, step: int, parameters: Callable[[], list[torch.nn.Parameter]]) -> None:
        kind = spec.kind
        if kind == FaultKind.KILL_RANK:
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == FaultKind.HANG:
            if spec.seconds > 0:
                time.sleep(spec.seconds)  # the peers wait inside the step's first collective
            else:
                os.kill(os.getpid(), signal.SIGSTOP)
        elif kind == FaultKind.SLOW:
            self._slow_until[spec.id] = (step + spec.steps - 1, spec.seconds)
            burn_cpu(spec.seconds)
        elif kind == FaultKind.FLIP_BIT:
            flip_one_parameter_bit(parameters(), spec.bit, seed=spec.step)
        elif kind == FaultKind.NAN_PARAMS:
            from stalwart.health.sdc import local_tensor

            with torch.no_grad():
                for p in parameters():
                    local_tensor(p).fill_(float("nan"))
        elif kind == FaultKind.GPU_FAULT:
            write_gpu_fault(self.run_dir, self.node)
        elif kind == FaultKind.KILL_AGENT:
            kill_agent_and_workers()
        elif kind == FaultKind.SIGTERM:
            preempt_and_wait()


def preempt_and_wait(timeout_s: float = 30.0) -> None:
    """SIGTERM to the launcher (or this rank without one), as a scheduler preempts; return once it reached this rank.

    The launcher relays the signal to its ranks; waiting for it here makes the fault's step the one
    that stops (a busy 2-core box can otherwise relay it a step later) without changing what the
    trainer does with the signal: its own handler still runs.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        os.kill(os.getpid(), signal.SIGTERM)  # handled before the next bytecode: nothing to wait for
        return
    arrived = threading.Event()
    previous = signal.getsignal(signal.SIGTERM)

    def relay(signum: int, frame: object) -> None:
        arrived.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, relay)
    try:
        os.kill(os.getppid(), signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while not arrived.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)  # Python runs signal handlers in the main thread, between these sleeps
    finally:
        signal.signal(signal.SIGTERM, previous)


def burn_cpu(seconds: float) -> None:
    """A slow rank computes longer (busy, not asleep): its own compute time grows, as on a sick GPU."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def flip_one_parameter_bit(params: list[torch.nn.Parameter], bit: int, seed: int) -> tuple[int, int]:
    """Flip ``bit`` of one element of this rank's largest local parameter shard; returns (param, index)."""
    from stalwart.health.sdc import flip_bit, local_tensor

    locals_ = [local_tensor(p) for p in params]
    which = max(range(len(locals_)), key=lambda i: locals_[i].numel())
    index = random.Random(seed).randrange(locals_[which].numel())
    with torch.no_grad():
        flip_bit(params[which], index, bit)
    return which, index


def write_gpu_fault(run_dir: Path, node: str) -> Path:
    """What the node daemon's FaultInjectionProbe reads: a fatal XID 79 (GPU fell off the bus)."""
    import json

    path = run_dir / "faults" / f"gpu-{node}.json"
    atomic_write(path, json.dumps({"gpu": 0, "fault": "xid", "code": 79}))
    return path


def kill_agent_and_workers() -> None:
    """A node lost at once: its agent and every worker it started (they are in their own sessions)."""
    import psutil

    agent = psutil.Process(os.getppid())
    victims = [agent, *agent.children(recursive=True)]
    for p in victims:
        if p.pid != os.getpid():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    os.kill(os.getpid(), signal.SIGKILL)


def corrupt_one_shard(step_dir: Path, seed: int) -> Path:
    """Flip one byte in the middle of the largest data file of a committed step."""
    shards = sorted((p for p in Path(step_dir).rglob("*.distcp")), key=lambda p: (-p.stat().st_size, p.name))
    if not shards:
        raise FileNotFoundError(f"no .distcp shard under {step_dir}")
    shard = shards[0]
    data = bytearray(shard.read_bytes())
    at = random.Random(seed).randrange(len(data) // 4, 3 * len(data) // 4)
    data[at] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard
