"""The trainer-side health components, one process each, with small fakes for what they are given."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import pytest
import torch

from stalwart.health.anomaly import AnomalyGuard
from stalwart.health.ledger import VerificationLedger
from stalwart.health.sdc import Verdict, fingerprint, flip_bit, golden_workload
from stalwart.health.sdc_monitor import FindingReporter, SdcFinding, SdcMonitor
from stalwart.runtime.config import HealthConfig
from stalwart.runtime.health import StepAction, StepHealth

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ anomaly guard


class FakeSteps:
    """A 'model' whose loss of a batch is its first label; ``flaky`` changes the next recomputation."""

    def __init__(self, neighbour: bool = True) -> None:
        self.calls: list[str] = []
        self.flaky = 0.0
        self.norm = 3.0
        self.neighbour = neighbour

    def forward_backward(self, batch):
        self.calls.append("fb")
        value, self.flaky = float(batch[0][1][0]) + self.flaky, 0.0
        return torch.tensor(value)

    def unclipped_grad_norm(self) -> float:
        self.calls.append("norm")
        return self.norm

    def zero_grad(self) -> None:
        self.calls.append("zero")

    def neighbour_batch(self, batch):
        return (batch, 0) if self.neighbour else None  # one rank: its own neighbour


def one_rank(row: torch.Tensor) -> list[torch.Tensor]:
    return [row]


def batch_of(loss: float):
    return [(torch.zeros(1, 4, dtype=torch.long), torch.full((4,), loss))]


def test_guard_accepts_normal_steps_without_any_recomputation():
    steps = FakeSteps()
    guard = AnomalyGuard(steps, one_rank, spike_factor=10.0)
    for i in range(20):
        assert guard.check(batch_of(2.0), torch.tensor(2.0), loss=2.0 - 0.01 * i, grad_norm=3.0) is None
    assert steps.calls == []


def test_a_reproducible_spike_is_bad_data():
    steps = FakeSteps()
    guard = AnomalyGuard(steps, one_rank, spike_factor=10.0)
    for _ in range(12):
        assert guard.check(batch_of(2.0), torch.tensor(2.0), loss=2.0, grad_norm=3.0) is None
    found = guard.check(batch_of(50.0), torch.tensor(50.0), loss=50.0, grad_norm=3.0)
    assert found is not None and found.bad_data and "loss spike" in found.reason
    assert steps.calls.count("fb") == 2 and steps.calls[-1] == "zero"  # here and on the neighbour, gradients cleared


def test_a_non_finite_loss_that_does_not_reproduce_is_bad_hardware_naming_the_rank():
    steps = FakeSteps()
    guard = AnomalyGuard(steps, one_rank)
    steps.flaky = 1.0  # the recomputation on this rank gives another value
    found = guard.check(batch_of(2.0), torch.tensor(2.0), loss=math.nan, grad_norm=3.0)
    assert found is not None and not found.bad_data
    assert found.outcome.verdict == Verdict.BAD_HARDWARE and found.outcome.ranks == (0,)
    assert "non-finite loss" in found.reason


def test_a_different_replayed_grad_norm_is_bad_hardware_too():
    steps = FakeSteps(neighbour=False)
    guard = AnomalyGuard(steps, one_rank)
    steps.norm = 4.0  # the same loss, another gradient
    found = guard.check(batch_of(2.0), torch.tensor(2.0), loss=math.inf, grad_norm=3.0)
    assert found.outcome.verdict == Verdict.BAD_HARDWARE and "grad norm" in found.outcome.detail


# ------------------------------------------------------------------------------- SDC monitor


@dataclass
class FakeCollectives:
    """Rank ``me`` of ``world_size`` ranks, all in one replica group; ``others`` are the other ranks' rows."""

    world_size: int
    me: int = 0
    others: dict[int, torch.Tensor] = field(default_factory=dict)
    world_rows: dict[int, torch.Tensor] = field(default_factory=dict)

    def gather_replicas(self, row):
        return [row if r == self.me else self.others.get(r, row) for r in range(self.world_size)]

    def gather_world(self, row):
        return [row if r == self.me else self.world_rows.get(r, row) for r in range(self.world_size)]

    def replica_ranks(self):
        return list(range(self.world_size))

    def max_world(self, flags):
        return flags


