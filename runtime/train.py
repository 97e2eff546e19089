"""The training loop: one process per rank, started by ``stalwart train`` / torchrun / the agent.

Start-up builds everything from the config in one pass (process group, mesh, data, model on the
meta device, parallelism, optimizer, checkpointer, health components); the loop then runs
optimizer steps of ``global_batch_size`` samples each and logs one line and one ``step_end`` event
per step. Each step: forward/backward (:class:`~stalwart.runtime.step.ModelStep`), clip, the one
job-wide sync (loss and flags), the anomaly guard, the update; then the health duties and the
checkpointer's cadence.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from stalwart.checkpoint.checkpointer import Checkpointer, SaveCadence, SaveMeta
from stalwart.checkpoint.manager import CheckpointError, CheckpointManager, LeaseLost, NoCheckpointError
from stalwart.checkpoint.memory_tier import MemoryTier, default_memory_dir
from stalwart.checkpoint.preemption import grace_deadline
from stalwart.checkpoint.storage import s3_storage_options
from stalwart.events import EventKind, EventLog
from stalwart.health.anomaly import Anomaly, AnomalyGuard, NonFiniteState
from stalwart.health.ledger import VerificationLedger
from stalwart.health.rollback import ROLLBACK_FILE, mark_applied, pending_rollback
from stalwart.health.sdc_monitor import FindingReporter, SdcMonitor
from stalwart.jobenv import node_name
from stalwart.model.args import ModelArgs
from stalwart.model.flops import mfu
from stalwart.model.hf import hf_config_from_args
from stalwart.model.llama import Transformer
from stalwart.parallel.loss import cross_entropy_loss
from stalwart.parallel.parallelize import parallelize_model
from stalwart.parallel.pipeline import build_pipeline_stages, build_schedule, stage_roles
from stalwart.parallel.process_group import backend_for, destroy_distributed, init_distributed
from stalwart.parallel.reform import JobStore, group_roots
from stalwart.runtime.config import Config
from stalwart.runtime.data.dataset import PackedDataset
from stalwart.runtime.data.loader import GlobalBatchLoader
from stalwart.runtime.faults.injector import FaultInjector
from stalwart.runtime.health import (
    NodeUnhealthy,
    ProcessGroupCollectives,
    StepAction,
    StepHealth,
    connect_controller,
    connect_healthd,
    quarantine_through,
)
from stalwart.runtime.metrics import StepMetrics, memory_bytes, peak_flops
from stalwart.runtime.optim import OptimizersContainer
from stalwart.runtime.plan import plan_job
from stalwart.runtime.recovery import (
    EXIT_WORLD_RESTART,
    Completed,
    InProcessRecovery,
    ReformError,
    is_peer_failure,
    replaced_generation,
)
from stalwart.runtime.step import Batch, ModelStep, sync_job
from stalwart.runtime.train_state import StepCounter, load_local_state, local_state, train_state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(args: ModelArgs, device: torch.device, seed: int) -> Transformer:
    """Meta-device construction, then materialise and initialise identically on every rank.

    Every rank draws the same initial weights from the same seed, so sharding afterwards gives
    exactly the single-process model (the parity tests depend on this).
    """
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(seed=seed)
    return model


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    stop: bool = False
    preempted: bool = False
    anomaly: Anomaly | None = None  # the guard held the update back


def state_known_finite(result: StepResult) -> bool:
    """The pre-commit check, from what the step already computed (no pass over the weights).

    A finite job-wide loss and grad norm, with a clip norm that config validation holds positive
    (and not NaN), make a finite update; a step the guard held back had its parameters checked by the
    replay. (The fingerprint pass, when due at this step, counted NaN/Inf parameters too: a finding
    rolled back before this point.)
    """
    if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
        return True
    return result.anomaly is not None and result.anomaly.state_finite is True


class PreemptionFlag:
    """SIGTERM (preemption, a scheduler's stop) sets it: the step finishes, the job saves and exits cleanly.

    The event log is flushed at once: a SIGKILL may follow the grace period.
    """

    def __init__(self, events: EventLog | None = None) -> None:
        self.at: float | None = None  # time.monotonic() of the signal: the grace period starts there
        self.events = events
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.at = self.at or time.monotonic()
        if self.events is not None:
            self.events.flush_soon()

    @property
    def raised(self) -> bool:
        return self.at is not None


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t0 = time.time()
        # Under a launcher with a job store, the world forms on a store prefix that outlives every
        # rank, so that survivors can re-form in place; a replacement joins the survivors' generation.
        self.job_store = JobStore.from_env(cfg.recovery.reform_timeout_s) if cfg.recovery.in_process else None
        replacing = replaced_generation() if self.job_store is not None else None
        self.replacing = replacing is not None  # joins a running world in a lost rank's place
        generation = 0 if replacing is None else self.job_store.wait_past(replacing, cfg.recovery.reform_timeout_s)
        store = self.job_store.prefix(generation) if self.job_store is not None else None
        # A replacement waits no longer than a recovery may take: past that, the launcher restarts the world.
        timeout = cfg.recovery.reform_timeout_s if replacing is not None else 300.0
        self.env = init_distributed(cfg.training.device, timeout_s=timeout, store=store)
        plan = plan_job(cfg, self.env.world_size)
        self.dims, self.tokenizer, self.model_args = plan.dims, plan.tokenizer, plan.model_args
        self.events = EventLog(cfg.run_dir, role="trainer", rank=self.env.rank)
        self.faults = FaultInjector.from_env(cfg.run_dir, self.env.rank, self.env.local_rank, self.events)
        self.heartbeat = connect_healthd(cfg.health, cfg.run_dir, self.env.rank, self.env.local_rank)  # covers start-up
        if self.env.is_main and replacing is None:
            self.events.emit(EventKind.JOB_START, config=cfg.to_dict(), steps=cfg.training.steps)
        self._set_threads()
        seed_everything(cfg.job.seed)
        self.mesh = self.dims.build_mesh(self.env.device.type) if self.env.world_size > 1 else None
        self.events.emit(
            EventKind.WORKER_START, world_size=self.env.world_size, layout=self.dims.as_dict(), node_id=node_name()
        )

        self.loader = self._build_loader()
        self.model_step = self._build_model_step()
        self.model_parts = self.model_step.parts
        self.optimizers = OptimizersContainer(self.model_parts, cfg.training, self.env.device)
        self.counter = StepCounter()
        self.state = train_state(self.model_parts, self.optimizers, self.counter, self.loader)
        self.checkpointer = self._build_checkpointer()
        replica_group = (
            self.mesh["dp_replicate"].get_group() if self.mesh is not None and self.dims.dp_replicate > 1 else None
        )
        collectives = ProcessGroupCollectives(self.env.world_size, replica_group)
        self.health = self._build_health(collectives)
        self.guard = AnomalyGuard(
            self.model_step, collectives.gather_world, cfg.health.spike_factor, parameters=self.model_step.parameters
        )
        self.preempted = False
        self.history: list[StepResult] = []
        self.peak_flops = peak_flops(self.env.device, cfg.logging.peak_tflops)
        self.recovery = self._build_recovery(generation, collectives)
        if replacing is not None and self.recovery is not None:
            self.recovery.join_as_replacement()  # the state of a peer holding the same shard
        elif self.checkpointer is not None and cfg.checkpoint.resume != "none":
            self._load_committed(self.cfg.checkpoint.resume)
        self.health.start(self.step, startup_check=replacing is None)
        self._completed()
        self.events.emit(EventKind.INIT_DONE, seconds=time.time() - t0, replacement=replacing is not None)

    @property
    def step(self) -> int:
        return self.counter.step

    @step.setter
    def step(self, value: int) -> None:
        self.counter.step = value

    # ------------------------------------------------------------------------------- the loop

    def run(self) -> None:
        cfg, status, preemption = self.cfg, "failed", PreemptionFlag(self.events)
        try:
            while self.step < cfg.training.steps:
                try:
                    if self._one_step(preemption):
                        status = "preempted"
                        return
                except NodeUnhealthy:
                    status = "stopped_by_healthd"
                    raise
                except Exception as error:  # a lost peer: re-form in place, or re-raise
                    self._recover(error)
            if self.checkpointer:
                self.checkpointer.finished()
            status = "ok"
        except LeaseLost:
            status = "fenced"  # another job took the run over: this one stops without committing
            raise
        except NonFiniteState:
            status = "nonfinite"  # no finite state to continue from: stop, never commit NaN
            raise
        finally:
            # A preemption's stop says when the signal came: the planned incident starts there.
            signalled = {"signalled_ts": time.time() - (time.monotonic() - preemption.at)} if preemption.at else {}
            self.events.emit(EventKind.WORKER_STOP, reason=status, **signalled)
            if self.env.is_main:
                self.events.emit(EventKind.JOB_END, status=status, steps=self.step)
            self.events.close()

    def _one_step(self, preemption: PreemptionFlag) -> bool:
        """One optimizer step and what follows it; True when the job was preempted and must stop."""
        cfg = self.cfg
        self.step += 1
        t0 = time.perf_counter()
        self.events.emit(EventKind.STEP_BEGIN, step=self.step)
        if self.faults:
            self.faults.before_step(self.step, self.model_step.parameters, self._newest_local_checkpoint)
        batch = self.loader.next_step()
        data_seconds, lr = time.perf_counter() - t0, self.optimizers.lr
        result = self.train_step(batch, stop=self.health.stop_requested, preempted=preemption.raised)
        self._completed()
        step_seconds = time.perf_counter() - t0
        self._log_step(result, lr, step_seconds, data_seconds)
        if result.preempted:
            # Only a rank that got the signal itself was preempted; the others stop with it (the job
            # agrees job-wide) and their agents must re-form, not take it for the end of training.
            self.preempted = preemption.raised
            self._save_on_preemption(preemption.at or time.monotonic())
            return True
        if result.stop:
            raise NodeUnhealthy(
                f"healthd marked this job's node unhealthy; stopped after step {self.step} (see RUN/health/)"
            )
        if self.health.after_step(self.step, step_seconds, result.anomaly) == StepAction.ROLLED_BACK:
            self._completed()
            return False
        if not state_known_finite(result):  # never reached past the guard; never commit it if it were
            raise NonFiniteState(f"step {self.step}: the state is not known finite; not committing it")
        if (
            self.checkpointer
            and self.checkpointer.maybe_save(self.step, last=self.step == cfg.training.steps)
            and self.faults
        ):
            self.faults.after_save_started(self.step)
        return False

    def train_step(self, batch: Batch, *, stop: bool = False, preempted: bool = False) -> StepResult:
        """Forward/backward, clip, one job-wide sync, the anomaly guard, the update (loss: the job's token mean)."""
        local_loss = self.model_step.forward_backward(batch)
        grad_norm = self.model_step.clip(self.cfg.training.max_grad_norm)
        job = sync_job(local_loss, grad_norm, stop=stop, preempted=preempted, pp=self.dims.pp)
        anomaly = self.guard.check(batch, local_loss, job.loss, job.grad_norm)
        self.optimizers.step(apply_update=anomaly is None)
        self.optimizers.zero_grad()
        return StepResult(job.loss, job.grad_norm, job.stop, job.preempted, anomaly)

    def _log_step(self, result: StepResult, lr: float, step_seconds: float, data_seconds: float) -> None:
        cfg = self.cfg
        tokens = cfg.training.global_batch_size * cfg.data.seq_len
        metrics = StepMetrics(
            step=self.step,
            total_steps=cfg.training.steps,
            loss=result.loss,
            grad_norm=result.grad_norm,
            lr=lr,
            step_seconds=step_seconds,
            data_seconds=data_seconds,
            tokens=tokens,
            world_size=self.env.world_size,
            mfu=self._mfu(tokens / step_seconds),
            memory=memory_bytes(self.env.device),
        )
        self.history.append(result)
        self.events.emit(EventKind.STEP_END, **metrics.event_fields())
        if self.env.is_main and (self.step % cfg.logging.log_every == 0 or self.step == cfg.training.steps):
            print(metrics.line(), flush=True)

    # ---------------------------------------------------------------------------- start-up

    def _set_threads(self) -> None:
        if self.env.device.type != "cpu":
            return
        per_rank = self.cfg.training.threads_per_rank or max(1, (os.cpu_count() or 1) // self.env.local_world_size)
        torch.set_num_threads(per_rank)

    def _compute_dtype(self) -> torch.dtype:
        dtype = self.cfg.training.dtype
        if dtype == "auto":
            return torch.bfloat16 if self.env.device.type == "cuda" else torch.float32
        return getattr(torch, dtype)

    def _build_loader(self) -> GlobalBatchLoader:
        d = self.cfg.data
        dataset = PackedDataset.from_source(
            source=d.source,
            path=d.path or None,
            tokenizer=self.tokenizer,
            seq_len=d.seq_len,
            jsonl_field=d.jsonl_field,
            max_tokens=d.max_tokens or None,
            cache_dir=self.cfg.run_dir / "cache",
        )
        dp_rank, dp_size = (
            (self.mesh["dp"].get_local_rank(), self.mesh["dp"].size()) if self.mesh is not None else (0, 1)
        )
        return GlobalBatchLoader(
            dataset,
            global_batch_size=self.cfg.training.global_batch_size,
            microbatch_size=self.cfg.training.microbatch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=self.cfg.job.seed,
            shuffle=d.shuffle,
        )

    def _build_model_step(self) -> ModelStep:
        """The model, or with PP this rank's stage modules and the schedule that drives them."""
        dims, mesh, t, dtype = self.dims, self.mesh, self.cfg.training, self._compute_dtype()
        model = build_model(self.model_args, self.env.device, self.cfg.job.seed)
        memory_and_speed = dict(
            activation_checkpoint=t.activation_checkpoint,
            activation_checkpoint_every=t.activation_checkpoint_every,
            compile_backend=t.compile_backend if t.compile else None,
        )
        if dims.pp == 1:
            part = parallelize_model(model, dims, mesh, dtype, self.cfg.data.seq_len, **memory_and_speed)
            return ModelStep([part], dims, mesh, self.env.device, dtype)
        p = self.cfg.parallel
        stages, parts = build_pipeline_stages(
            model,
            mesh["pp"],
            p.pp_schedule,
            self.env.device,
            parallelize_fn=lambda part: parallelize_model(
                part, dims, mesh, dtype, self.cfg.data.seq_len, for_pipeline=True, **memory_and_speed
            ),
        )
        schedule = build_schedule(stages, p.pp_microbatches or dims.pp, cross_entropy_loss, p.pp_schedule)
        return ModelStep(parts, dims, mesh, self.env.device, dtype, schedule, stage_roles(stages))

    def _build_checkpointer(self) -> Checkpointer | None:
        c = self.cfg.checkpoint
        if not c.enabled:
            return None
        memory = None
        if c.memory_interval > 0:
            fingerprint = f"{self.env.world_size}:{sorted(self.dims.as_dict().items())}:{self.cfg.layout_hash()}"
            memory = MemoryTier(c.memory_dir or default_memory_dir(self.cfg.run_dir), fingerprint, events=self.events)
        manager = CheckpointManager(
            self.cfg.checkpoint_url,
            s3_storage_options(c.s3_endpoint, c.s3_max_attempts),
            keep_last=c.keep_last,
            keep_every=c.keep_every,
            events=self.events,
            memory=memory,
            lease_ttl_s=c.lease_ttl_s,
            joining=self.replacing,
            # On GPU hosts async saves stage into one pinned copy reused across saves: the blocking
            # part is then a device-to-host copy at PCIe speed (a pageable copy per save is far slower).
            cache_staging=self.env.device.type == "cuda",
        )
        meta = SaveMeta(
            self.dims.as_dict(), self.cfg.layout_hash(), hf_config_from_args(self.model_args), self.tokenizer.identity
        )
        # on_save is the health side's checkpoint phase; bound once the health components exist.
        return Checkpointer(manager, self.state, SaveCadence(c.interval, c.memory_interval, c.mode == "async"), meta)

    def _build_health(self, collectives: ProcessGroupCollectives) -> StepHealth:
        h, env = self.cfg.health, self.env
        replicas = collectives.replica_group is not None
        if not replicas and h.fingerprint_every and env.is_main:
            print(
                "sdc: no data-parallel replicas (dp_replicate = 1): parameter fingerprints are off; "
                "golden workload and anomaly replay stay on",
                flush=True,
            )
        monitor = SdcMonitor(
            self.model_step.named_parameters,
            collectives,
            env.device,
            replicas=replicas,
            fingerprint_every=h.fingerprint_every,
            golden_every=h.golden_every,
        )
        where = {"node": os.environ.get("GROUP_RANK", "0"), "local_rank": env.local_rank, "device": str(env.device)}
        reporter = FindingReporter(
            self.events, env.rank, where, is_main=env.is_main, quarantine=quarantine_through(self.heartbeat, env.rank)
        )
        manager = self.checkpointer.manager if self.checkpointer is not None else None
        ledger = VerificationLedger(manager, enabled=h.verify_checkpoints and manager is not None, writer=env.is_main)
        health = StepHealth(
            h,
            rank=env.rank,
            is_main=env.is_main,
            world_size=env.world_size,
            events=self.events,
            monitor=monitor,
            reporter=reporter,
            ledger=ledger,
            checkpoints=self.checkpointer,
            heartbeat=self.heartbeat,
            controller=connect_controller(),
        )
        if self.checkpointer is not None:
            self.checkpointer.on_save = health.checkpoint_phase
        return health

    def _load_committed(self, resume: str = "latest") -> int | None:
        """Load the step a controller's pending rollback order names, else ``resume``; collective.

        Start-up (``checkpoint.resume``) and an in-process recovery that restores from storage (the
        newest step) both come here, so that an order is carried out however the ranks come back, once.
        """
        order = pending_rollback(self.cfg.run_dir)
        if order is not None:
            try:
                step = self.checkpointer.rollback(
                    reason=f"controller order: {order.reason}",
                    from_step=None,
                    to=order.step,
                    verified_only=self.cfg.health.verify_checkpoints,
                    rollback_request=order.id,
                )
            except NoCheckpointError as e:
                raise CheckpointError(
                    f"the controller's rollback order to step {order.step} cannot be carried out: {e}; "
                    f"delete {self.cfg.run_dir / ROLLBACK_FILE} to resume from the newest step"
                ) from None
            if self.env.is_main:
                mark_applied(self.cfg.run_dir, order, step)
                print(f"rolled back to step {step} as the controller ordered ({order.reason})", flush=True)
            return step
        step = self.checkpointer.resume(resume)
        if step is not None and self.env.is_main:
            source = "host-memory tier" if self.checkpointer.last_load_tier == "memory" else self.cfg.checkpoint_url
            print(f"resumed from step {step} ({source})", flush=True)
        return step

    # ------------------------------------------------------------------ in-process recovery

    def _build_recovery(self, generation: int, collectives: ProcessGroupCollectives) -> InProcessRecovery | None:
        if self.job_store is None or self.env.world_size == 1:
            return None
        r, progress = self.cfg.recovery, self.state["progress"]
        extra = [self.mesh, self.model_step, self.checkpointer, collectives]
        return InProcessRecovery(
            self.job_store,
            rank=self.env.rank,
            world_size=self.env.world_size,
            backend=backend_for(self.env.device),
            generation=generation,
            pack_state=lambda: local_state(self.model_parts, self.optimizers, progress),
            unpack_state=lambda saved: load_local_state(self.model_parts, self.optimizers, progress, saved),
            events=self.events,
            create_groups=self._create_groups,
            group_roots=lambda: group_roots(self.model_parts, extra),
            shard=self._shard,
            abandon_step=self._abandon_step,
            restore_completed=self._restore_completed,
            load_committed=self._load_committed,
            checkpointer=self.checkpointer,
            heartbeat=self.heartbeat,
            max_reformations=r.max_reformations,
            timeout_s=r.reform_timeout_s,
            before_forming=self.faults.during_reform if self.faults else lambda step: None,
        )

    def _create_groups(self) -> None:
        """Every group beyond the default one, in start-up order (mesh, memory tier, checkpoints): same names."""
        if self.env.world_size > 1:
            self.dims.build_mesh(self.env.device.type)
        if self.checkpointer is not None:
            if self.checkpointer.manager.memory is not None:
                dist.new_group(backend="gloo")
            dist.new_group(backend="gloo")

    def _shard(self) -> tuple[int, ...]:
        """This rank's place in the layout without the replica dimension: equal values hold equal state."""
        if self.mesh is None:
            return ()
        coords = self.mesh.world.get_coordinate() or []
        return tuple(c for dim, c in zip(self.mesh.world.mesh_dim_names, coords, strict=True) if dim != "dp_replicate")

    def _completed(self) -> None:
        """The live state is a completed step: what a recovery returns to."""
        if self.recovery is not None:
            self.recovery.completed = Completed(self.step, self.loader.state_dict())

    def _abandon_step(self) -> None:
        self.model_step.abandon()

    def _restore_completed(self, completed: Completed) -> None:
        self.step = completed.step
        if completed.loader:
            self.loader.load_state_dict(completed.loader)

    def _recover(self, error: Exception) -> None:
        """Re-form in place after a lost peer; anything else, or a recovery that fails, propagates."""
        loading = self.checkpointer is not None and self.checkpointer.manager.is_loading
        if self.recovery is None or loading or not is_peer_failure(error):
            raise error
        try:
            self.recovery.recover(error, self.step)
        except ReformError as e:
            self.events.emit(EventKind.REFORM_FAILED, generation=self.recovery.generation, reason=str(e))
            self.events.close()
            print(
                f"rank {self.env.rank}: in-process recovery failed ({e}); the launcher restarts the world", flush=True
            )
            os._exit(EXIT_WORLD_RESTART)  # the old groups may be half torn down: no collective on the way out

    # ----------------------------------------------------------------------------- helpers

    def _mfu(self, job_tokens_per_second: float) -> float | None:
        """Per-device MFU; None where the peak is unknown (CPU)."""
        if not self.peak_flops:
            return None
        return mfu(job_tokens_per_second / self.env.world_size, self.model_args, self.cfg.data.seq_len, self.peak_flops)

    def _newest_local_checkpoint(self):  # noqa: ANN202 (Path | None; fault injection only)
        return self.checkpointer.newest_local_dir() if self.checkpointer is not None else None

    def _save_on_preemption(self, signalled_at: float) -> None:
        if self.checkpointer is None:
            return
        grace = self.cfg.checkpoint.preemption_grace_s
        with grace_deadline(signalled_at, grace, self.step, self.events, announce=self.env.is_main):
            self.checkpointer.save_or_raise(self.step, "the preempted step")
        if self.env.is_main:
            print(f"preempted: committed step {self.step} to {self.cfg.checkpoint_url}; exiting cleanly", flush=True)

    def close(self, destroy_group: bool = True) -> None:
        """Finish the in-flight save (collective), stop the health clients, leave the process group."""
        self.health.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        if destroy_group:
            destroy_distributed()


def train(cfg: Config) -> Trainer:
    """Run to the configured step (or a preemption); the finished trainer tells which (``step``, ``preempted``)."""
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer
