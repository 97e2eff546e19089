"""Tensor parallelism (sequence + loss parallel) reproduces single-process fp32 training.

The multi-rank runs happen once per module (process start-up dominates on the shared CPU box); the
tests below each check one property of their results against ``parity.reference_run``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_harness import run_ranks
from parity import assert_close_runs, debug_args
from torch.distributed.tensor import Replicate, Shard

from stalwart.model.llama import Transformer
from stalwart.parallel.loss import cross_entropy_loss, loss_context

TP2_VARIANTS = [
    {"loss_parallel": True},
    {"loss_parallel": False},
    {"loss_parallel": True, "tie_embeddings": True},
]

EXPECTED_PLACEMENTS = {
    "tok_embeddings.weight": (Shard(0),),
    "norm.weight": (Replicate(),),
    "output.weight": (Shard(0),),
    "layers.0.attention_norm.weight": (Replicate(),),
    "layers.0.attention.wq.weight": (Shard(0),),
    "layers.0.attention.wk.weight": (Shard(0),),
    "layers.0.attention.wv.weight": (Shard(0),),
    "layers.0.attention.wo.weight": (Shard(1),),
    "layers.0.ffn_norm.weight": (Replicate(),),
    "layers.0.feed_forward.w1.weight": (Shard(0),),
    "layers.0.feed_forward.w3.weight": (Shard(0),),
    "layers.0.feed_forward.w2.weight": (Shard(1),),
}


@pytest.fixture(scope="module")
def tp2() -> list[list[dict]]:
    """Per rank, per variant of TP2_VARIANTS: the tp=2 run, the reference and layout facts."""
    return run_ranks(
        "tests/tp_cases.py:tp_variants_vs_reference", world_size=2, timeout=180, dp_shard=1, tp=2, variants=TP2_VARIANTS
    )


@pytest.mark.parametrize(
    "variant", range(len(TP2_VARIANTS)), ids=["loss_parallel", "replicated_logits", "tied_embeddings"]
)
def test_tp2_matches_reference(tp2, variant):
    """Losses, clipped-gradient norms (clipping is active: norms ≈ 2 > 1) and final parameters."""
    for rank_results in tp2:
        result = rank_results[variant]
        assert_close_runs(result["got"], result["ref"], params_normwise=True)
        assert max(result["ref"].grad_norms) > 1.0, "clipping must be exercised for the norm check to mean anything"


def test_tp_ranks_agree(tp2):
    for variant in range(len(TP2_VARIANTS)):
        assert tp2[0][variant]["got"].losses == tp2[1][variant]["got"].losses
        assert tp2[0][variant]["got"].grad_norms == tp2[1][variant]["got"].grad_norms


def test_tp_plan_shards_as_torchtitan(tp2):
    placements = tp2[0][0]["placements"]
    for name, expected in EXPECTED_PLACEMENTS.items():
        assert placements[name] == expected, (name, placements[name])
    assert len(placements) == sum(1 for _ in Transformer(debug_args(n_layers=2)).parameters())


def test_loss_parallel_keeps_logits_vocab_sharded(tp2):
    vocab = debug_args().vocab_size
    assert tp2[0][0]["logits"] == ("dtensor", (Shard(2),), (4, 32, vocab // 2))
    assert tp2[0][1]["logits"] == ("tensor", (), (4, 32, vocab))


def test_tied_embeddings_stay_tied(tp2):
    assert tp2[0][2]["still_tied"]
    assert not tp2[0][0]["still_tied"]


def test_dp2_tp2_fsdp_matches_reference():
    """FSDP over dp on top of TP: each dp rank trains on half of every global batch."""
    results = run_ranks(
        "tests/tp_cases.py:tp_variants_vs_reference",
        world_size=4,
        timeout=180,
        dp_shard=2,
        tp=2,
        variants=[{"loss_parallel": True}],
    )
    for rank_results in results:
        assert_close_runs(rank_results[0]["got"], rank_results[0]["ref"], params_normwise=True)
    assert len({tuple(r[0]["got"].losses) for r in results}) == 1


def test_cross_entropy_loss_on_plain_tensors_is_fp32_token_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    loss = cross_entropy_loss(logits, labels)
    assert loss.dtype == torch.float32
    expected = -torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).mean()
    torch.testing.assert_close(loss, expected)
    with loss_context(False):
        torch.testing.assert_close(
            cross_entropy_loss(logits, labels), F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        )
