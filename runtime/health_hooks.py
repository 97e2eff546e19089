"""The trainer's health duties: heartbeats, SDC checks, anomaly replay, verified checkpoints, rollback.

The trainer calls four hooks; everything else lives here:

- :meth:`TrainerHealth.guard_step` between backward and the optimizer step: NaN/Inf or a loss /
  grad-norm spike (decided job-wide by one small all-reduce, which also carries healthd's STOP)
  replays the step from the same state on the same rank and on a data-parallel neighbour and
  skips the update. A replay that differs is bad hardware (quarantine), one that reproduces is
  bad data (the batch is dropped).
- :meth:`TrainerHealth.after_step` after each step: heartbeat, then every ``fingerprint_every`` /
  ``golden_every`` steps the SDC checks (collectives on every rank at the same steps). A confirmed
  SDC names the rank (``fault_detected``), asks the local healthd to take the node out, and rolls
  the job back to the last verified checkpoint.
- :meth:`TrainerHealth.checkpoint_phase` around each save: a save right after a passing check is
  written verified; others are marked verified by the next passing check (rank 0, once committed).
- :meth:`TrainerHealth.rollback`: load ``latest-verified`` into the live state; collective.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from stalwart.events import EventKind
from stalwart.health.client import HeartbeatClient, faulthandler_path, install_stack_dump_handler
from stalwart.health.hang import Phase
from stalwart.health.sdc import (
    ReplayOutcome,
    SpikeDetector,
    Verdict,
    Vote,
    all_gather_rows,
    close_enough,
    fingerprint,
    golden_workload,
    odd_ones_out,
    replay_verdict,
)
from stalwart.health.security import TokenError, read_token
from stalwart.runtime.train_state import train_state

if TYPE_CHECKING:
    from stalwart.health.controller_client import ControllerClient
    from stalwart.runtime.train import Trainer

log = logging.getLogger(__name__)

HEALTHD_ENV = "STALWART_HEALTHD"
CONTROLLER_ENV = "STALWART_CONTROLLER"
NODE_ID_ENV = "STALWART_NODE_ID"
REPLAY_RTOL = 1e-5  # recomputations on GPU may reorder reductions; a hardware fault is far larger


class NodeUnhealthy(RuntimeError):
    """healthd asked this job to stop: exit non-zero so the agent restarts the group without the node."""


class StepAction(enum.Enum):
    CONTINUE = "continue"
    ROLLED_BACK = "rolled_back"
    STOP = "stop"  # healthd asked this job's ranks to stop (node unhealthy)


@dataclass(frozen=True)
class SdcFinding:
    """Ranks that hold or compute wrong numbers; ``suspects`` when the check could not tell which."""

    layer: str  # "fingerprint" or "golden"
    faulty: tuple[int, ...] = ()
    suspects: tuple[int, ...] = ()
    params: tuple[str, ...] = ()  # first mismatching parameters (fingerprint layer, this replica group)


@dataclass
class _Verification:
    clean_at: int | None = None  # step of the newest passing SDC check
    unverified: list[int] = field(default_factory=list)  # saved steps awaiting a passing check
    to_mark: list[int] = field(default_factory=list)  # verified steps not yet recorded (commit pending)


class TrainerHealth:
    """One per rank; built right after the event log so heartbeats cover start-up too."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.cfg = trainer.cfg.health
        self.rank = trainer.env.rank
        self.world_size = trainer.env.world_size
        self.address = self.cfg.healthd or os.environ.get(HEALTHD_ENV, "")
        self.client: HeartbeatClient | None = None
        if self.address:
            install_stack_dump_handler(faulthandler_path(trainer.cfg.run_dir, self.rank, os.getpid()))
            self.client = HeartbeatClient(self.address, self.rank, trainer.env.local_rank, interval_s=self.cfg.heartbeat_interval_s)
        # Per-step times for the controller's straggler scores; the CPU time of the step is this
        # rank's own compute (gloo and NCCL waits do not burn it), its wall time is the job's.
        self.controller: ControllerClient | None = None
        if os.environ.get(CONTROLLER_ENV):
            from stalwart.health.controller_client import ControllerClient

            self.controller = ControllerClient(os.environ[CONTROLLER_ENV])
        self.node = os.environ.get(NODE_ID_ENV) or os.environ.get("GROUP_RANK", "0")
        self._cpu_mark = time.process_time()
        self.spikes = SpikeDetector(factor=self.cfg.spike_factor)
        self.verification = _Verification()
        self.golden_reference: torch.Tensor | None = None
        self.replica_group: dist.ProcessGroup | None = None
        self._stop_agreed = False
        self._replayed: ReplayOutcome | None = None  # a hardware verdict awaiting the forced SDC check

    # ------------------------------------------------------------------------------- hooks

    def start(self) -> None:
        """After the model is built and resumed: find the replicas, run the start-up golden check."""
        t = self.trainer
        if t.mesh is not None and t.dims.dp_replicate > 1:
            self.replica_group = t.mesh["dp_replicate"].get_group()
        elif self.cfg.fingerprint_every and t.env.is_main:
            print("sdc: no data-parallel replicas (dp_replicate = 1): parameter fingerprints are off; golden workload and anomaly replay stay on", flush=True)
        if self.cfg.golden_every:
            finding = self._golden_check()
            if finding is not None:
                self._report(t.step, finding, "golden workload at start-up")
                raise RuntimeError(
                    f"golden workload at start-up: ranks {list(finding.faulty or finding.suspects)} compute wrong results; "
                    "take their nodes out of service (healthd was told where attached) and restart"
                )
        if self.client is not None:
            self.client.beat(t.step, Phase.STEP)

    def guard_step(self, microbatches: list[tuple[torch.Tensor, torch.Tensor]], local_loss: torch.Tensor, loss: float, grad_norm: float) -> bool:
        """True to apply this step's update; False when an anomaly was replayed and the step dropped."""
        reason = self.spikes.check(loss=loss, grad_norm=grad_norm)
        stop = self.client is not None and self.client.stop_requested
        if self.world_size > 1:
            flags = torch.tensor([reason is not None, stop], dtype=torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # default group, CPU tensor: gloo on every job
            anomaly, self._stop_agreed = bool(flags[0]), bool(flags[1])
        else:
            anomaly, self._stop_agreed = reason is not None, stop
        if not anomaly:
            self.spikes.accept(loss=loss, grad_norm=grad_norm)
            return True
        outcome = self._replay(microbatches, local_loss, grad_norm)
        self._on_anomaly(reason or "anomaly on another rank", outcome)
        return False

    def after_step(self, step_seconds: float) -> StepAction:
        """Heartbeat and the periodic SDC checks; may roll back. Called by every rank."""
        t = self.trainer
        step = t.step
        if self.client is not None:
            self.client.beat(step, Phase.STEP, step_seconds)
        if self.controller is not None:
            cpu, self._cpu_mark = time.process_time() - self._cpu_mark, time.process_time()
            self.controller.report_rank_metrics(self.rank, self.node, step, step_seconds, cpu)
        if self._stop_agreed:
            return StepAction.STOP
        action = StepAction.CONTINUE
        replayed, self._replayed = self._replayed, None
        finding = self._periodic_check(step, force=replayed is not None)
        if finding is None and replayed is not None and not replayed.ranks:
            # The recomputations disagreed but the state is consistent (the update was skipped): report, no rollback.
            self._report(step, SdcFinding("replay", suspects=tuple(range(self.world_size))), f"replay at step {step}: {replayed.detail}")
        if finding is not None:
            self._report(step, finding, f"{finding.layer} check at step {step}")
            if self.cfg.rollback_on_sdc:
                self.rollback(f"sdc ({finding.layer}) at step {step}")
                action = StepAction.ROLLED_BACK
        self._record_verified()
        return action

    @contextlib.contextmanager
    def checkpoint_phase(self, step: int) -> Iterator[bool]:
        """Around a save: heartbeat phase CHECKPOINT; yields whether the state is verified right now."""
        if self.client is not None:
            self.client.beat(step, Phase.CHECKPOINT)
        v = self.verification
        verified = self.cfg.verify_checkpoints and v.clean_at == step
        if self.cfg.verify_checkpoints and not verified:
            v.unverified.append(step)
        try:
            yield verified
        finally:
            if self.client is not None:
                self.client.beat(step, Phase.STEP)

    def rollback(self, reason: str, skip_data_steps: int = 0) -> int:
        """Load the newest verified checkpoint into the live state; collective. Returns its step.

        ``skip_data_steps`` then advances the data loader that many global batches (past data that
        caused a loss spike), on every rank alike.
        """
        t = self.trainer
        if t.checkpoints is None:
            raise RuntimeError(f"cannot roll back ({reason}): checkpoints are disabled; set checkpoint.enabled = true or health.rollback_on_sdc = false")
        from_step = t.step
        try:
            t.checkpoints.wait()
        except Exception as e:  # a failed in-flight save is not needed for a rollback
            log.warning("in-flight checkpoint did not commit (%s); rolling back anyway", e)
        self._record_verified()
        to_step = t.checkpoints.rollback(
            train_state(t), to="latest-verified" if self.cfg.verify_checkpoints else "latest", reason=reason, from_step=from_step,
            skip_data_steps=skip_data_steps,
        )
        if skip_data_steps:
            t.loader.skip(skip_data_steps * t.loader.global_batch_size)
        v = self.verification
        v.unverified = [s for s in v.unverified if s <= to_step]
        v.clean_at = to_step
        if t.env.is_main:
            print(f"rollback: step {from_step} -> verified step {to_step} ({reason})", flush=True)
        return to_step

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.controller is not None:
            self.controller.close()

    # ---------------------------------------------------------------------------- SDC checks

    def _periodic_check(self, step: int, force: bool = False) -> SdcFinding | None:
        """Run the checks due at ``step`` (all enabled ones when ``force``); a pass advances ``clean_at``.

        Every rank reaches the same decision: the results are gathered job-wide.
        """
        c = self.cfg
        due_fp = bool(c.fingerprint_every) and self.replica_group is not None and (force or step % c.fingerprint_every == 0)
        due_golden = bool(c.golden_every) and (force or step % c.golden_every == 0)
        if not (due_fp or due_golden):
            return None
        finding = self._fingerprint_check() if due_fp else None
        if finding is None and due_golden:
            finding = self._golden_check()
        elif finding is not None and finding.suspects:
            # Two replicas cannot outvote each other: the golden workload names the one that computes wrong.
            golden = self._golden_check()
            named = tuple(r for r in (golden.faulty if golden else ()) if r in finding.suspects)
            if named:
                finding = SdcFinding("fingerprint+golden", faulty=named, params=finding.params)
        if finding is None:
            self.verification.clean_at = step
            v = self.verification
            v.to_mark += [s for s in v.unverified if s <= step]
            v.unverified = [s for s in v.unverified if s > step]
        return finding

    def _fingerprint_check(self) -> SdcFinding | None:
        """Compare this replica group's parameter fingerprints; suspects of all groups, job-wide."""
        named = [(n, p) for part in self.trainer.model_parts for n, p in part.named_parameters()]
        fp = fingerprint(p for _, p in named)
        rows = all_gather_rows(fp, self.replica_group)
        vote = odd_ones_out(rows)
        group_ranks = dist.get_process_group_ranks(self.replica_group)
        params: tuple[str, ...] = ()
        if not vote.agree:
            bad = vote.odd[0]
            good = next((i for i in range(len(rows)) if i not in vote.odd), (bad + 1) % len(rows))
            differing = (rows[good] != rows[bad]).any(dim=1).nonzero().flatten().tolist()
            params = tuple(named[i][0] for i in differing[:4])
        flags = _job_flags(self.world_size, group_ranks, vote)
        faulty = tuple(r for r in range(self.world_size) if flags[r] == 2)
        suspects = tuple(r for r in range(self.world_size) if flags[r] == 1)
        if not faulty and not suspects:
            return None
        return SdcFinding("fingerprint", faulty=faulty, suspects=suspects, params=params)

    def _golden_check(self) -> SdcFinding | None:
        """Golden workload on every rank: odd ones out by majority, or a change since start-up."""
        result = golden_workload(self.trainer.env.device)
        if self.golden_reference is None:
            self.golden_reference = result
        changed = not torch.equal(result, self.golden_reference)
        row = torch.cat([result.flatten(), torch.tensor([int(changed)])])
        rows = all_gather_rows(row) if self.world_size > 1 else [row]
        vote = odd_ones_out([r[:-1] for r in rows])
        faulty = {r for r, row in enumerate(rows) if row[-1]} | (set() if vote.undetermined else set(vote.odd))
        if faulty:
            return SdcFinding("golden", faulty=tuple(sorted(faulty)))
        if vote.undetermined:
            return SdcFinding("golden", suspects=vote.odd)
        return None

    # ------------------------------------------------------------------------- actions

    def _report(self, step: int, finding: SdcFinding, what: str) -> None:
        """``fault_detected`` from each faulty rank itself (its host and node), or rank 0 for suspects."""
        t = self.trainer
        detail: dict[str, Any] = {"step": step, "layer": finding.layer, "params": list(finding.params)}
        if self.rank in finding.faulty:
            where = {"node": os.environ.get("GROUP_RANK", "0"), "local_rank": t.env.local_rank, "device": str(t.env.device)}
            t.events.emit(EventKind.FAULT_DETECTED, fault="sdc", target=f"rank{self.rank}", detector=f"sdc-{finding.layer}", detail={**detail, **where})
            t.events.flush()
            log.error("sdc: %s found this rank (%d, %s) holding or computing wrong numbers; quarantining", what, self.rank, where)
            self._quarantine(f"sdc: {what}")
        elif not finding.faulty and t.env.is_main:
            targets = ",".join(f"rank{r}" for r in finding.suspects)
            t.events.emit(EventKind.FAULT_DETECTED, fault="sdc", target=targets, detector=f"sdc-{finding.layer}", detail={**detail, "undetermined": True})
            log.error("sdc: %s: ranks %s disagree and no majority names one; rolling back without quarantine", what, list(finding.suspects))

    def _quarantine(self, reason: str) -> None:
        """Ask the node's healthd to take this node out (unhealthy → STOP, marker for the launcher)."""
        if self.client is None:
            log.error("no healthd attached: take rank %d's device out of service by hand (%s)", self.rank, reason)
            return
        try:
            token = read_token(None)  # $STALWART_TOKEN_FILE, exported by the launcher
        except TokenError as e:
            log.error("cannot ask healthd to quarantine rank %d (%s): %s", self.rank, reason, e)
            return
        self.client.quarantine("sdc", reason, token)

    def _record_verified(self) -> None:
        """Rank 0: mark verified the committed steps a passing check covered; once no save is in flight."""
        t, v = self.trainer, self.verification
        if not v.to_mark or t.checkpoints is None or not t.env.is_main or not t.checkpoints.poll():
            return
        committed = set(t.checkpoints.committed_steps())
        for step in v.to_mark:
            if step in committed:
                t.checkpoints.mark_verified(step)
        v.to_mark.clear()

    # -------------------------------------------------------------------------- replay

    def _replay(self, microbatches: list[tuple[torch.Tensor, torch.Tensor]], local_loss: torch.Tensor, grad_norm: float) -> ReplayOutcome:
        """Recompute the step from the same (not yet updated) state: here, and on a dp neighbour.

        Every rank runs the same passes (they are collectives under FSDP/DDP). Losses are compared
        per rank; the job-wide grad norm of the same-rank replay must match too.
        """
        t = self.trainer
        fb = t._pipeline_forward_backward if t.schedule else t._forward_backward
        t.zero_grad()
        replay_loss = fb(microbatches)
        replay_norm = t.clip_grad_norm(float("inf")).item()
        t.zero_grad()
        neighbour = self._neighbour_data(microbatches)
        other = fb(neighbour[0]).item() if neighbour is not None else float("nan")
        t.zero_grad()
        owner = neighbour[1] if neighbour is not None else -1
        row = torch.tensor([local_loss.item(), replay_loss.item(), other, owner], dtype=torch.float64)
        rows = all_gather_rows(row) if self.world_size > 1 else [row]
        original = [r[0].item() for r in rows]
        same = [r[1].item() for r in rows]
        others: list[float | None] = [None] * len(rows)
        for r in rows:
            if r[3] >= 0:
                others[int(r[3])] = r[2].item()
        outcome = replay_verdict(original, same, others if neighbour is not None else None, rtol=REPLAY_RTOL)
        if outcome.verdict == Verdict.BAD_DATA and not close_enough(grad_norm, replay_norm, REPLAY_RTOL):
            return ReplayOutcome(Verdict.BAD_HARDWARE, (), f"the replayed grad norm {replay_norm:.6g} differs from {grad_norm:.6g}")
        return outcome

    def _neighbour_data(self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int] | None:
        """The microbatches of the next data-parallel rank, and that rank's global id (None without DP or with PP)."""
        t = self.trainer
        if t.mesh is None or t.dims.dp == 1 or t.schedule is not None:
            return None
        group = t.mesh["dp"].get_group()
        ranks = dist.get_process_group_ranks(group)
        me = ranks.index(self.rank)
        stacked = torch.stack([torch.stack([x, y]) for x, y in microbatches])
        gathered = all_gather_rows(stacked, group)
        nxt = (me + 1) % len(ranks)
        return [(mb[0], mb[1]) for mb in gathered[nxt]], ranks[nxt]

    def _on_anomaly(self, reason: str, outcome: ReplayOutcome) -> None:
        t = self.trainer
        step = t.step
        if outcome.verdict == Verdict.BAD_DATA:
            if t.env.is_main:
                t.events.emit(EventKind.FAULT_DETECTED, fault="bad_data", target=f"step{step}", detector="replay",
                              detail={"reason": reason, "verdict": outcome.verdict.value, "detail": outcome.detail, "samples_from": t.loader.position - t.loader.global_batch_size})
                print(f"step {step}: {reason}; replay reproduced it: bad data, update skipped", flush=True)
            return
        if t.env.is_main:
            print(f"step {step}: {reason}; replay points at hardware ({outcome.detail}); update skipped, checking replicas", flush=True)
        if outcome.ranks:  # a rank that cannot reproduce its own step names itself
            self._report(step, SdcFinding("replay", faulty=outcome.ranks), f"replay of step {step} ({reason}: {outcome.detail})")
        self._replayed = outcome  # after_step runs the fingerprint and golden checks at once


def _job_flags(world_size: int, group_ranks: list[int], vote: Vote) -> list[int]:
    """Per global rank: 2 faulty, 1 suspect, 0 fine; merged over every replica group (all-reduce MAX)."""
    flags = torch.zeros(world_size, dtype=torch.int32)
    for i in vote.odd:
        flags[group_ranks[i]] = 1 if vote.undetermined else 2
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()