def params() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("w1", torch.randn(64, generator=g)), ("w2", torch.randn(8, 8, generator=g))]


def monitor(comm: FakeCollectives, fingerprint_every: int = 5, golden_every: int = 0, named=params) -> SdcMonitor:
    return SdcMonitor(
        lambda: named(), comm, CPU, replicas=True, fingerprint_every=fingerprint_every, golden_every=golden_every
    )


def test_fingerprints_that_agree_pass_and_the_odd_replica_is_named_by_majority():
    clean = fingerprint(t for _, t in params())
    assert monitor(FakeCollectives(3, others={1: clean, 2: clean})).check(5) is None
    corrupted = [t.clone() for _, t in params()]
    flip_bit(corrupted[1], 10, 30)
    odd = fingerprint(corrupted)
    finding = monitor(FakeCollectives(3, others={1: clean, 2: odd})).check(5)
    assert finding == SdcFinding("fingerprint", faulty=(2,), params=("w2",))


def test_two_replicas_cannot_outvote_each_other_and_the_golden_workload_decides():
    corrupted = [t.clone() for _, t in params()]
    flip_bit(corrupted[0], 3, 1)
    comm = FakeCollectives(2, others={1: fingerprint(corrupted)})
    assert monitor(comm).check(5) == SdcFinding("fingerprint", suspects=(0, 1), params=("w1",))
    # Only a replica whose golden result changed since its first run is named.
    golden = golden_workload(CPU)
    mon = monitor(comm, golden_every=100)
    mon.golden_reference = golden
    comm.world_rows = {1: torch.cat([golden.flatten() + 1, torch.tensor([1])])}
    assert mon.check(5) == SdcFinding("fingerprint+golden", faulty=(1,), params=("w1",))


def test_checks_run_when_due_and_all_at_once_when_forced():
    calls = []
    mon = monitor(FakeCollectives(3), fingerprint_every=5, golden_every=7, named=lambda: calls.append(1) or params())
    assert [s for s in range(1, 15) if mon.due(s)] == [5, 7, 10, 14]
    assert mon.check(3) is None and calls == []
    assert mon.check(3, force=True) is None and calls == [1]
    no_replicas = SdcMonitor(params, FakeCollectives(1), CPU, replicas=False, fingerprint_every=5, golden_every=0)
    assert not no_replicas.due(5)


# --------------------------------------------------------------------------------- the ledger


@dataclass
class FakeStore:
    committed: list[int] = field(default_factory=list)
    in_flight: bool = False
    marked: list[int] = field(default_factory=list)

    def poll(self) -> bool:
        return not self.in_flight

    def committed_steps(self) -> list[int]:
        return self.committed

    def mark_verified(self, step: int) -> None:
        self.marked.append(step)


def test_a_save_right_after_a_passing_check_is_verified_and_others_wait_for_the_next_check():
    store = FakeStore()
    ledger = VerificationLedger(store)
    ledger.passed(10)
    assert ledger.saving(10) is True
    assert ledger.saving(12) is False and ledger.saving(14) is False
    ledger.passed(15)
    store.in_flight = True
    assert ledger.record() == []  # the commit of 14 may still be pending
    store.in_flight, store.committed = False, [10, 12]
    assert ledger.record() == [12] and store.marked == [12]  # 14 never committed: nothing to mark
    assert ledger.record() == []


def test_rollback_drops_newer_saves_and_only_rank_0_writes():
    store = FakeStore(committed=[2, 4])
    ledger = VerificationLedger(store, writer=False)
    ledger.saving(2)
    ledger.saving(4)
    ledger.rolled_back(2)
    assert ledger.unverified == [2] and ledger.clean_at == 2
    ledger.passed(3)
    assert ledger.record() == [] and store.marked == []
    off = VerificationLedger(store, enabled=False)
    assert off.saving(4) is False and off.unverified == []


