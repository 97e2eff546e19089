"""Parallel degrees, their validation, and the one device mesh every other part looks up by name.

Mesh order is [pp, dp_replicate, dp_shard, cp, tp] (TP innermost, as Llama 3 405B): ranks that
talk most often are neighbours. Derived, flattened dimensions:

- ``dp``          = dp_replicate × dp_shard: data loading (ranks that see different samples);
- ``dp_shard_cp`` = dp_shard × cp: what FSDP shards parameters over;
- ``dp_cp``       = dp_replicate × dp_shard × cp: loss averaging and gradient-norm reduction.

All checks run before any process group exists, so a bad layout costs nothing but the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stalwart.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from stalwart.model.args import ModelArgs

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
FLATTENED = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}


class ParallelLayoutError(ConfigError):
    """A parallel layout that cannot run; the message names the fix."""


def _divisors(n: int) -> list[int]:
    """Every divisor of ``n``, ascending; O(sqrt n), so an absurd batch or length still answers at once."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _fmt_set(values: list[int]) -> str:
    return "{" + ", ".join(map(str, values)) + "}"


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, cp: int, tp: int, pp: int, world_size: int) -> ParallelDims:
        """Fill the one data-parallel degree set to -1 from the world size; check the product.

        ``dp_shard = -1`` (the default) grows FSDP with the world; ``dp_replicate = -1`` grows the
        number of full replicas instead (DDP, or HSDP with a fixed ``dp_shard``), which keeps
        cross-replica SDC fingerprints available at any size.
        """
        for name, value in (("cp", cp), ("tp", tp), ("pp", pp)):
            if value < 1:
                raise ParallelLayoutError(f"parallel.{name} = {value} must be at least 1")
        for name, value in (("dp_replicate", dp_replicate), ("dp_shard", dp_shard)):
            if value == 0 or value < -1:
                raise ParallelLayoutError(f"parallel.{name} = {value} must be at least 1, or -1 for 'whatever is left'")
        if dp_replicate == -1 and dp_shard == -1:
            raise ParallelLayoutError(
                "parallel.dp_replicate and parallel.dp_shard are both -1; fix one of them (e.g. dp_shard = 1 for DDP)"
            )
        fill = "dp_replicate" if dp_replicate == -1 else "dp_shard" if dp_shard == -1 else None
        others = max(dp_replicate, 1) * max(dp_shard, 1) * cp * tp * pp if fill else 0
        if fill:
            if world_size % others:
                fitting = [w for w in range(others, 4 * others + 1, others)]
                fixed, value = ("dp_shard", dp_shard) if fill == "dp_replicate" else ("dp_replicate", dp_replicate)
                raise ParallelLayoutError(
                    f"world size {world_size} is not divisible by {fixed}×cp×tp×pp = {value}×{cp}×{tp}×{pp} = "
                    f"{others}; run on a multiple of "
                    f"{others} ranks (e.g. {', '.join(map(str, fitting))}) or lower the degrees"
                )
            dp_replicate, dp_shard = (
                (world_size // others, dp_shard) if fill == "dp_replicate" else (dp_replicate, world_size // others)
            )
        others = dp_replicate * cp * tp * pp
        product = others * dp_shard
        if product != world_size:
            raise ParallelLayoutError(
                f"pp×dp_replicate×dp_shard×cp×tp = {pp}×{dp_replicate}×{dp_shard}×{cp}×{tp} = {product} "
                f"but the world size is {world_size}; make the product equal {world_size} (dp_shard = -1 fills the "
                "rest)"
            )
        return cls(dp_replicate, dp_shard, cp, tp, pp, world_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)

    def describe(self) -> str:
        return " × ".join(f"{n}{d}" for n, d in zip(MESH_DIMS, self.shape) if d > 1) or "single rank"

    def as_dict(self) -> dict[str, int]:
        return dict(zip(MESH_DIMS, self.shape))

    def validate_model(self, args: ModelArgs, seq_len: int) -> None:
        """Shape constraints between the layout and the model, each error naming the valid choices."""
        if self.tp > 1:
            for what, n in (
                ("n_heads", args.n_heads),
                ("n_kv_heads", args.n_kv_heads),
                ("the FFN width", args.ffn_hidden_dim),
                ("vocab_size", args.vocab_size),
            ):
                if n % self.tp:
                    common = [
                        d
                        for d in _divisors(args.n_heads)
                        if args.n_kv_heads % d == 0 and args.ffn_hidden_dim % d == 0 and args.vocab_size % d == 0
                    ]
                    raise ParallelLayoutError(
                        f"tp={self.tp} does not divide {what}={n}; choose tp in {_fmt_set(common)}"
                    )
        if self.cp > 1 and seq_len % (2 * self.cp):
            valid = [c for c in _divisors(seq_len) if seq_len % (2 * c) == 0]
            raise ParallelLayoutError(
                f"2·cp = {2 * self.cp} does not divide seq_len={seq_len} (load-balanced context parallelism "
                f"splits the sequence into 2·cp chunks); choose cp in {_fmt_set(valid)} or change data.seq_len"
            )
        if self.tp > 1 and (seq_len // self.cp) % self.tp:
            raise ParallelLayoutError(
                f"sequence parallelism splits each rank's seq_len/cp = {seq_len}/{self.cp} = {seq_len // self.cp} "
                "tokens "
                f"over tp={self.tp}, which does not divide it; choose data.seq_len as a multiple of "
                f"{2 * self.cp * self.tp}"
            )
        if self.pp > args.n_layers:
            raise ParallelLayoutError(
                f"pp={self.pp} is larger than the model's n_layers={args.n_layers}; choose pp <= {args.n_layers}"
            )

    def validate_batch(self, global_batch_size: int, microbatch_size: int, pp_microbatches: int) -> None:
        """The global batch must split evenly over DP ranks, microbatches and pipeline microbatches."""
        per_step = self.dp * microbatch_size
        if global_batch_size % per_step:
            raise ParallelLayoutError(
                f"training.global_batch_size={global_batch_size} is not divisible by dp×microbatch_size = "
                f"{self.dp}×{microbatch_size} = {per_step}; choose a global batch that is a multiple of {per_step}"
            )
        local_batch = global_batch_size // self.dp
        n_microbatches = pp_microbatches or self.pp
        if self.pp > 1 and local_batch % n_microbatches:
            raise ParallelLayoutError(
                f"{n_microbatches} pipeline microbatches (parallel.pp_microbatches, default pp) do not divide the "
                f"local batch global_batch_size/dp = {global_batch_size}/{self.dp} = {local_batch}; "
                f"choose pp_microbatches in {_fmt_set(_divisors(local_batch))}"
            )

    def build_mesh(self, device_type: str) -> MeshRegistry:
        """The world mesh with the named dims and the flattened ``dp``, ``dp_shard_cp``, ``dp_cp``."""
        from torch.distributed.device_mesh import init_device_mesh

        world = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS)
        flat = {name: world[dims]._flatten(name) for name, dims in FLATTENED.items()}
        return MeshRegistry(world, flat)


class MeshRegistry:
    """Submeshes by name: a base dim (``tp``), a flattened one (``dp_cp``) or a tuple of base dims.

    torch asks callers to keep flattened meshes themselves rather than slice them from the
    root; this is that bookkeeping, in one place.
    """

    def __init__(self, world: DeviceMesh, flattened: dict[str, DeviceMesh]) -> None:
        self.world = world
        self._flattened = flattened

    def __getitem__(self, name: str | tuple[str, ...]) -> DeviceMesh:
        if isinstance(name, str) and name in self._flattened:
            return self._flattened[name]
        return self.world[name]
