"""SLERP: endpoints, a hand-computed quarter circle, the colinear fallback, two models only."""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge.merging.strategies import StrategyError, TensorContext, build_strategy


def slerp(base, deltas, **params):
    s = build_strategy("slerp", params, [{}] * len(deltas))
    return s.merge_tensor(TensorContext("w", s.model_params, 0), base, deltas)


def test_endpoints_give_each_model_exactly():
    g = torch.Generator().manual_seed(0)
    base, d0, d1 = (torch.randn(5, 7, generator=g) for _ in range(3))
    assert torch.equal(slerp(base, [d0, d1], t=0.0), base + d0)
    assert torch.equal(slerp(base, [d0, d1], t=1.0), base + d1)


def test_orthogonal_vectors_follow_the_arc():
    # theta_0 = (1, 0), theta_1 = (0, 2): Omega = 90 degrees, at t the weights are
    # sin((1 - t) pi/2) and sin(t pi/2), so t = 1/3 gives (cos 30, 2 sin 30) = (0.8660, 1.0).
    base = torch.zeros(2)
    out = slerp(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])], t=1 / 3)
    assert torch.allclose(out, torch.tensor([math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)]), atol=1e-6)
    # the linear midpoint would be (0.5, 1.0): SLERP keeps more of each end
    mid = slerp(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])], t=0.5)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5)]), atol=1e-6)


def test_colinear_and_zero_vectors_fall_back_to_linear_interpolation():
    base = torch.zeros(3)
    v = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(slerp(base, [v, 3 * v], t=0.25), 1.5 * v)  # (1 - t) 1 + t 3 = 1.5
    assert torch.allclose(slerp(base, [v, -v], t=0.25), 0.5 * v)  # antiparallel: linear too
    assert torch.allclose(slerp(base, [torch.zeros(3), v], t=0.25), 0.25 * v)
    # identical inputs give the input back
    assert torch.equal(slerp(base + 1, [v, v], t=0.7), base + 1 + v)


def test_slerp_merges_exactly_two_models():
    with pytest.raises(StrategyError, match="at most 2 models, got 3"):
        build_strategy("slerp", {"t": 0.5}, [{}, {}, {}])
    with pytest.raises(StrategyError, match=r"parameters\.t"):
        build_strategy("slerp", {"t": 1.5}, [{}, {}])
