"""Pipeline parallelism on ``torch.distributed.pipelining``, TorchTitan-style manual split.

Every stage is a deep copy of the whole (materialised, identically initialised) model with the
layers it does not own deleted from ``model.layers`` and ``tok_embeddings`` / ``norm`` / ``output``
set to None where not owned. FQNs therefore stay those of the unsplit model and are unique across
stages, which is what lets checkpoints move between pipeline layouts.

Loss scaling: torch's schedules accumulate the gradients of every microbatch loss. As TorchTitan
does, the loss function divides each microbatch's mean loss by the number of microbatches and the
schedule is built with ``scale_grads=False``, so the accumulated gradients equal the gradient of
the mean loss over the whole local batch (microbatches are equal-sized) and the sum of the
microbatch losses is that mean loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
    _PipelineSchedule,
)
from torch.distributed.tensor import DTensor

from stalwart.model.llama import Transformer

# Embedding and norm+output each cost about one transformer layer (TorchTitan's default weights).
_END_COST = 1


@dataclass(frozen=True)
class ScheduleSpec:
    """How a schedule places stages: ``stages_per_rank`` and ``loop`` (r, r+pp, ...) or ``v`` (r, 2pp-1-r)."""

    name: str
    cls: type[_PipelineSchedule]
    stages_per_rank: int
    style: str

    @property
    def multi_stage(self) -> bool:
        return self.stages_per_rank > 1


_SCHEDULES = {
    spec.name.lower(): spec
    for spec in (
        ScheduleSpec("1F1B", Schedule1F1B, 1, "loop"),
        ScheduleSpec("GPipe", ScheduleGPipe, 1, "loop"),
        ScheduleSpec("Interleaved1F1B", ScheduleInterleaved1F1B, 2, "loop"),
        ScheduleSpec("InterleavedZeroBubble", ScheduleInterleavedZeroBubble, 2, "loop"),
        ScheduleSpec("ZBVZeroBubble", ScheduleZBVZeroBubble, 2, "v"),
    )
}


def schedule_spec(schedule: str) -> ScheduleSpec:
    """Look up a supported schedule by name (case-insensitive)."""
    try:
        return _SCHEDULES[schedule.lower()]
    except KeyError:
        valid = ", ".join(s.name for s in _SCHEDULES.values())
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {valid}") from None


def split_stage_layers(n_layers: int, n_stages: int) -> list[list[str]]:
    """Contiguous layer ids ("0", "1", ...) per stage, balancing cost rather than layer count.

    The first stage also runs the embedding and the last the norm, output and loss, each counted
    as ``_END_COST`` layers, so those stages get fewer transformer layers. Every stage keeps at
    least one layer. Water-filling: each extra layer goes to the currently cheapest stage
    (middle stages first on ties, then the earliest), which minimises the most expensive stage.
    """
    if n_stages < 1:
        raise ValueError(f"the pipeline needs at least one stage, got n_stages={n_stages}")
    if n_stages > n_layers:
        raise ValueError(
            f"{n_stages} pipeline stages cannot each hold a layer of a {n_layers}-layer model; "
            f"lower pp (or use a schedule with fewer stages per rank) so that pp × stages_per_rank <= {n_layers}"
        )
    counts = [1] * n_stages

    def cost(i: int) -> int:
        return counts[i] + _END_COST * ((i == 0) + (i == n_stages - 1))

    def is_end(i: int) -> bool:
        return i == 0 or i == n_stages - 1

    for _ in range(n_layers - n_stages):
        cheapest = min(range(n_stages), key=lambda i: (cost(i), is_end(i), i))
        counts[cheapest] += 1
    out, start = [], 0
    for c in counts:
        out.append([str(i) for i in range(start, start + c)])
        start += c
    return out


def stage_ids_for_rank(pp_rank: int, pp_size: int, schedule: str) -> list[int]:
    """The global stage indices that pipeline rank ``pp_rank`` runs under ``schedule``."""
    spec = schedule_spec(schedule)
    n_stages = pp_size * spec.stages_per_rank
    if spec.style == "v":
        return [pp_rank, n_stages - 1 - pp_rank]
    return [pp_rank + s * pp_size for s in range(spec.stages_per_rank)]


def _stage_module(model: Transformer, layer_ids: list[str], is_first: bool, is_last: bool) -> Transformer:
    """A deep copy of ``model`` that keeps only ``layer_ids`` and the ends this stage owns."""
    part = copy.deepcopy(model)
    keep = set(layer_ids)
    for key in list(part.layers.keys()):
        if key not in keep:
            del part.layers[key]
    if not is_first:
        part.tok_embeddings = None
    if not is_last:
        part.norm = None
        part.output = None
    return part


def build_pipeline_stages(
    model: Transformer,
    pp_mesh: DeviceMesh,
    schedule: str,
    device: torch.device,
    parallelize_fn: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[list[PipelineStage], list[nn.Module]]:
    """Split ``model`` into this pp rank's stages: one for 1F1B/GPipe, two for the multi-stage schedules.

    ``parallelize_fn`` (e.g. FSDP with ``reshard_after_forward=False``) is applied to each stage
    module before its ``PipelineStage`` is built, so the stage drives the parallelised module.
    Parallelising the returned modules in place afterwards (``fully_shard``) works too.
    """
    spec = schedule_spec(schedule)
    if model.args.tie_embeddings:
        raise ValueError(
            "tie_embeddings shares the embedding with the output projection, which live on different "
            "pipeline stages; train with pp=1 or a flavor with tie_embeddings=False"
        )
    expected = [str(i) for i in range(len(model.layers))]
    if list(model.layers.keys()) != expected:
        raise ValueError(
            f"build_pipeline_stages needs the whole model (layers {expected}), got layers {list(model.layers.keys())}"
        )
    pp_rank, pp_size = pp_mesh.get_local_rank(), pp_mesh.size()
    n_stages = pp_size * spec.stages_per_rank
    layers_per_stage = split_stage_layers(len(model.layers), n_stages)
    stages, parts = [], []
    for idx in stage_ids_for_rank(pp_rank, pp_size, spec.name):
        part: nn.Module = _stage_module(model, layers_per_stage[idx], is_first=idx == 0, is_last=idx == n_stages - 1)
        if parallelize_fn is not None:
            part = parallelize_fn(part)
        stages.append(PipelineStage(part, idx, n_stages, device, group=pp_mesh.get_group()))
        parts.append(part)
    return stages, parts


def stage_roles(stages: list[PipelineStage]) -> tuple[bool, bool]:
    """(has_first, has_last): whether this rank feeds the inputs and whether it computes the loss."""
    return any(s.is_first for s in stages), any(s.is_last for s in stages)


def reset_pipeline(schedule: _PipelineSchedule) -> None:
    """Forget a failed run's buffers and make the next run set its stages up again (shape inference).

    After an in-process re-formation every rank calls this, so that a replacement's fresh stages and
    its neighbours' existing ones exchange their shapes in the same first step.
    """
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    for stage in stages:
        stage.clear_runtime_states()
        stage.fwd_cache.clear()
        if hasattr(stage, "bwd_cache"):
            stage.bwd_cache.clear()
    for name, value in vars(schedule).items():
        if name.endswith("_initialized") and isinstance(value, bool):
            setattr(schedule, name, False)


def build_schedule(
    stages: list[PipelineStage],
    n_microbatches: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    schedule: str,
) -> _PipelineSchedule:
    """A torch schedule whose accumulated grads equal the grads of the mean ``loss_fn`` over the batch.

    ``loss_fn`` (normally ``stalwart.parallel.loss.cross_entropy_loss``) must be a mean over its
    microbatch; it is divided by ``n_microbatches`` here and the schedule does no scaling of its
    own (``scale_grads=False``).
    """
    spec = schedule_spec(schedule)
    if len(stages) != spec.stages_per_rank:
        raise ValueError(
            f"schedule {spec.name} runs {spec.stages_per_rank} stage(s) per rank but got {len(stages)}; "
            f"build the stages with build_pipeline_stages(..., schedule={spec.name!r})"
        )
    if n_microbatches < 1:
        raise ValueError(f"pipeline microbatches must be at least 1, got {n_microbatches}")

    def scaled_loss(output: Tensor, target: Tensor) -> Tensor:
        return loss_fn(output, target) / n_microbatches

    return spec.cls(
        stages if spec.multi_stage else stages[0],
        n_microbatches=n_microbatches,
        loss_fn=scaled_loss,
        scale_grads=False,
    )


def pipeline_step(
    schedule: _PipelineSchedule,
    inputs: Tensor | None,
    labels: Tensor | None,
    has_first: bool,
    has_last: bool,
) -> Tensor | None:
    """Forward and backward of one local batch through the pipeline; grads accumulate in the stages.

    Returns the mean loss over the local batch on the rank holding the last stage, else None.
    Every rank of the pp group must call this together.
    """
    n_mb = schedule._n_microbatches
    for name, t, needed in (("inputs", inputs, has_first), ("labels", labels, has_last)):
        if needed and (t is None or t.shape[0] % n_mb):
            got = None if t is None else t.shape[0]
            raise ValueError(
                f"pipeline {name} batch {got} must be a multiple of the {n_mb} pipeline microbatches "
                "(unequal microbatches would skew the mean loss); change the batch or pp_microbatches"
            )
    args = (inputs,) if has_first else ()
    losses: list[Tensor] | None = [] if has_last else None
    schedule.step(*args, target=labels if has_last else None, losses=losses, return_outputs=False)
    if not has_last:
        return None
    return torch.stack([loss.detach() for loss in losses]).sum()


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm_pp(params: Iterable[nn.Parameter], max_norm: float, pp_mesh: DeviceMesh | None) -> Tensor:
    """Clip by the L2 norm of the gradients of *all* stages; returns that total norm (fp32, every rank).

    Squared norms are summed per rank (DTensor grads, from FSDP or TP, reduced to full norms over
    their own mesh, one collective per mesh), then all-reduced over the pp group, where each stage's
    parameters live on exactly one pp rank. Scaling is elementwise, so it is applied to local shards.
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    plain = [g for g in grads if not isinstance(g, DTensor)]
    by_mesh: dict[DeviceMesh, list[DTensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            by_mesh.setdefault(g.device_mesh, []).append(g)
    if plain:
        sq += torch.stack(torch._foreach_norm(plain)).float().pow(2).sum()
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq += norm.float().pow(2)
    if pp_mesh is not None and pp_mesh.size() > 1:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=pp_mesh.get_group())
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if grads:
        torch._foreach_mul_([_local(g) for g in grads], coef.to(device))
    return total
