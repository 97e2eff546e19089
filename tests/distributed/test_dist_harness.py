import pytest
from dist_harness import run_ranks


def test_ranks_join_and_return_in_order():
    assert run_ranks("tests/harness_cases.py:allreduce_rank", world_size=3, timeout=60) == [3.0, 3.0, 3.0]


def test_a_failing_rank_fails_the_test_with_its_output():
    with pytest.raises(AssertionError, match="boom on rank one"):
        run_ranks("tests/harness_cases.py:fail_on_rank_one", world_size=2, timeout=60)
