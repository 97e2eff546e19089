"""Rotary position embeddings in Meta's interleaved convention, with real cos/sin.

Meta's reference code multiplies complex tensors; complex dtypes are awkward with
DTensor and gloo, so the same rotation is written with real cos/sin here. Pairs are
adjacent channels (2i, 2i+1) as in Meta's checkpoints; the Hugging Face adapter
permutes q/k weights to HF's rotate-half convention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stalwart.model.args import RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """Per-pair inverse frequencies [head_dim // 2] in fp32, Llama 3.1-scaled if requested."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim))
    return freqs if scaling is None else apply_scaling(freqs, scaling)


def apply_scaling(freqs: Tensor, scaling: RopeScaling) -> Tensor:
    """Llama 3.1 long-context scaling (Meta's `apply_scaling`, vectorised).

    Wavelengths shorter than original_context/high_freq_factor keep their frequency,
    those longer than original_context/low_freq_factor are divided by `factor`, and
    the band in between is interpolated smoothly between the two.
    """
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, interpolated)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def precompute_rope_cache(head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """Table [max_seq_len, head_dim] holding cat(cos, sin) per position, in fp32.

    Rows are selected by absolute position, so callers with non-contiguous positions
    (context parallelism's load-balanced chunks) just index the rows they hold.
    """
    freqs = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def apply_rotary_emb(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x [bs, S, heads, head_dim] by rope rows [S, head_dim].

    Computed in fp32 and cast back, like Meta's reference, so bf16 models keep
    accurate phases.
    """
    cos, sin = rope.float().chunk(2, dim=-1)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
