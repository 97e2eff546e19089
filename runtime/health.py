"""The trainer's health duties per step, wired from the components in :mod:`stalwart.health`.

The loop calls three things: :meth:`StepHealth.after_step` after each step (heartbeat, the step's
times for the controller's straggler scores, the SDC checks that are due, the report of an anomaly
the guard held back, a rollback to the last verified checkpoint when corruption is found),
:meth:`StepHealth.checkpoint_phase` around each persistent save (the checkpointer enters it), and
``stop_requested`` (healthd said STOP), which travels in the step's one job-wide collective.
Nothing here holds the trainer: each component is given what it needs.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from stalwart.events import EventKind, EventLog
from stalwart.health.anomaly import Anomaly, NonFiniteState
from stalwart.health.client import HeartbeatClient, faulthandler_path, install_stack_dump_handler
from stalwart.health.controller_client import ControllerClient
from stalwart.health.hang import Phase
from stalwart.health.ledger import VerificationLedger
from stalwart.health.sdc import all_gather_rows
from stalwart.health.sdc_monitor import NONFINITE, FindingReporter, SdcFinding, SdcMonitor
from stalwart.health.security import TokenError, read_token
from stalwart.jobenv import CONTROLLER_ENV, HEALTHD_ENV, node_name
from stalwart.runtime.config import HealthConfig

log = logging.getLogger(__name__)


class NodeUnhealthy(RuntimeError):
    """healthd asked this job to stop: exit non-zero so the agent restarts the group without the node."""


class StepAction(enum.Enum):
    CONTINUE = "continue"
    ROLLED_BACK = "rolled_back"


class RollbackTarget(Protocol):
    """The checkpoint side as a rollback needs it (a :class:`~stalwart.checkpoint.checkpointer.Checkpointer`)."""

    def settle(self) -> None: ...

    def rollback(self, *, reason: str, from_step: int, to: int | str = "latest-verified") -> int: ...

    def committed_steps(self) -> list[int]: ...


# A state that turns non-finite again after this many rollbacks diverges by itself (learning rate, data):
# rolling back once more would loop.
MAX_NONFINITE_ROLLBACKS = 3


class ProcessGroupCollectives:
    """The SDC checks' collectives on gloo: the default group, and this rank's replica group."""

    def __init__(self, world_size: int, replica_group: dist.ProcessGroup | None) -> None:
        self.world_size = world_size
        self.replica_group = replica_group

    def gather_world(self, row: torch.Tensor) -> list[torch.Tensor]:
        return all_gather_rows(row) if self.world_size > 1 else [row.cpu()]

    def gather_replicas(self, row: torch.Tensor) -> list[torch.Tensor]:
        return all_gather_rows(row, self.replica_group)

    def replica_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.replica_group)

    def max_world(self, flags: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags


def connect_healthd(cfg: HealthConfig, run_dir: Path, rank: int, local_rank: int) -> HeartbeatClient | None:
    """The heartbeat client for the node's healthd (and its stack-dump signal), None without a daemon."""
    address = cfg.healthd or os.environ.get(HEALTHD_ENV, "")
    if not address:
        return None
    install_stack_dump_handler(faulthandler_path(run_dir, rank, os.getpid()))
    return HeartbeatClient(address, rank, local_rank, interval_s=cfg.heartbeat_interval_s)


def quarantine_through(client: HeartbeatClient | None, rank: int) -> Callable[[str], object] | None:
    """Ask the node's healthd to take this node out (it needs the job token the launcher exported)."""
    if client is None:
        return None

    def quarantine(reason: str) -> bool:
        try:
            token = read_token(None)  # $STALWART_TOKEN_FILE
        except TokenError as e:
            log.error("cannot ask healthd to quarantine rank %d (%s): %s", rank, reason, e)
            return False
        return client.quarantine("sdc", reason, token)

    return quarantine


