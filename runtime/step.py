"""One rank's share of a training step: forward/backward over the microbatches, clipping, the job-wide sync.

:class:`ModelStep` runs the model parts as the layout requires (gradient accumulation, context-
parallel sequence chunks, a pipeline schedule, loss-parallel logits under TP). It is what the
anomaly guard replays (:class:`~stalwart.health.anomaly.ReplaySteps`). :func:`sync_job` is the one
job-wide collective of a step beyond what parallelism itself needs: it carries the loss and every
job-wide flag at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from stalwart.health.sdc import all_gather_rows
from stalwart.parallel.context_parallel import cp_shard
from stalwart.parallel.dims import ParallelDims
from stalwart.parallel.loss import cross_entropy_loss, loss_context
from stalwart.parallel.pipeline import clip_grad_norm_pp, pipeline_step, reset_pipeline
from stalwart.parallel.reform import reset_fsdp

Batch = list[tuple[torch.Tensor, torch.Tensor]]


class ModelStep:
    """Forward/backward and clipping for one rank's model parts (one part, or a pipeline's stages)."""

    def __init__(
        self,
        parts: list[nn.Module],
        dims: ParallelDims,
        mesh: DeviceMesh | None,
        device: torch.device,
        compute_dtype: torch.dtype,
        schedule: Any = None,
        stage_roles: tuple[bool, bool] = (True, True),
    ) -> None:
        self.parts = parts
        self.dims = dims
        self.mesh = mesh
        self.device = device
        self.compute_dtype = compute_dtype
        self.schedule = schedule
        self.has_first_stage, self.has_last_stage = stage_roles

    @property
    def loss_parallel(self) -> bool:
        """Vocab-sharded logits under TP; a pipeline's last stage takes full logits instead."""
        return self.dims.tp > 1 and self.dims.pp == 1

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for part in self.parts for n, p in part.named_parameters()]

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """This rank's loss of ``batch``, mean over its tokens (zero on a pipeline stage that is not the last)."""
        return self._pipeline(batch) if self.schedule is not None else self._accumulate(batch)

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients of every stage to ``max_norm``; returns their total norm (every rank)."""
        params = self.parameters()
        if self.schedule is not None:
            return clip_grad_norm_pp(params, max_norm, self.mesh["pp"])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def unclipped_grad_norm(self) -> float:
        return self.clip(float("inf")).item()

    def zero_grad(self) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=True)

    def abandon(self) -> None:
        """Drop a step that failed half way: gradients, FSDP's unsharded buffers, the pipeline's caches.

        After a re-formation the pipeline also infers its stages' shapes again, on every rank alike
        (a replacement's fresh stages must, and its neighbours must meet it there).
        """
        self.zero_grad()
        reset_fsdp(self.parts)
        if self.schedule is not None:
            reset_pipeline(self.schedule)

    def neighbour_batch(self, batch: Batch) -> tuple[Batch, int] | None:
        """The next data-parallel rank's batch and its global rank (None without DP, or with PP)."""
        if self.mesh is None or self.dims.dp == 1 or self.schedule is not None:
            return None
        group = self.mesh["dp"].get_group()
        ranks = dist.get_process_group_ranks(group)
        me = ranks.index(dist.get_rank())
        gathered = all_gather_rows(torch.stack([torch.stack([x, y]) for x, y in batch]), group)
        nxt = (me + 1) % len(ranks)
        return [(mb[0], mb[1]) for mb in gathered[nxt]], ranks[nxt]

    def _autocast(self) -> torch.autocast:
        """bf16 compute on CUDA; a no-op in fp32 (the CPU default)."""
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    def _local_sequence(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's load-balanced sequence chunks under CP (chunks i and 2cp-1-i), else as is."""
        if self.dims.cp == 1:
            return inputs, labels
        inputs, labels = cp_shard([inputs, labels], self.mesh["cp"].get_local_rank(), self.dims.cp)
        return inputs, labels

    def _accumulate(self, batch: Batch) -> torch.Tensor:
        """Gradient accumulation over microbatches; gradients are reduced only on the last one."""
        (model,), device = self.parts, self.device
        n = len(batch)
        local_loss = torch.zeros((), device=device)
        for i, (inputs, labels) in enumerate(batch):
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(i == n - 1)
            inputs, labels = self._local_sequence(
                inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            )
            with loss_context(self.loss_parallel):
                with self._autocast():
                    logits = model(inputs)
                loss = cross_entropy_loss(logits, labels) / n
                loss.backward()
            local_loss += loss.detach()
        return local_loss

    def _pipeline(self, batch: Batch) -> torch.Tensor:
        """One schedule run over this rank's whole local batch; the loss is known on the last stage only."""
        device = self.device
        inputs, labels = self._local_sequence(
            torch.cat([x for x, _ in batch]).to(device), torch.cat([y for _, y in batch]).to(device)
        )
        with self._autocast():
            loss = pipeline_step(self.schedule, inputs, labels, self.has_first_stage, self.has_last_stage)
        return loss.detach() if loss is not None else torch.zeros((), device=device)


@dataclass(frozen=True)
class JobStep:
    """What every rank knows after a step's sync: the same values everywhere."""

    loss: float  # mean over every token of the global batch
    grad_norm: float
    stop: bool  # healthd asked some node's ranks to stop
    preempted: bool  # some rank was sent SIGTERM


def sync_job(local_loss: torch.Tensor, grad_norm: torch.Tensor, *, stop: bool, preempted: bool, pp: int) -> JobStep:
    """The step's one job-wide collective: a SUM over the default (gloo) group of four numbers.

    Every rank holding a loss contributes ``loss × pp / world`` (the ranks of one tensor-parallel
    group hold the same value, the stages of a pipeline that are not the last hold zero), so the sum
    is the mean over the data-parallel × context-parallel ranks. The grad norm is already job-wide;
    rank 0 alone contributes it, so it comes back exact. Flags add up: > 0 means some rank set it.
    One device-to-host copy, one collective.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    first = not dist.is_initialized() or dist.get_rank() == 0
    values = torch.stack(
        [
            local_loss.detach().double() * (pp / world),
            grad_norm.detach().double() if first else torch.zeros((), dtype=torch.float64, device=grad_norm.device),
            torch.tensor(float(stop), dtype=torch.float64, device=grad_norm.device),
            torch.tensor(float(preempted), dtype=torch.float64, device=grad_norm.device),
        ]
    ).cpu()
    if world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)  # default group, CPU tensor: gloo on every job
    loss, norm, stop_sum, preempted_sum = values.tolist()
    return JobStep(loss, norm, stop_sum > 0, preempted_sum > 0)