# ---------------------------------------------------------------------- reporting and wiring


@dataclass
class FakeEvents:
    emitted: list[tuple[str, dict]] = field(default_factory=list)
    flushes: int = 0

    def emit(self, kind, **fields):
        self.emitted.append((str(getattr(kind, "value", kind)), fields))

    def flush(self):
        self.flushes += 1


def test_a_faulty_rank_reports_itself_and_asks_for_quarantine_suspects_are_reported_once():
    events, asked = FakeEvents(), []
    FindingReporter(events, 2, {"node": "n1"}, is_main=False, quarantine=asked.append).report(
        7, SdcFinding("golden", faulty=(2,)), "x"
    )
    assert (
        events.emitted[0][0] == "fault_detected" and events.emitted[0][1]["target"] == "rank2" and events.flushes == 1
    )
    assert asked == ["sdc: x"]
    elsewhere = FakeEvents()
    FindingReporter(elsewhere, 1, {}, is_main=False).report(7, SdcFinding("golden", faulty=(2,)), "x")
    assert elsewhere.emitted == []
    suspects = FakeEvents()
    FindingReporter(suspects, 0, {}, is_main=True).report(7, SdcFinding("fingerprint", suspects=(0, 1)), "x")
    assert suspects.emitted[0][1]["target"] == "rank0,rank1" and suspects.emitted[0][1]["detail"]["undetermined"]


class FakeCheckpoints:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def settle(self) -> None:
        self.calls.append(("settle",))

    def rollback(self, *, reason: str, from_step: int, to: int | str = "latest-verified") -> int:
        self.calls.append(("rollback", to, from_step))
        return 4


class FakeMonitor:
    golden_every = 0

    def __init__(self, finding: SdcFinding | None) -> None:
        self.finding, self.checked = finding, []

    def due(self, step: int) -> bool:
        return step % 5 == 0

    def check(self, step: int, force: bool = False):
        self.checked.append((step, force))
        return self.finding


def step_health(finding: SdcFinding | None, **cfg) -> tuple[StepHealth, FakeCheckpoints, VerificationLedger]:
    checkpoints, store = FakeCheckpoints(), FakeStore(committed=[4])
    ledger = VerificationLedger(store)
    health = StepHealth(
        HealthConfig(**cfg),
        rank=0,
        is_main=True,
        events=FakeEvents(),
        monitor=FakeMonitor(finding),
        reporter=FindingReporter(FakeEvents(), 0, {}, is_main=True),
        ledger=ledger,
        checkpoints=checkpoints,
    )
    return health, checkpoints, ledger


def test_after_step_checks_when_due_and_rolls_back_on_a_finding(capsys):
    health, checkpoints, ledger = step_health(SdcFinding("fingerprint", faulty=(1,)))
    assert health.after_step(4, 0.1) == StepAction.CONTINUE and health.monitor.checked == []
    assert health.after_step(5, 0.1) == StepAction.ROLLED_BACK
    assert checkpoints.calls == [("settle",), ("rollback", "latest-verified", 5)] and ledger.clean_at == 4
    assert "rollback: step 5 -> verified step 4" in capsys.readouterr().out
    health, checkpoints, ledger = step_health(None)
    assert health.after_step(5, 0.1) == StepAction.CONTINUE and ledger.clean_at == 5 and checkpoints.calls == []


def test_no_rollback_without_checkpoints_or_when_turned_off():
    health, checkpoints, _ = step_health(SdcFinding("golden", faulty=(0,)), rollback_on_sdc=False)
    assert health.after_step(5, 0.1) == StepAction.CONTINUE and checkpoints.calls == []
    health, _, _ = step_health(SdcFinding("golden", faulty=(0,)))
    health.checkpoints = None
    with pytest.raises(RuntimeError, match="checkpoints are disabled"):
        health.after_step(5, 0.1)


def test_checkpoint_phase_yields_whether_the_state_is_verified():
    health, _, ledger = step_health(None)
    health.after_step(5, 0.1)
    with health.checkpoint_phase(5) as verified:
        assert verified is True
    with health.checkpoint_phase(6) as verified:
        assert verified is False
    assert ledger.unverified == [6]
    assert not health.stop_requested
    with contextlib.suppress(RuntimeError):
        health.start(6)  # no golden workload configured in the fake monitor: nothing to raise


# ---------------------------------------------------------------------------- non-finite state


def test_a_nan_that_every_batch_reproduces_because_the_parameters_are_nan_is_a_bad_state_not_bad_data():
    steps = FakeSteps()
    steps.norm = math.nan  # the replay reproduces the NaN grad norm too
    weights = [torch.ones(4), torch.ones(3)]
    guard = AnomalyGuard(steps, one_rank, parameters=lambda: weights)
    found = guard.check(batch_of(math.nan), torch.tensor(math.nan), loss=math.nan, grad_norm=math.nan)
    assert found.bad_data and found.state_finite is True  # finite weights: the data is bad, the batch dropped
    weights[1][2] = math.inf
    found = guard.check(batch_of(math.nan), torch.tensor(math.nan), loss=math.nan, grad_norm=math.nan)
    assert found.bad_state and not found.bad_data and found.state_finite is False and found.outcome.ranks == (0,)


def test_the_fingerprint_pass_counts_nonfinite_parameters_and_reports_a_bad_state():
    from stalwart.health.sdc import fingerprint_and_nonfinite

    named = params()
    rows, bad = fingerprint_and_nonfinite(t for _, t in named)
    assert bad == 0 and torch.equal(rows, fingerprint(t for _, t in named))
    named[1][1][3, 4] = math.nan
    named[0][1][7] = -math.inf
    assert fingerprint_and_nonfinite(t for _, t in named)[1] == 2
    same = monitor(FakeCollectives(2, others={1: fingerprint(t for _, t in named)}), named=lambda: named)
    assert same.check(5) == SdcFinding("nonfinite")  # replicas that agree on NaN agree on a bad state
    assert not same.parameters_finite()


class NonFiniteCheckpoints(FakeCheckpoints):
    """Committed steps 2, 4, 6; loading one makes the state finite only if it is in ``finite``."""

    def __init__(self, finite: set[int], monitor: FakeMonitor) -> None:
        super().__init__()
        self.finite, self.monitor = finite, monitor

    def committed_steps(self) -> list[int]:
        return [2, 4, 6]

    def rollback(self, *, reason: str, from_step: int, to: int | str = "latest-verified") -> int:
        self.calls.append(("rollback", to, from_step))
        self.monitor.finite = to in self.finite
        return to


def test_a_bad_state_rolls_back_to_the_newest_commit_that_is_finite_and_stops_when_none_is():
    from stalwart.health.anomaly import Anomaly, NonFiniteState
    from stalwart.health.sdc import ReplayOutcome

    bad_state = Anomaly("non-finite loss (nan)", ReplayOutcome(Verdict.BAD_STATE, (0,), "nan weights"), False)
    health, _, _ = step_health(None)
    health.monitor.parameters_finite = lambda: health.monitor.finite
    health.checkpoints = checkpoints = NonFiniteCheckpoints({2}, health.monitor)
    assert health.after_step(7, 0.1, bad_state) == StepAction.ROLLED_BACK
    assert checkpoints.calls == [("settle",), ("rollback", 6, 7), ("rollback", 4, 7), ("rollback", 2, 7)]
    assert health.events.emitted[0][1]["fault"] == "nonfinite_state"
    checkpoints.finite = set()
    with pytest.raises(NonFiniteState, match="no committed step holds a finite state"):
        health.after_step(7, 0.1, bad_state)
    checkpoints.finite = {6}
    with pytest.raises(NonFiniteState, match="after 3 rollbacks"):
        for _ in range(3):
            health.after_step(7, 0.1, bad_state)
