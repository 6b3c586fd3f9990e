"""``all_finite``: the one cheap finiteness test of float tensors, exact in every case."""

from __future__ import annotations

import pytest
import torch

from fedmerge.checkpoints.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_a_nan_or_an_infinity_anywhere_is_found(dtype):
    x = torch.randn(257, 33).to(dtype)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[200, 7] = bad
        assert not all_finite(y)


def test_finite_values_whose_sum_overflows_are_finite():
    big = torch.full((4, 4), 3.0e38)  # the float32 sum is inf; every value is finite
    assert not torch.isfinite(big.sum())
    assert all_finite(big)
    big[1, 1] = float("nan")
    assert not all_finite(big)


def test_infinities_of_both_signs_that_would_cancel_are_found():
    x = torch.zeros(10)
    x[2], x[5] = float("inf"), float("-inf")  # inf + -inf is nan: still caught, never mistaken for 0
    assert not all_finite(x)


def test_empty_and_strided_tensors():
    assert all_finite(torch.empty(0, 5))
    x = torch.randn(8, 8)
    x[3, 3] = float("nan")
    assert all_finite(x[:, :3].t()) and not all_finite(x[2:5, 2:5].t())


def test_half_precision_values_whose_half_sum_overflows_are_finite():
    big = torch.full((64, 64), 60000.0, dtype=torch.float16)  # the fp16 sum is inf, each value is not
    assert not torch.isfinite(big.sum())
    assert all_finite(big)
    big[63, 63] = float("nan")
    assert not all_finite(big)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_strided_half_precision_views(dtype):
    x = torch.randn(16, 16).to(dtype)
    x[3, 3] = float("-inf")
    assert all_finite(x[:, :3].t()) and not all_finite(x[2:5, 2:5].t())