class StepHealth:
    """One per rank; see the module docstring."""

    def __init__(
        self,
        cfg: HealthConfig,
        *,
        rank: int,
        is_main: bool,
        events: EventLog,
        monitor: SdcMonitor,
        reporter: FindingReporter,
        ledger: VerificationLedger,
        checkpoints: RollbackTarget | None,
        heartbeat: HeartbeatClient | None = None,
        controller: ControllerClient | None = None,
        world_size: int = 1,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.is_main = is_main
        self.world_size = world_size
        self.events = events
        self.monitor = monitor
        self.reporter = reporter
        self.ledger = ledger
        self.checkpoints = checkpoints
        self.heartbeat = heartbeat
        self.controller = controller
        self.node = node_name()
        self._cpu_mark = time.process_time()
        self.nonfinite_rollbacks = 0

    @property
    def stop_requested(self) -> bool:
        return self.heartbeat is not None and self.heartbeat.stop_requested

    def start(self, step: int, startup_check: bool = True) -> None:
        """After the model is built and resumed: the start-up golden check, then the first beat.

        A replacement rank skips the check: the survivors it joins are not running it.
        """
        if self.monitor.golden_every and startup_check:
            finding = self.monitor.golden_check()
            if finding is not None:
                self.reporter.report(step, finding, "golden workload at start-up")
                raise RuntimeError(
                    f"golden workload at start-up: ranks {list(finding.faulty or finding.suspects)} compute wrong "
                    "results; "
                    "take their nodes out of service (healthd was told where attached) and restart"
                )
        if self.heartbeat is not None:
            self.heartbeat.beat(step, Phase.STEP)

    def after_step(self, step: int, step_seconds: float, anomaly: Anomaly | None = None) -> StepAction:
        """Heartbeat, times, the anomaly's report, the due SDC checks; may roll back. Every rank calls it."""
        if self.heartbeat is not None:
            self.heartbeat.beat(step, Phase.STEP, step_seconds)
        if self.controller is not None:
            cpu, self._cpu_mark = time.process_time() - self._cpu_mark, time.process_time()
            self.controller.report_rank_metrics(self.rank, self.node, step, step_seconds, cpu)
        if anomaly is not None and anomaly.bad_state:
            return self.roll_back_nonfinite(step, f"{anomaly.reason}; {anomaly.outcome.detail}", "replay")
        forced = anomaly is not None and not anomaly.bad_data
        if anomaly is not None:
            self._report_anomaly(step, anomaly)
        action = StepAction.CONTINUE
        if forced or self.monitor.due(step):
            finding = self.monitor.check(step, force=forced)
            if finding is not None and finding.layer == NONFINITE:
                return self.roll_back_nonfinite(step, "the parameter fingerprints found NaN/Inf", "sdc-fingerprint")
            if finding is None:
                self.ledger.passed(step)
                if forced and not anomaly.outcome.ranks:
                    # The recomputations disagreed but the state is consistent (the update was skipped):
                    # report, no rollback.
                    suspects = SdcFinding("replay", suspects=tuple(range(self.world_size)))
                    self.reporter.report(step, suspects, f"replay at step {step}: {anomaly.outcome.detail}")
            else:
                self.reporter.report(step, finding, f"{finding.layer} check at step {step}")
                if self.cfg.rollback_on_sdc:
                    self.rollback(f"sdc ({finding.layer}) at step {step}", step)
                    action = StepAction.ROLLED_BACK
        self.ledger.record()
        return action

    @contextlib.contextmanager
    def checkpoint_phase(self, step: int) -> Iterator[bool]:
        """Around a save: heartbeat phase CHECKPOINT; yields whether the state is verified right now."""
        if self.heartbeat is not None:
            self.heartbeat.beat(step, Phase.CHECKPOINT)
        try:
            yield self.ledger.saving(step)
        finally:
            if self.heartbeat is not None:
                self.heartbeat.beat(step, Phase.STEP)

    def rollback(self, reason: str, from_step: int) -> int:
        """Load the newest verified checkpoint into the live state; collective. Returns its step."""
        if self.checkpoints is None:
            raise RuntimeError(
                f"cannot roll back ({reason}): checkpoints are disabled; "
                "set checkpoint.enabled = true or health.rollback_on_sdc = false"
            )
        self.checkpoints.settle()
        self.ledger.record()  # steps a passing check covered must be marked before choosing among them
        to_step = self.checkpoints.rollback(
            reason=reason, from_step=from_step, to="latest-verified" if self.cfg.verify_checkpoints else "latest"
        )
        self.ledger.rolled_back(to_step)
        if self.is_main:
            print(f"rollback: step {from_step} -> verified step {to_step} ({reason})", flush=True)
        return to_step

    def roll_back_nonfinite(self, step: int, why: str, detector: str) -> StepAction:
        """The state holds NaN/Inf: load the newest committed step whose state is finite; collective.

        Steps are tried newest first, each checked after loading (a committed step may itself hold
        the NaN of an update that looked finite); the newer ones are flagged rolled back. Raises
        :class:`NonFiniteState` (one line) when none is finite, there are no checkpoints, or the
        state keeps diverging.
        """
        if self.is_main:
            self.events.emit(
                EventKind.FAULT_DETECTED, fault="nonfinite_state", target=f"step{step}", detector=detector, detail=why
            )
        self.nonfinite_rollbacks += 1
        fix = (
            "lower training.lr, check the data, or resume from an earlier step (stalwart ckpt ls; --checkpoint.resume)"
        )
        if self.checkpoints is None:
            raise NonFiniteState(
                f"the model state became non-finite at step {step} ({why}) and checkpoints are "
                f"off: nothing to roll back to; {fix}"
            )
        if self.nonfinite_rollbacks > MAX_NONFINITE_ROLLBACKS:
            raise NonFiniteState(
                f"the model state became non-finite again at step {step} ({why}) after "
                f"{MAX_NONFINITE_ROLLBACKS} rollbacks: training diverges by itself; {fix}"
            )
        self.checkpoints.settle()
        candidates = sorted(self.checkpoints.committed_steps(), reverse=True)
        while candidates:
            loaded = self.checkpoints.rollback(
                reason=f"non-finite state at step {step}: {why}", from_step=step, to=candidates[0]
            )
            if self.monitor.parameters_finite():
                self.ledger.rolled_back(loaded)
                if self.is_main:
                    print(f"step {step}: non-finite state ({why}); rolled back to step {loaded}", flush=True)
                return StepAction.ROLLED_BACK
            log.error("committed step %d holds a non-finite state too; trying an earlier one", loaded)
            candidates = [s for s in candidates if s < loaded]
        raise NonFiniteState(
            f"the model state became non-finite at step {step} ({why}) and no committed step holds a finite "
            f"state to roll back to; {fix}"
        )

    def _report_anomaly(self, step: int, anomaly: Anomaly) -> None:
        outcome = anomaly.outcome
        if anomaly.bad_data:
            if self.is_main:
                self.events.emit(
                    EventKind.FAULT_DETECTED,
                    fault="bad_data",
                    target=f"step{step}",
                    detector="replay",
                    detail={"reason": anomaly.reason, "verdict": outcome.verdict.value, "detail": outcome.detail},
                )
                print(f"step {step}: {anomaly.reason}; replay reproduced it: bad data, update skipped", flush=True)
            return
        if self.is_main:
            print(
                f"step {step}: {anomaly.reason}; replay points at hardware ({outcome.detail}); update skipped, "
                "checking replicas",
                flush=True,
            )
        if outcome.ranks:  # a rank that cannot reproduce its own step names itself
            self.reporter.report(
                step,
                SdcFinding("replay", faulty=outcome.ranks),
                f"replay of step {step} ({anomaly.reason}: {outcome.detail})",
            )

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.close()
        if self.controller is not None:
            self.controller.close()


def connect_controller() -> ControllerClient | None:
    """The controller client for per-step times, when the launcher named a controller."""
    address = os.environ.get(CONTROLLER_ENV)
    return ControllerClient(address) if address else None
