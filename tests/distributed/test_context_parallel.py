import pytest
import torch
from dist_harness import run_ranks
from parity import RunResult, assert_close_runs, debug_args, make_batches, reference_run

from stalwart.parallel.context_parallel import cp_positions, cp_shard

SEQ_LEN = 32  # divisible by 2·cp for cp in {2, 4}


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_rank_i_holds_chunks_i_and_mirror(cp):
    seq_len, c = 16, 16 // (2 * cp)
    x = torch.arange(3 * seq_len).view(3, seq_len)
    owned = []
    for rank in range(cp):
        (local,) = cp_shard([x], rank, cp)
        expected = list(range(rank * c, (rank + 1) * c)) + list(range((2 * cp - 1 - rank) * c, (2 * cp - rank) * c))
        assert local[0].tolist() == expected
        assert torch.equal(local, x[:, expected])
        assert cp_positions(seq_len, rank, cp).tolist() == expected
        owned += expected
    assert sorted(owned) == list(range(seq_len))


def test_shard_along_other_dim_and_together():
    a = torch.arange(2 * 8 * 3).view(2, 8, 3).permute(0, 2, 1)  # seq on dim 2
    b = a + 1000
    la, lb = cp_shard([a, b], 1, 2, seq_dim=2)
    assert torch.equal(la, a[:, :, [2, 3, 4, 5]]) and torch.equal(lb, la + 1000)


def test_indivisible_sequence_names_the_fix():
    with pytest.raises(ValueError, match="multiple of 8"):
        cp_positions(12, 0, 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        cp_shard([torch.zeros(1, 6)], 0, 2)


def test_attention_matches_full_attention_forward_and_backward():
    errors = run_ranks("tests/cp_cases.py:attention_vs_full", world_size=2, timeout=120)
    for rank, errs in enumerate(errors):
        assert max(errs.values()) < 1e-5, (rank, errs)


@pytest.fixture(scope="module")
def reference() -> RunResult:
    args = debug_args()
    return reference_run(args, make_batches(args.vocab_size, steps=5, batch=4, seq_len=SEQ_LEN))


@pytest.mark.parametrize(
    ("world_size", "dp_shard", "cp", "tp"),
    [(2, 1, 2, 1), (4, 1, 4, 1), (4, 2, 2, 1), (4, 1, 2, 2)],
    ids=["cp2", "cp4", "dp2xcp2", "cp2xtp2"],
)
def test_training_matches_single_process(reference, world_size, dp_shard, cp, tp):
    ranks = run_ranks(
        "tests/cp_cases.py:cp_parity",
        world_size=world_size,
        timeout=180,
        dp_shard=dp_shard,
        cp=cp,
        tp=tp,
        seq_len=SEQ_LEN,
    )
    # Each TP group shares one loss; every (dp, cp) slot holds the same token count, so the
    # global loss is the mean of the local means.
    losses = torch.tensor([r.losses for r in ranks]).mean(0).tolist()
    for r in ranks:
        # Parameters per tensor (norm-wise): the attention sums in another order, and AdamW turns
        # fp32 rounding in a near-zero gradient element into a visible change of that one element.
        assert_close_runs(RunResult(losses, r.grad_norms, r.params), reference, params_normwise=True)
