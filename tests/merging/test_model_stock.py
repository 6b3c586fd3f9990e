"""Model Stock against its closed form t = N cos / (1 + (N - 1) cos) on vectors with known angles."""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge.merging.strategies import TensorContext, build_strategy


def stock(base, deltas, **params):
    s = build_strategy("model_stock", params, [{}] * len(deltas))
    return s.merge_tensor(TensorContext("model.layers.0.mlp.up_proj.weight", s.model_params, 0), base, deltas)


def close(a, b, atol=1e-6):
    assert torch.allclose(a, b, rtol=0, atol=atol), (a, b)


def test_two_task_vectors_at_sixty_degrees():
    # cos 60 = 1/2, N = 2: t = 2 (1/2) / (1 + 1/2) = 2/3; theta = base + 2/3 (d1 + d2) / 2.
    # Lengths do not enter the angle: d2 is twice as long as d1.
    d1 = torch.tensor([1.0, 0.0, 0.0])
    d2 = 2.0 * torch.tensor([0.5, math.sqrt(3) / 2, 0.0])
    base = torch.tensor([1.0, -1.0, 2.0])
    close(stock(base, [d1, d2]), base + (2 / 3) * (d1 + d2) / 2)


def test_three_task_vectors_with_equal_pairwise_angles():
    # Three unit vectors at 60 degrees from each other (pairwise cos 1/2): t = 3 (1/2) / (1 + 2 (1/2)) = 3/4.
    v1 = torch.tensor([1.0, 0.0, 0.0])
    v2 = torch.tensor([0.5, math.sqrt(3) / 2, 0.0])
    v3 = torch.tensor([0.5, 1 / (2 * math.sqrt(3)), math.sqrt(2 / 3)])
    assert abs(float(v1 @ v3) - 0.5) < 1e-6 and abs(float(v2 @ v3) - 0.5) < 1e-6
    base = torch.zeros(3)
    close(stock(base, [v1, 3 * v2, 0.5 * v3]), 0.75 * (v1 + 3 * v2 + 0.5 * v3) / 3)


def test_unequal_angles_use_the_mean_pairwise_cosine():
    # cosines 1 (a, a), 0 (a, b), 0 (a, b): mean 1/3, N = 3: t = 1 / (1 + 2/3) = 3/5.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    close(stock(torch.zeros(2), [a, a, b]), 0.6 * (2 * a + b) / 3)


def test_orthogonal_or_opposed_task_vectors_give_the_base():
    base = torch.tensor([0.5, 0.5])
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    close(stock(base, [a, b]), base)  # cos 0: t = 0
    close(stock(base, [a, -0.5 * a]), base)  # cos -1 is clamped to 0 (the formula would extrapolate)
    close(stock(base, [a, torch.zeros(2)]), base)  # a zero task vector has no angle: cos 0


@pytest.mark.parametrize("n", [2, 3, 5])
def test_identical_task_vectors_give_the_fine_tune(n):
    d = torch.tensor([[0.25, -1.0], [2.0, 0.5]])
    base = torch.ones(2, 2)
    close(stock(base, [d] * n), base + d)


def test_filter_wise_takes_one_ratio_per_row():
    # Row 0: identical rows (cos 1, t = 1) -> their mean; row 1: orthogonal rows (cos 0) -> base.
    d1 = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    d2 = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    base = torch.zeros(2, 2)
    close(stock(base, [d1, d2], filter_wise=True), torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    # per tensor: cos = (1 + 4) / (sqrt 6 sqrt 14) = 0.5455, t = 2 cos / (1 + cos) = 0.7059
    cos = 5 / math.sqrt(6 * 14)
    close(stock(base, [d1, d2]), 2 * cos / (1 + cos) * (d1 + d2) / 2)


def test_bfloat16_inputs_keep_their_dtype():
    d = torch.tensor([1.0, 2.0, 3.0]).bfloat16()
    out = stock(torch.zeros(3).bfloat16(), [d, d])
    assert out.dtype == torch.bfloat16 and torch.equal(out, d)


def test_a_negative_cosine_is_kept_only_when_asked_as_mergekit_does():
    # Two task vectors at 120 degrees: cos = -1/2. With N = 2, t = 2 cos / (1 + cos) = -2.
    base = torch.tensor([1.0, 1.0])
    d1, d2 = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, math.sqrt(3) / 2])
    close(stock(base, [d1, d2]), base)  # default: the base
    avg = (d1 + d2) / 2
    close(stock(base, [d1, d2], negative_cosine="keep"), base - 2.0 * avg)
    # Exactly opposed (cos = -1): 1 + cos = 0, the formula has no value; t is 0.
    close(stock(base, [d1, -d1], negative_cosine="keep"), base)
