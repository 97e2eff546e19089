"""The training loop: one process per rank, started by ``stalwart train`` / torchrun / the agent.

Start-up builds everything from the config in one pass (process group, mesh, data, model on the
meta device, parallelism, optimizer); the loop then runs optimizer steps of ``global_batch_size``
samples each, accumulating microbatches, and logs one line and one ``step_end`` event per step.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from stalwart.checkpoint.manager import CheckpointManager, NoCheckpointError
from stalwart.checkpoint.memory_tier import MemoryTier, default_memory_dir
from stalwart.checkpoint.preemption import grace_deadline
from stalwart.checkpoint.storage import s3_storage_options
from stalwart.events import EventKind, EventLog
from stalwart.model.args import ModelArgs
from stalwart.model.flops import mfu
from stalwart.model.hf import hf_config_from_args
from stalwart.model.llama import Transformer
from stalwart.parallel.context_parallel import cp_shard
from stalwart.parallel.loss import cross_entropy_loss, loss_context
from stalwart.parallel.parallelize import parallelize_model
from stalwart.parallel.pipeline import (
    build_pipeline_stages,
    build_schedule,
    clip_grad_norm_pp,
    pipeline_step,
    stage_roles,
)
from stalwart.parallel.process_group import DistEnv, destroy_distributed, init_distributed
from stalwart.runtime.config import Config
from stalwart.runtime.data.dataset import PackedDataset
from stalwart.runtime.data.loader import GlobalBatchLoader
from stalwart.runtime.faults.injector import FaultInjector
from stalwart.runtime.health_hooks import NodeUnhealthy, StepAction, TrainerHealth
from stalwart.runtime.metrics import StepMetrics, memory_bytes, peak_flops
from stalwart.runtime.optim import build_lr_scheduler, build_optimizer
from stalwart.runtime.plan import plan_job
from stalwart.runtime.train_state import train_state


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


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t0 = time.time()
        self.env: DistEnv = init_distributed(cfg.training.device)
        plan = plan_job(cfg, self.env.world_size)
        self.dims, self.tokenizer, self.model_args = plan.dims, plan.tokenizer, plan.model_args
        self.events = EventLog(cfg.run_dir, role="trainer", rank=self.env.rank)
        self.faults = FaultInjector.from_env(cfg.run_dir, self.env.rank, self.env.local_rank, self.events)
        self.health = TrainerHealth(self)  # heartbeats from here on cover start-up
        if self.env.is_main:
            self.events.emit(EventKind.JOB_START, config=cfg.to_dict(), steps=cfg.training.steps)
        self._set_threads()
        seed_everything(cfg.job.seed)
        self.mesh = self.dims.build_mesh(self.env.device.type) if self.env.world_size > 1 else None
        self.events.emit(EventKind.WORKER_START, world_size=self.env.world_size, layout=self.dims.as_dict())

        self.loader = self._build_loader()
        self.compute_dtype = self._compute_dtype()
        self._build_model_parts()
        # One optimizer per model part: optimizer state dicts are keyed by the part's parameter
        # names, which is what lets a checkpoint reshard across pipeline layouts.
        self.optimizers = [build_optimizer(part.parameters(), cfg.training, self.env.device) for part in self.model_parts]
        self.schedulers = [build_lr_scheduler(opt, cfg.training) for opt in self.optimizers]
        self.step = 0
        self.preempted = False
        self.preempted_at: float | None = None  # time.monotonic() of the SIGTERM: the grace period starts there
        self.checkpoints = self._build_checkpoints()
        if self.checkpoints is not None and cfg.checkpoint.resume != "none":
            self._resume()
        self.history: list[StepResult] = []
        self.peak_flops = peak_flops(self.env.device, cfg.logging.peak_tflops)
        self.health.start()
        self.events.emit(EventKind.INIT_DONE, seconds=time.time() - t0)

    def _build_model_parts(self) -> None:
        """The model, or with PP this rank's stage modules and the schedule that drives them."""
        dims, mesh, dtype, t = self.dims, self.mesh, self.compute_dtype, self.cfg.training
        model = build_model(self.model_args, self.env.device, self.cfg.job.seed)
        memory_and_speed = dict(
            activation_checkpoint=t.activation_checkpoint,
            activation_checkpoint_every=t.activation_checkpoint_every,
            compile_backend=t.compile_backend if t.compile else None,
        )
        self.schedule = None
        self.has_last_stage = True
        if dims.pp == 1:
            self.model_parts = [parallelize_model(model, dims, mesh, dtype, self.cfg.data.seq_len, **memory_and_speed)]
            return
        p = self.cfg.parallel
        stages, self.model_parts = build_pipeline_stages(
            model, mesh["pp"], p.pp_schedule, self.env.device,
            parallelize_fn=lambda part: parallelize_model(
                part, dims, mesh, dtype, self.cfg.data.seq_len, for_pipeline=True, **memory_and_speed
            ),
        )
        self.schedule = build_schedule(stages, self.pp_microbatches, cross_entropy_loss, p.pp_schedule)
        self.has_first_stage, self.has_last_stage = stage_roles(stages)

    @property
    def pp_microbatches(self) -> int:
        return self.cfg.parallel.pp_microbatches or self.dims.pp

    @property
    def loss_parallel(self) -> bool:
        """Vocab-sharded logits under TP; a pipeline's last stage takes full logits instead."""
        return self.dims.tp > 1 and self.dims.pp == 1

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for part in self.model_parts for p in part.parameters()]

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
        if self.mesh is not None:
            dp_mesh = self.mesh["dp"]
            dp_rank, dp_size = dp_mesh.get_local_rank(), dp_mesh.size()
        else:
            dp_rank, dp_size = 0, 1
        return GlobalBatchLoader(
            dataset,
            global_batch_size=self.cfg.training.global_batch_size,
            microbatch_size=self.cfg.training.microbatch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=self.cfg.job.seed,
            shuffle=d.shuffle,
        )

    def _mean_over_job(self, value: torch.Tensor) -> float:
        """Average a per-rank scalar over the ranks that hold different data (dp × cp)."""
        if self.mesh is None:
            return value.item()
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG, group=self.mesh["dp_cp"].get_group())
        return value.item()

    def train_step(self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """Forward/backward the step's microbatches, clip, step. The loss is the mean over all tokens."""
        local_loss = self._pipeline_forward_backward(microbatches) if self.schedule else self._forward_backward(microbatches)
        grad_norm = self.clip_grad_norm(self.cfg.training.max_grad_norm).item()
        loss = self._mean_over_job(local_loss)
        apply_update = self.health.guard_step(microbatches, local_loss, loss, grad_norm)  # False: anomaly replayed, step dropped
        for opt, sched in zip(self.optimizers, self.schedulers):
            if apply_update:
                opt.step()
            sched.step()
        self.zero_grad()
        return StepResult(loss=loss, grad_norm=grad_norm)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients of every stage to ``max_norm``; returns their total norm (every rank)."""
        params = self.parameters()
        if self.schedule:
            return clip_grad_norm_pp(params, max_norm, self.mesh["pp"])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _forward_backward(self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Gradient accumulation over microbatches; gradients are reduced only on the last one."""
        (model,), device = self.model_parts, self.env.device
        n = len(microbatches)
        local_loss = torch.zeros((), device=device)
        for i, (inputs, labels) in enumerate(microbatches):
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(i == n - 1)
            inputs, labels = self._local_sequence(inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            with loss_context(self.loss_parallel):
                with self._autocast():
                    logits = model(inputs)
                loss = cross_entropy_loss(logits, labels) / n
                loss.backward()
            local_loss += loss.detach()
        return local_loss

    def _autocast(self) -> torch.autocast:
        """bf16 compute on CUDA; a no-op in fp32 (the CPU default)."""
        device = self.env.device
        return torch.autocast(device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    def _local_sequence(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's load-balanced sequence chunks under CP (chunks i and 2cp-1-i), else as is."""
        if self.dims.cp == 1:
            return inputs, labels
        inputs, labels = cp_shard([inputs, labels], self.mesh["cp"].get_local_rank(), self.dims.cp)
        return inputs, labels

    def _pipeline_forward_backward(self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One schedule run over this rank's whole local batch; the loss is known on the last stage.

        The other pipeline ranks contribute zero to a sum over the pp group, so afterwards every
        rank holds the last stage's loss.
        """
        device = self.env.device
        inputs, labels = self._local_sequence(
            torch.cat([x for x, _ in microbatches]).to(device), torch.cat([y for _, y in microbatches]).to(device)
        )
        with self._autocast():
            loss = pipeline_step(self.schedule, inputs, labels, self.has_first_stage, self.has_last_stage)
        local_loss = loss.detach() if loss is not None else torch.zeros((), device=device)
        dist.all_reduce(local_loss, op=dist.ReduceOp.SUM, group=self.mesh["pp"].get_group())
        return local_loss

    def _mfu(self, job_tokens_per_second: float) -> float | None:
        """Per-device MFU; None where the peak is unknown (CPU)."""
        if not self.peak_flops:
            return None
        return mfu(job_tokens_per_second / self.env.world_size, self.model_args, self.cfg.data.seq_len, self.peak_flops)

    def _build_checkpoints(self) -> CheckpointManager | None:
        c = self.cfg.checkpoint
        if not c.enabled:
            return None
        options = s3_storage_options(c.s3_endpoint, c.s3_max_attempts)
        memory = None
        if c.memory_interval > 0:
            fingerprint = f"{self.env.world_size}:{sorted(self.dims.as_dict().items())}:{self.cfg.layout_hash()}"
            memory = MemoryTier(c.memory_dir or default_memory_dir(self.cfg.run_dir), fingerprint, events=self.events)
        return CheckpointManager(
            self.cfg.checkpoint_url, options, keep_last=c.keep_last, keep_every=c.keep_every, events=self.events, memory=memory
        )

    def _resume(self) -> None:
        """Continue from the newest intact committed step; a fresh run when there is none."""
        try:
            step = self.checkpoints.load(train_state(self), step=self.cfg.checkpoint.resume)
        except NoCheckpointError:
            return
        if self.env.is_main:
            source = "host-memory tier" if self.checkpoints.last_load_tier == "memory" else self.cfg.checkpoint_url
            print(f"resumed from step {step} ({source})", flush=True)

    def save_checkpoint(self, sync: bool = False) -> None:
        """Async by default: training blocks only while the state is staged to host memory."""
        with self.health.checkpoint_phase(self.step) as verified:
            self.checkpoints.save(
                self.step,
                train_state(self),
                layout=self.dims.as_dict(),
                config_hash=self.cfg.layout_hash(),
                verified=verified,
                async_=self.cfg.checkpoint.mode == "async" and not sync,
                model=hf_config_from_args(self.model_args),
            )

    def rollback(self, reason: str, skip_data_steps: int = 0) -> int:
        """Restore the newest verified checkpoint into the live state (collective); returns its step."""
        return self.health.rollback(reason, skip_data_steps)

    def _newest_local_checkpoint(self) -> Path | None:
        """The newest committed step's directory when checkpoints are on local disk (fault injection)."""
        if self.checkpoints is None or "://" in self.cfg.checkpoint_url:
            return None
        step = self.checkpoints.latest()
        return None if step is None else Path(self.cfg.checkpoint_url) / self.checkpoints.step_dir(step)

    def _install_preemption_handler(self) -> None:
        """SIGTERM (preemption, scheduler stop): finish the step, save, exit cleanly."""
        import signal

        def on_sigterm(signum: int, frame: object) -> None:
            self.preempted_at = self.preempted_at or time.monotonic()
            self.preempted = True

        signal.signal(signal.SIGTERM, on_sigterm)

    def _job_preempted(self) -> bool:
        """Every rank must agree, or the ones that saw no signal would wait in the next step."""
        if self.mesh is None:
            return self.preempted
        flag = torch.tensor([1 if self.preempted else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # default group: never the one an async save uses
        return bool(flag.item())

    def run(self) -> None:
        cfg = self.cfg
        tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_len
        status = "failed"
        self._install_preemption_handler()
        try:
            while self.step < cfg.training.steps:
                self.step += 1
                t0 = time.perf_counter()
                self.events.emit(EventKind.STEP_BEGIN, step=self.step)
                if self.faults:
                    self.faults.before_step(self.step, self.parameters, self._newest_local_checkpoint)
                microbatches = self.loader.next_step()
                data_seconds = time.perf_counter() - t0
                lr = self.schedulers[0].get_last_lr()[0]
                result = self.train_step(microbatches)
                self.history.append(result)
                step_seconds = time.perf_counter() - t0
                metrics = StepMetrics(
                    step=self.step,
                    total_steps=cfg.training.steps,
                    loss=result.loss,
                    grad_norm=result.grad_norm,
                    lr=lr,
                    step_seconds=step_seconds,
                    data_seconds=data_seconds,
                    tokens=tokens_per_step,
                    world_size=self.env.world_size,
                    mfu=self._mfu(tokens_per_step / step_seconds),
                    memory=memory_bytes(self.env.device),
                )
                self.events.emit(EventKind.STEP_END, **metrics.event_fields())
                if self.env.is_main and (self.step % cfg.logging.log_every == 0 or self.step == cfg.training.steps):
                    print(metrics.line(), flush=True)
                if self._job_preempted():
                    self._save_on_preemption()
                    status = "preempted"
                    return
                action = self.health.after_step(step_seconds)  # SDC checks may roll back
                if action == StepAction.STOP:
                    status = "stopped_by_healthd"
                    raise NodeUnhealthy(f"healthd marked this job's node unhealthy; stopped after step {self.step} (see RUN/health/)")
                if action == StepAction.ROLLED_BACK:
                    continue
                if self.checkpoints and (self.step % cfg.checkpoint.interval == 0 or self.step == cfg.training.steps):
                    self.save_checkpoint(sync=self.step == cfg.training.steps)
                    if self.faults:
                        self.faults.after_save_started(self.step)
                elif self.checkpoints and self.checkpoints.memory and self.step % cfg.checkpoint.memory_interval == 0:
                    self.checkpoints.memory.save(self.step, train_state(self))
            if self.checkpoints and self.checkpoints.memory:
                self.checkpoints.memory.discard()  # the last step is committed: release the host memory
            status = "ok"
        finally:
            self.events.emit(EventKind.WORKER_STOP, reason=status)
            if self.env.is_main:
                self.events.emit(EventKind.JOB_END, status=status, steps=self.step)
            self.events.close()

    def _save_on_preemption(self) -> None:
        if self.checkpoints is None:
            return
        grace = self.cfg.checkpoint.preemption_grace_s
        with grace_deadline(self.preempted_at or time.monotonic(), grace, self.step, self.events, announce=self.env.is_main):
            self.save_checkpoint(sync=True)
        if self.env.is_main:
            print(f"preempted: committed step {self.step} to {self.cfg.checkpoint_url}; exiting cleanly", flush=True)

    def close(self) -> None:
        self.health.close()
        if self.checkpoints is not None:
            self.checkpoints.close()
        destroy_distributed()


def train(cfg: Config) -> Trainer:
    """Run to the configured step (or a preemption); the finished trainer tells which (``step``, ``preempted``)."""
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer
