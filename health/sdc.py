"""Silent data corruption (SDC): the pure pieces, with no trainer imports.

Three layers, cheapest first:

1. **Parameter fingerprints.** Ranks that must hold bit-identical state (the replicas of one
   shard: the ``dp_replicate`` mesh under HSDP or plain DDP) compare an exact integer fingerprint
   of their local parameter shards. :func:`tensor_fingerprint` reads the raw bits as 32-bit words
   and sums ``word_half × (position-dependent weight)`` exactly (modulo the prime 2^61-1), so a
   change confined to one element, any number of its bits, always changes the fingerprint. With
   >= 3 replicas the odd one out is named by majority (:func:`odd_ones_out`); with 2 there is no
   majority and the golden workload decides, else both replicas are reported as suspects.
2. **Golden workload.** A fixed-seed fp32 matmul and attention (TF32 off, one CPU thread) whose
   result bits every rank all-gathers; a rank whose bits differ from the majority's, or from its own
   result at start-up, computes wrong numbers.
3. **Loss / grad-norm anomalies.** :class:`SpikeDetector` flags NaN/Inf and robust-z spikes; the
   caller recomputes the step from the same state on the same rank and on another rank, and
   :func:`replay_verdict` tells bad hardware (the recomputation differs) from bad data (it reproduces).

Plus :func:`flip_bit`, the corruption that ``runtime/faults``' ``flip_bit`` plan entries inject.
"""

from __future__ import annotations

import contextlib
import enum
import math
import statistics
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_PRIME = (1 << 61) - 1  # chunk sums (< 2^54) are folded modulo this; |weight × delta| < 2^32 never vanishes
_WEIGHT_PERIOD = 65521  # weights 1..65521: nonzero and < 2^16, so a word-half × weight stays < 2^32
_CHUNK = 1 << 22  # words per pass: bounds the int64 temporaries to 32 MiB


# ------------------------------------------------------------------------------------ fingerprints


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _words(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as a flat integer tensor (32-bit words where the size allows)."""
    flat = t.detach().reshape(-1)
    size = flat.element_size()
    if size >= 4:
        return flat.view(torch.int32)
    return flat.view(torch.int16 if size == 2 else torch.uint8)


def tensor_fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Exact fingerprint ``[low, high]`` (int64, on ``t``'s device) of this rank's bits of ``t``.

    Each 32-bit word ``w`` at position ``i`` contributes ``(w & 0xFFFF) × c_i`` and ``(w >> 16) × c_i``
    with ``c_i = 1 + i mod 65521``. The sums are exact integers, so changing one word changes at
    least one of the two by a nonzero amount below 2^32, which the prime modulus cannot hide.
    """
    return _fingerprint_and_nonfinite(t)[0]


_FP32_EXPONENT = 0x7F800000  # an fp32 word with every exponent bit set is Inf or NaN


def _fingerprint_and_nonfinite(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fingerprint of ``t`` and how many of its elements are NaN/Inf, counted in the same pass over fp32 words."""
    local = local_tensor(t)
    words = _words(local)
    acc = torch.zeros(2, dtype=torch.int64, device=words.device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=words.device)
    count_words = local.dtype == torch.float32
    for start in range(0, words.numel(), _CHUNK):
        w = words[start : start + _CHUNK].to(torch.int64) & 0xFFFFFFFF
        weight = torch.arange(start, start + w.numel(), dtype=torch.int64, device=w.device) % _WEIGHT_PERIOD + 1
        chunk = torch.stack([((w & 0xFFFF) * weight).sum(), ((w >> 16) * weight).sum()])
        acc = (acc + chunk) % _PRIME
        if count_words:
            nonfinite += ((w & _FP32_EXPONENT) == _FP32_EXPONENT).sum()
    if not count_words and local.is_floating_point():  # bf16/fp16/fp64 parameters: a plain check (rare here)
        nonfinite += (~torch.isfinite(local.detach())).sum()
    return acc, nonfinite


def fingerprint(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One ``[low, high]`` row per tensor, as a CPU int64 tensor ``[n, 2]`` (small, cheap to gather)."""
    return fingerprint_and_nonfinite(tensors)[0]


def fingerprint_and_nonfinite(tensors: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """:func:`fingerprint`, and the number of NaN/Inf elements among ``tensors`` (local shards), from the same pass."""
    rows, bad = [], []
    for t in tensors:
        row, nonfinite = _fingerprint_and_nonfinite(t)
        rows.append(row)
        bad.append(nonfinite)
    if not rows:
        return torch.zeros(0, 2, dtype=torch.int64), 0
    return torch.stack(rows).cpu(), int(torch.stack(bad).sum().item())


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of this rank's shards of ``tensors`` is finite (one pass; for the rare checks)."""
    return all(bool(torch.isfinite(local_tensor(t).detach()).all()) for t in tensors)


# ------------------------------------------------------------------------------------------ voting


@dataclass(frozen=True)
class Vote:
    """Outcome of comparing the members of one group (indices into the group).

    ``odd`` are the members outside a strict majority; without a strict majority (e.g. two
    members that disagree) ``undetermined`` is set and ``odd`` holds every member not in a
    largest class, or all members when the classes tie.
    """

    agree: bool
    odd: tuple[int, ...] = ()
    undetermined: bool = False


def odd_ones_out(rows: list[torch.Tensor], rtol: float = 0.0) -> Vote:
    """Group equal results (bitwise, or within ``rtol``) and name the members outside the majority."""
    classes: list[list[int]] = []
    for i, row in enumerate(rows):
        for members in classes:
            if _same(rows[members[0]], row, rtol):
                members.append(i)
                break
        else:
            classes.append([i])
    if len(classes) == 1:
        return Vote(agree=True)
    largest = max(len(c) for c in classes)
    if 2 * largest > len(rows):
        majority = next(c for c in classes if len(c) == largest)
        return Vote(agree=False, odd=tuple(i for i in range(len(rows)) if i not in majority))
    winners = [c for c in classes if len(c) == largest]
    odd = range(len(rows)) if len(winners) > 1 else [i for i in range(len(rows)) if i not in winners[0]]
    return Vote(agree=False, odd=tuple(odd), undetermined=True)


def _same(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    if a.shape != b.shape:
        return False
    if rtol == 0.0 or not a.is_floating_point():
        return torch.equal(a, b)
    return bool(torch.allclose(a, b, rtol=rtol, atol=0.0, equal_nan=True))


def all_gather_rows(row: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every group member's ``row`` (CPU tensors, so gloo carries them even on a CUDA job)."""
    row = row.cpu().contiguous()
    out = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, row, group=group)
    return out


# ---------------------------------------------------------------------------------- golden workload


@contextlib.contextmanager
def _exact_math(device: torch.device) -> Iterator[None]:
    """fp32 without TF32 on CUDA, one thread on CPU: the same bits on every healthy device."""
    if device.type == "cuda":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def golden_workload(device: torch.device, seed: int = 20240723, size: int = 256) -> torch.Tensor:
    """Deterministic matmul + attention on ``device``; returns the result's fingerprint (CPU).

    Inputs come from a private CPU generator (the training RNG stream is untouched), so the
    result depends only on the device's arithmetic. Homogeneous hardware and software give the
    same bits on every rank; a job mixing GPU models would need a tolerance instead.
    """
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(size, size, generator=g).to(device) for _ in range(2))
    q, k, v = (torch.randn(2, 4, size // 2, 64, generator=g).to(device) for _ in range(3))
    with torch.no_grad(), _exact_math(device):
        c = a @ b
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=device).tril()
        attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
        return fingerprint([c, attn])


# ----------------------------------------------------------------------------- anomalies and replay


@dataclass
class SpikeDetector:
    """NaN/Inf, or a value above ``median + factor × robust spread`` of the recent accepted steps.

    The spread is 1.4826 × MAD (the standard deviation for normal data) with a floor of 10% of the
    median, so a flat stretch of training does not make every wiggle a spike. Only upward jumps
    count: loss and grad norm fall during healthy training.
    """

    factor: float = 10.0
    window: int = 50
    min_history: int = 10
    _history: dict[str, deque[float]] = field(default_factory=dict)

    def check(self, **values: float) -> str | None:
        """The reason the values are anomalous (e.g. ``"loss 9.1 > 4.2"``), or None."""
        for name, x in values.items():
            if not math.isfinite(x):
                return f"non-finite {name} ({x})"
            hist = self._history.get(name, ())
            if self.factor <= 0 or len(hist) < self.min_history:
                continue
            med = statistics.median(hist)
            spread = max(1.4826 * statistics.median(abs(h - med) for h in hist), 0.1 * abs(med), 1e-12)
            limit = med + self.factor * spread
            if x > limit:
                return f"{name} spike ({x:.6g} > {limit:.6g}, median {med:.6g})"
        return None

    def accept(self, **values: float) -> None:
        """Add a normal step's values to the running statistics."""
        for name, x in values.items():
            self._history.setdefault(name, deque(maxlen=self.window)).append(float(x))


class Verdict(str, enum.Enum):
    BAD_DATA = "bad_data"  # every recomputation reproduces the anomaly
    BAD_HARDWARE = "bad_hardware"  # a recomputation of the same step from the same state differs
    BAD_STATE = "bad_state"  # the parameters themselves hold NaN/Inf: every batch would reproduce it


@dataclass(frozen=True)
class ReplayOutcome:
    verdict: Verdict
    ranks: tuple[int, ...] = ()  # suspects (bad hardware); empty when unknown or bad data
    detail: str = ""


def close_enough(a: float, b: float, rtol: float) -> bool:
    """Equal within ``rtol`` (relative); NaN matches only NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))


def replay_verdict(
    original: list[float], same_rank: list[float], other_rank: list[float] | None = None, rtol: float = 0.0
) -> ReplayOutcome:
    """Judge a replayed step from per-rank losses (index = rank whose data it is).

    ``original[j]`` is rank j's loss as first computed, ``same_rank[j]`` rank j's recomputation
    from the same state, ``other_rank[j]`` the loss of rank j's data computed by another rank
    (None where not available). A rank whose recomputation differs has unreliable arithmetic; two
    ranks that each reproduce themselves but disagree on the same data are both suspects (the
    golden workload names the faulty one); otherwise the anomaly lives in the data.
    """
    flaky = tuple(j for j, (a, b) in enumerate(zip(original, same_rank)) if not close_enough(a, b, rtol))
    if flaky:
        return ReplayOutcome(Verdict.BAD_HARDWARE, flaky, f"ranks {list(flaky)} did not reproduce their own step")
    if other_rank is not None:
        disagree = tuple(
            j for j, (a, o) in enumerate(zip(original, other_rank)) if o is not None and not close_enough(a, o, rtol)
        )
        if disagree:
            return ReplayOutcome(
                Verdict.BAD_HARDWARE,
                (),
                f"another rank computed a different loss on the data of ranks {list(disagree)}",
            )
    return ReplayOutcome(Verdict.BAD_DATA, (), "the anomaly reproduced on every recomputation")


# --------------------------------------------------------------------------------- fault injection


def flip_bit(tensor: torch.Tensor, index: int, bit: int) -> None:
    """Flip bit ``bit`` of element ``index`` (flat, of this rank's local shard) in place.

    Bit 0 is the least significant bit of the element's raw representation (for fp32: bits
    0-22 mantissa, 23-30 exponent, 31 sign).
    """
    local = local_tensor(tensor).detach()
    if not local.is_contiguous():
        raise ValueError("flip_bit needs a contiguous tensor (parameters are); pass tensor.contiguous()")
    nbits = 8 * local.element_size()
    if not 0 <= bit < nbits:
        raise ValueError(f"bit={bit} is outside a {nbits}-bit element; choose 0..{nbits - 1}")
    if not 0 <= index < local.numel():
        raise ValueError(f"index={index} is outside the local shard of {local.numel()} elements")
    words = local.view(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[local.element_size()])
    mask = (
        -(1 << bit) if bit == nbits - 1 and words.dtype != torch.uint8 else 1 << bit
    )  # the sign bit as a signed value
    words[index] ^= mask
