"""Parallel layout validation: every invalid degree combination fails before any process group."""

import pytest

from stalwart.model.args import get_flavor
from stalwart.parallel.dims import ParallelDims, ParallelLayoutError


def test_dp_shard_fills_the_rest():
    dims = ParallelDims.resolve(dp_replicate=1, dp_shard=-1, cp=2, tp=2, pp=2, world_size=16)
    assert dims.dp_shard == 2 and dims.dp == 2
    assert dims.shape == (2, 1, 2, 2, 2)
    assert dims.describe() == "pp2 × dp_shard2 × cp2 × tp2"


@pytest.mark.parametrize(
    "degrees, world, expected",
    [
        ((1, -1, 1, 3, 1), 8, "world size 8 is not divisible by dp_replicate×cp×tp×pp = 1×1×3×1 = 3"),
        ((1, 2, 1, 2, 1), 8, "= 4 but the world size is 8"),
        ((0, -1, 1, 1, 1), 4, "parallel.dp_replicate = 0 must be at least 1"),
        ((1, 0, 1, 1, 1), 4, "parallel.dp_shard = 0 must be at least 1, or -1"),
    ],
)
def test_world_size_mismatch(degrees, world, expected):
    with pytest.raises(ParallelLayoutError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        ParallelDims.resolve(*degrees, world_size=world)


def test_model_shape_constraints_name_the_valid_choices():
    args = get_flavor("8B")  # 32 heads, 8 kv heads
    with pytest.raises(ParallelLayoutError, match=r"tp=3 does not divide n_heads=32; choose tp in \{1, 2, 4, 8\}"):
        ParallelDims.resolve(1, 1, 1, 3, 1, world_size=3).validate_model(args, seq_len=8192)
    with pytest.raises(ParallelLayoutError, match=r"tp=16 does not divide n_kv_heads=8; choose tp in \{1, 2, 4, 8\}"):
        ParallelDims.resolve(1, 1, 1, 16, 1, world_size=16).validate_model(args, seq_len=8192)
    with pytest.raises(
        ParallelLayoutError, match=r"2·cp = 6 does not divide seq_len=128.*choose cp in \{1, 2, 4, 8, 16, 32, 64\}"
    ):
        ParallelDims.resolve(1, 1, 3, 1, 1, world_size=3).validate_model(get_flavor("debug"), seq_len=128)
    debug = get_flavor("debug")
    with pytest.raises(ParallelLayoutError, match=f"pp=8 is larger than the model's n_layers={debug.n_layers}"):
        ParallelDims.resolve(1, 1, 1, 1, 8, world_size=8).validate_model(debug, seq_len=128)


def test_batch_constraints():
    dims = ParallelDims.resolve(1, -1, 1, 1, 1, world_size=4)
    with pytest.raises(
        ParallelLayoutError, match="global_batch_size=30 is not divisible by dp×microbatch_size = 4×2 = 8"
    ):
        dims.validate_batch(30, 2, 0)
    pp = ParallelDims.resolve(1, -1, 1, 1, 2, world_size=4)
    with pytest.raises(
        ParallelLayoutError,
        match=r"3 pipeline microbatches .* do not divide the local batch global_batch_size/dp = 32/2 = 16; choose "
        r"pp_microbatches in \{1, 2, 4, 8, 16\}",
    ):
        pp.validate_batch(32, 8, 3)
    dims.validate_batch(32, 8, 0)


def test_dp_replicate_can_take_what_is_left_instead_of_dp_shard():
    dims = ParallelDims.resolve(-1, 1, 1, 2, 2, 8)
    assert (dims.dp_replicate, dims.dp_shard) == (2, 1)
    assert ParallelDims.resolve(-1, 2, 1, 1, 1, 8).dp_replicate == 4
    with pytest.raises(ParallelLayoutError, match="both -1; fix one of them"):
        ParallelDims.resolve(-1, -1, 1, 1, 1, 8)
    with pytest.raises(ParallelLayoutError, match="not divisible by dp_shard×cp×tp×pp = 1×1×2×2 = 4"):
        ParallelDims.resolve(-1, 1, 1, 2, 2, 6)
