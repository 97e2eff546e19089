"""Context parallelism the Llama 3 way: load-balanced causal chunks and an all-gather of K/V.

torch's experimental ``context_parallel`` (ring attention over DTensor) does not run on CPU, so
this is the portable scheme of the Llama 3 paper (section 3.3.2):

- The sequence of length S is cut into 2·cp chunks of c = S / (2·cp) tokens; cp rank i holds
  chunks i and 2·cp−1−i, concatenated. Under a causal mask the early chunk is cheap and the late
  one expensive, so every rank does the same amount of attention work.
- Each attention core all-gathers K and V (kv heads only, before grouped-query repetition, so
  the traffic is n_kv_heads/n_heads of gathering Q-sized tensors), puts them back in global
  position order and attends every local query chunk to the key prefix it may see. The gather is
  differentiable: its backward reduce-scatters the K/V gradients back to their owners.

The layout of every rank is a pure function of (cp_rank, cp, seq_len), so the core derives its
masks from the local sequence length it is handed; the model itself needs no change beyond the
rope ``positions`` (see ``cp_positions``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from stalwart.model.llama import Transformer, repeat_kv


def _chunk_ids(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two global chunk indices (of 2·cp) that ``cp_rank`` holds, in local order."""
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank={cp_rank} is outside [0, {cp}); pass the rank within the cp mesh dim")
    return cp_rank, 2 * cp - 1 - cp_rank


def _check_divisible(seq_len: int, cp: int) -> int:
    if seq_len % (2 * cp):
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2·cp = {2 * cp} (context parallelism cuts it "
            f"into 2·cp chunks); use a seq_len that is a multiple of {2 * cp} or a smaller cp"
        )
    return seq_len // (2 * cp)


def cp_shard(tensors: list[Tensor], cp_rank: int, cp: int, seq_dim: int = 1) -> list[Tensor]:
    """This rank's part of each tensor along ``seq_dim``: chunks i and 2·cp−1−i of 2·cp.

    Shard inputs, labels (and anything else per-token) with the same call so they stay aligned.
    """
    out = []
    for t in tensors:
        c = _check_divisible(t.shape[seq_dim], cp)
        first, second = _chunk_ids(cp_rank, cp)
        out.append(torch.cat([t.narrow(seq_dim, first * c, c), t.narrow(seq_dim, second * c, c)], dim=seq_dim))
    return out


def cp_positions(seq_len: int, cp_rank: int, cp: int, device: torch.device | str | None = None) -> Tensor:
    """Global positions [seq_len / cp] of this rank's local tokens; pass as ``Transformer.forward(positions=...)``."""
    c = _check_divisible(seq_len, cp)
    first, second = _chunk_ids(cp_rank, cp)
    return torch.cat(
        [
            torch.arange(first * c, (first + 1) * c, device=device),
            torch.arange(second * c, (second + 1) * c, device=device),
        ]
    )


class _AllGatherDim0(torch.autograd.Function):
    """All-gather along dim 0 whose backward reduce-scatters (sums) the gradient back to each owner.

    Both collectives exist on gloo and nccl (checked on torch 2.13), unlike some autograd-aware
    helpers that fall back to per-tensor lists.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


class ContextParallelAttention(nn.Module):
    """Drop-in ``Attention.core`` for load-balanced context parallelism (same contract as
    ``CausalAttentionCore``; q/k/v hold this rank's 2 chunks along the sequence dim).

    Local query chunk j (global index) sees exactly the key prefix [0, (j+1)·c), causally masked on
    its last chunk, so each local chunk is one SDPA call over only the keys it needs.
    """

    def __init__(self, group: ProcessGroup, cp_rank: int, cp: int) -> None:
        super().__init__()
        self.group = group
        self.cp_rank = cp_rank
        self.cp = cp
        self._masks: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return f"cp_rank={self.cp_rank}, cp={self.cp}"

    def _chunk_masks(self, c: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Boolean masks [c, (j+1)·c] (True = attend) for the two local chunks: global query
        position p attends to keys at positions <= p."""
        key = (c, device)
        if key not in self._masks:
            masks = []
            for j in _chunk_ids(self.cp_rank, self.cp):
                q_pos = torch.arange(j * c, (j + 1) * c, device=device)
                k_pos = torch.arange((j + 1) * c, device=device)
                masks.append(k_pos[None, :] <= q_pos[:, None])
            self._masks[key] = (masks[0], masks[1])
        return self._masks[key]

    def _gather_kv(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """[bs, n_kv, S/cp, D] local -> [bs, n_kv, S, D] in global position order."""
        cp = self.cp
        bs, n_kv, s_local, d = k.shape
        c = s_local // 2
        gathered = _AllGatherDim0.apply(torch.stack([k, v]), self.group)  # [cp*2, bs, n_kv, 2c, d], rank-major
        gathered = gathered.view(cp, 2, bs, n_kv, 2, c, d)
        # Rank r holds chunks (r, 2cp-1-r): first halves in rank order are chunks 0..cp-1,
        # second halves in reverse rank order are chunks cp..2cp-1.
        chunks = torch.cat(
            [gathered[:, :, :, :, 0], gathered[:, :, :, :, 1].flip(0)], dim=0
        )  # [2cp, 2, bs, n_kv, c, d]
        kv = chunks.permute(1, 2, 3, 0, 4, 5).reshape(2, bs, n_kv, 2 * cp * c, d)
        return kv[0], kv[1]

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s_local = q.shape[2]
        if s_local % 2 or k.shape[2] != s_local:
            raise ValueError(
                f"context-parallel attention got a local sequence of {s_local} (k: {k.shape[2]}); each rank must "
                f"hold 2 equal chunks from cp_shard(..., cp={self.cp}) of a sequence divisible by {2 * self.cp}"
            )
        c = s_local // 2
        n_rep = q.shape[1] // k.shape[1]
        k_full, v_full = self._gather_kv(k, v)
        outs = []
        for half, (j, mask) in enumerate(zip(_chunk_ids(self.cp_rank, self.cp), self._chunk_masks(c, q.device))):
            end = (j + 1) * c
            q_j = q[:, :, half * c : (half + 1) * c]
            k_j = repeat_kv(k_full[:, :, :end], n_rep)
            v_j = repeat_kv(v_full[:, :, :end], n_rep)
            outs.append(F.scaled_dot_product_attention(q_j, k_j, v_j, attn_mask=mask))
        return torch.cat(outs, dim=2)


def apply_cp(model: Transformer, cp_mesh: DeviceMesh, seq_len: int | None = None) -> None:
    """Swap every block's attention core for ``ContextParallelAttention`` over the 1-D ``cp_mesh``.

    Apply after tensor parallelism (the core then sees local heads) and before FSDP, which must
    shard over ``dp_shard_cp`` so gradients are averaged over the cp ranks too.

    With ``seq_len`` (the training sequence length) the model's rope table is replaced by this
    rank's rows in local order, so a forward without ``positions`` is correct: that is what
    pipeline schedules call, as they pass nothing but the activations between stages.
    """
    if cp_mesh.ndim != 1:
        raise ValueError(
            f"apply_cp needs the 1-D 'cp' mesh, got a {cp_mesh.ndim}-D mesh {cp_mesh.mesh_dim_names}; pass mesh['cp']"
        )
    group, cp_rank, cp = cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size()
    for block in model.layers.values():
        block.attention.core = ContextParallelAttention(group, cp_rank, cp)
    if seq_len is not None:
        rows = cp_positions(seq_len, cp_rank, cp, device=model.rope_cache.device)
        model.register_buffer("rope_cache", model.rope_cache[rows].contiguous(), persistent=False)
