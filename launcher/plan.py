"""Which node counts the job's layout can train on, decided before the first rendezvous.

TP, CP, PP and dp_replicate are fixed by the config; dp_shard (``-1``) takes what the world leaves,
and the global batch must still split over dp × microbatch. So a node count ``n`` is *usable* when
``n × nproc_per_node`` ranks pass those checks. When the rendezvous hands the agents a count that is
not usable (say 3 nodes where dp must divide 4), the job trains on the largest usable count below it
and the remaining whole nodes idle as hot spares until the next re-rendezvous.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from stalwart.parallel.dims import ParallelLayoutError
from stalwart.runtime.config import Config
from stalwart.runtime.plan import check_layout, plan_job


@dataclass(frozen=True)
class NodePlan:
    nproc_per_node: int
    min_nodes: int
    max_nodes: int
    usable: tuple[int, ...]
    """Node counts in [1, max_nodes] the layout runs on, ascending."""

    def active_nodes(self, nodes: int) -> int:
        """How many of ``nodes`` rendezvoused nodes train (the largest usable count <= nodes); 0 if none."""
        i = bisect.bisect_right(self.usable, nodes)
        return self.usable[i - 1] if i else 0

    @property
    def rdzv_max_nodes(self) -> int:
        """The rendezvous admits no more nodes than can train; later ones wait in torch's redundancy list."""
        return self.active_nodes(self.max_nodes)


def _layout_error(cfg: Config, world_size: int) -> ParallelLayoutError | None:
    try:
        check_layout(cfg, world_size)
    except ParallelLayoutError as e:
        return e
    return None


def plan_nodes(cfg: Config, nproc_per_node: int, min_nodes: int, max_nodes: int) -> NodePlan:
    """The usable node counts; raises ParallelLayoutError when MIN nodes cannot train at all."""
    usable = tuple(n for n in range(1, max_nodes + 1) if _layout_error(cfg, n * nproc_per_node) is None)
    plan = NodePlan(nproc_per_node, min_nodes, max_nodes, usable)
    if plan.active_nodes(min_nodes) == 0:
        world = min_nodes * nproc_per_node
        hint = (
            f"; the layout first fits {usable[0]} nodes: use --nnodes {usable[0]}:{max(max_nodes, usable[0])}"
            if usable
            else ""
        )
        raise ParallelLayoutError(
            f"--nnodes {min_nodes}:{max_nodes} × --nproc-per-node {nproc_per_node} starts with {world} ranks: "
            f"{_layout_error(cfg, world)}{hint}"
        )
    plan_job(cfg, plan.active_nodes(min_nodes) * nproc_per_node)  # model, tokenizer and sequence checks
    return plan
