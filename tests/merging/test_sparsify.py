"""TIES, DARE, DELLA and Breadcrumbs against hand-computed results, plus their statistics."""

from __future__ import annotations

import math

import torch

from fedmerge.merging.strategies import TensorContext, build_strategy
from fedmerge.merging.strategies import sparsify as sp


def assert_close(got, want, rtol=1e-6, atol=1e-6):
    # torch.testing.assert_close costs seconds of lazy imports on first use; this is all we need.
    assert got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=atol), (got, want)


def run(method, base, deltas, params=None, model_params=None, name="model.layers.0.mlp.up_proj.weight", seed=0):
    if len(deltas) == 1:
        # Methods need two models: the second one here did not change (zero delta, adds nothing).
        deltas = [deltas[0], torch.zeros_like(deltas[0])]
        model_params = (model_params or [{}]) + [{}]
    s = build_strategy(method, params or {}, model_params or [{}] * len(deltas))
    return s.merge_tensor(TensorContext(name, s.model_params, seed), base, deltas)


D1 = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5, 0.125])
D2 = torch.tensor([-1.0, 1.0, 1.0, 5.0, -0.5, 2.0])


# -- TIES ------------------------------------------------------------------------------------------


def test_ties_trim_elect_disjoint_mean_by_hand():
    # density 0.5 of 6 entries keeps 3 per model.
    # D1 |.| = 1 2 3 4 .5 .125 -> keeps idx 1,2,3:           tau1 = [0, -2, 3, -4, 0, 0]
    # D2 |.| = 1 1 1 5 .5 2    -> keeps 5 (idx 3), 2 (idx 5) and, of the three tied 1s, the one
    #                             with the largest index (idx 2):  tau2 = [0, 0, 1, 5, 0, 2]
    # sum = [0, -2, 4, 1, 0, 2] -> elected + - + + + +
    # agreeing mean: [nothing -> 0, -2/1, (3+1)/2, 5/1, 0, 2/1]
    base = torch.full((6,), 10.0)
    out = run("ties", base, [D1, D2], {"density": 0.5})
    assert torch.equal(out, base + torch.tensor([0.0, -2.0, 2.0, 5.0, 0.0, 2.0]))


def test_ties_weights_apply_before_sign_election_as_mergekit():
    # weights [1, 0.5]: tau1 = [0, -2, 3, -4, 0, 0], tau2 = 0.5 * [0, 0, 1, 5, 0, 2] = [0, 0, .5, 2.5, 0, 1]
    # sum = [0, -2, 3.5, -1.5, 0, 1]: at idx 3 the weighted sum elects - (unweighted it would be +).
    # normalized by the agreeing weights: [0, -2/1, 3.5/1.5, -4/1, 0, 1/0.5]
    out = run("ties", torch.zeros(6), [D1, D2], {"density": 0.5}, [{"weight": 1.0}, {"weight": 0.5}])
    assert_close(out, torch.tensor([0.0, -2.0, 3.5 / 1.5, -4.0, 0.0, 2.0]), rtol=0, atol=1e-6)


def test_ties_divisor_with_a_negative_weight_may_cancel_to_zero():
    # weights [1, -1]: tau1 = [0, -2, 3, -4, 0, 0], tau2 = -1 * [0, 0, 1, 5, 0, 2] = [0, 0, -1, -5, 0, -2]
    # sum = [0, -2, 2, -9, 0, -2] -> elected + - + - + -
    # idx 3: both agree, divisor 1 + (-1) = 0 -> divided by 1: -9; idx 5: only tau2, divisor -1: 2.
    out = run("ties", torch.zeros(6), [D1, D2], {"density": 0.5}, [{"weight": 1.0}, {"weight": -1.0}])
    assert torch.equal(out, torch.tensor([0.0, -2.0, 3.0, -9.0, 0.0, 2.0]))


def test_ties_unnormalized_sums_agreeing_entries_and_lambda_scales():
    # as the first test but without normalize: [0, -2, 3+1, 5, 0, 2], then lambda 0.5
    out = run("ties", torch.zeros(6), [D1, D2], {"density": 0.5, "normalize": False, "lambda": 0.5})
    assert torch.equal(out, 0.5 * torch.tensor([0.0, -2.0, 4.0, 5.0, 0.0, 2.0]))


def test_ties_count_consensus_differs_from_sum():
    # One entry, three models, density 1: deltas -3, 1, 1.
    # sum elects sign(-3 + 1 + 1) = -  -> only -3 agrees -> -3
    # count elects sign(-1 + 1 + 1) = + -> 1 and 1 agree   -> (1 + 1) / 2 = 1
    ds = [torch.tensor([-3.0]), torch.tensor([1.0]), torch.tensor([1.0])]
    assert torch.equal(run("ties", torch.zeros(1), ds, {"consensus": "sum"}), torch.tensor([-3.0]))
    assert torch.equal(run("ties", torch.zeros(1), ds, {"consensus": "count"}), torch.tensor([1.0]))


def test_ties_tie_in_election_elects_plus_and_per_model_density():
    # density [1, 0.5]: model 2 keeps only its largest entry (idx 1).
    # idx 0: 2 + (-2 dropped) = 2 -> +, only model 1 agrees -> 2
    # idx 1: -3 + 3 = 0 -> a tie elects + -> 3 / 1
    d1 = torch.tensor([2.0, -3.0])
    d2 = torch.tensor([-2.0, 3.0])
    out = run("ties", torch.zeros(2), [d1, d2], model_params=[{"density": 1.0}, {"density": 0.5}])
    # model 2's |.| = [2, 3] -> keeps idx 1 only
    assert torch.equal(out, torch.tensor([2.0, 3.0]))


# -- Breadcrumbs -----------------------------------------------------------------------------------

BC = torch.tensor([0.1, -0.9, 0.5, 0.3, -0.2, 0.8, 0.05, -0.6, 0.4, 0.7])


def test_breadcrumbs_drops_largest_gamma_and_smallest_by_hand():
    # n = 10, density 0.6, gamma 0.1: keep 6, drop the 1 largest and the 10 - 6 - 1 = 3 smallest.
    # ascending |.|: .05(6) .1(0) .2(4) | .3(3) .4(8) .5(2) .6(7) .7(9) .8(5) | .9(1)
    expect = torch.tensor([0.0, 0.0, 0.5, 0.3, 0.0, 0.8, 0.0, -0.6, 0.4, 0.7])
    out = run("breadcrumbs", torch.zeros(10), [BC], {"density": 0.6, "gamma": 0.1})
    assert torch.equal(out, expect)


def test_breadcrumbs_without_outliers_to_remove_keeps_the_top_density():
    # gamma 0.01 of 10 entries removes int(0.1) = 0 outliers: the 6 largest stay (mergekit's slicing
    # would keep nothing here; see docs/strategies.md).
    expect = torch.tensor([0.0, -0.9, 0.5, 0.0, 0.0, 0.8, 0.0, -0.6, 0.4, 0.7])
    out = run("breadcrumbs", torch.zeros(10), [BC], {"density": 0.6, "gamma": 0.01})
    assert torch.equal(out, expect)


def test_breadcrumbs_removes_fewer_outliers_when_density_plus_gamma_exceeds_one():
    # density 0.95 -> keep int(9.5) = 9; gamma 0.1 -> 1 outlier; 10 - 9 - 1 = 0 small ones dropped.
    out = run("breadcrumbs", torch.zeros(10), [BC], {"density": 0.95, "gamma": 0.1})
    assert torch.equal(out, BC * (BC.abs() != 0.9))
    # density 1 keeps everything, whatever gamma
    assert torch.equal(run("breadcrumbs", torch.zeros(10), [BC], {"density": 1.0, "gamma": 0.3}), BC)


def test_breadcrumbs_ties_elects_signs_after_masking():
    # model 1 as above (density 0.6, gamma 0.1) -> m1 = [0, 0, .5, .3, 0, .8, 0, -.6, .4, .7]
    # model 2 = -BC with density 1 (nothing removed) -> opposite sign everywhere.
    # Entries where m1 is 0: model 2 alone. Elsewhere sum = m1 - BC: m1 == BC there -> 0 -> elects +,
    # so the positive one of (m1, -BC) survives; unnormalized (the default) it is summed alone.
    m1 = torch.tensor([0.0, 0.0, 0.5, 0.3, 0.0, 0.8, 0.0, -0.6, 0.4, 0.7])
    out = run("breadcrumbs_ties", torch.zeros(10), [BC, -BC], model_params=[{"density": 0.6, "gamma": 0.1}, {"density": 1.0}])
    expect = torch.where(m1 == 0, -BC, torch.where(m1 > 0, m1, -m1))
    assert torch.equal(out, expect)


# -- DELLA -----------------------------------------------------------------------------------------


def test_della_rows_of_two_with_full_epsilon_are_deterministic_by_hand():
    # Rows of length 2, density 0.5, epsilon 0.5: keep probabilities 0 (smaller |.|) and 1 (larger),
    # so each row keeps exactly its larger entry, rescaled by 1/1. A tie in |.| ranks the later one higher.
    d1 = torch.tensor([[1.0, -3.0], [2.0, 0.5], [2.0, -2.0]])  # -> [[0, -3], [2, 0], [0, -2]]
    d2 = torch.tensor([[-2.0, 1.0], [-5.0, 4.0], [1.0, 0.0]])  # -> [[-2, 0], [-5, 0], [1, 0]]
    # della: sum = [[-2, -3], [-3, 0], [1, -2]] -> signs [[-, -], [-, +], [+, -]]
    # agreeing (normalized): [[-2, -3], [-5, nothing -> 0], [1, -2]]
    params = {"density": 0.5, "epsilon": 0.5}
    out = run("della", torch.zeros(3, 2), [d1, d2], params)
    assert torch.equal(out, torch.tensor([[-2.0, -3.0], [-5.0, 0.0], [1.0, -2.0]]))
    # della_linear: plain sum of the pruned vectors, times lambda 2
    out = run("della_linear", torch.zeros(3, 2), [d1, d2], {**params, "lambda": 2.0})
    assert torch.equal(out, 2.0 * torch.tensor([[-2.0, -3.0], [-3.0, 0.0], [1.0, -2.0]]))


def test_della_keep_probability_rises_linearly_with_rank():
    # Rows of 5 entries with distinct magnitudes 1..5 (shuffled); density 0.5, epsilon 0.2:
    # the entry of rank r (0 = smallest) is kept with p = 0.3 + 0.1 r. Without rescale a kept entry
    # equals its delta, so the keep rate per magnitude estimates p; rows are independent draws.
    rows = 20000
    g = torch.Generator().manual_seed(1)
    d = torch.rand(rows, 5, generator=g).argsort(dim=1).float() + 1.0
    out = run("della_linear", torch.zeros(rows, 5), [d], {"density": 0.5, "epsilon": 0.2, "rescale": False})
    for r in range(5):
        p = 0.3 + 0.1 * r
        kept = (out[d == r + 1] != 0).float().mean().item()
        assert abs(kept - p) < 5 * math.sqrt(p * (1 - p) / rows), (r, kept, p)


def test_della_rescale_divides_each_kept_entry_by_its_probability():
    # Same rows, rescale on: every kept entry of rank r equals delta / (0.3 + 0.1 r).
    rows = 50
    g = torch.Generator().manual_seed(2)
    d = torch.rand(rows, 5, generator=g).argsort(dim=1).float() + 1.0
    out = run("della_linear", torch.zeros(rows, 5), [d], {"density": 0.5, "epsilon": 0.2})
    kept = out != 0
    assert kept.any()
    p = 0.3 + 0.1 * (d - 1.0)
    assert_close(out[kept], (d / p)[kept], rtol=1e-6, atol=0)


# -- DARE ------------------------------------------------------------------------------------------


def test_dare_keeps_or_drops_each_entry_and_rescales_by_one_over_density():
    d = torch.linspace(-1.0, 1.0, 1000)
    out = run("dare_linear", torch.zeros(1000), [d], {"density": 0.25})
    kept = out != 0
    assert_close(out[kept], d[kept] / 0.25, rtol=0, atol=1e-6)
    assert 150 < int(kept.sum()) < 350  # Binomial(1000, 0.25): mean 250, sd 13.7


def test_dare_rescale_keeps_the_expectation():
    # One delta of constant value c over n entries, density p: each output entry is c/p with
    # probability p, else 0; mean c, variance c^2 (1 - p) / p; the mean over n entries has
    # standard deviation c sqrt((1 - p) / (p n)). Checked for several seeds within 5 sd.
    n, c, p = 200_000, 0.3, 0.2
    sd = c * math.sqrt((1 - p) / (p * n))
    for seed in range(3):
        out = run("dare_linear", torch.zeros(n), [torch.full((n,), c)], {"density": p}, seed=seed)
        assert abs(out.mean().item() - c) < 5 * sd
    # without rescale the expectation shrinks to p c
    out = run("dare_linear", torch.zeros(n), [torch.full((n,), c)], {"density": p, "rescale": False})
    assert abs(out.mean().item() - p * c) < 5 * c * math.sqrt(p * (1 - p) / n)


def test_dare_l1_rescale_matches_the_original_l1_norm():
    # rescale_mode l1 (mergekit's): the pruned vector is scaled back to sum |delta| exactly.
    d = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    out = run("dare_linear", torch.zeros(10_000), [d], {"density": 0.3, "rescale_mode": "l1"})
    assert_close(out.abs().sum(), d.abs().sum(), rtol=1e-5, atol=0)
    kept = out != 0
    ratio = out[kept] / d[kept]
    assert_close(ratio, torch.full_like(ratio, ratio[0].item()))  # one common scale


def test_dare_ties_is_reproducible_per_tensor_and_seed():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(64, 64, generator=g)
    ds = [torch.randn(64, 64, generator=g) for _ in range(3)]
    p = {"density": 0.5}
    a = run("dare_ties", base, ds, p, seed=7)
    assert torch.equal(a, run("dare_ties", base, ds, p, seed=7))  # same seed, same bytes
    assert not torch.equal(a, run("dare_ties", base, ds, p, seed=8))  # another seed, another mask
    assert not torch.equal(a, run("dare_ties", base, ds, p, seed=7, name="model.layers.1.mlp.up_proj.weight"))


def test_random_masks_do_not_depend_on_chunking():
    # A merge is defined per tensor; the working chunk size is an implementation detail only for
    # the deterministic methods. TIES must give identical bytes whatever the chunk size.
    g = torch.Generator().manual_seed(5)
    base = torch.randn(100_000, generator=g)
    ds = [(torch.randn(100_000, generator=g) * 8).round() / 8 for _ in range(2)]  # heavy ties
    ctx = TensorContext("t", [None, None], 0)
    kw = dict(sparsification="magnitude", consensus="sum", normalize=True, rescale=False, rescale_mode="probability", lambda_=1.0)
    plans = [sp.ModelPlan(1.0, 0.3), sp.ModelPlan(0.5, 0.7)]
    big = sp.generalized_merge(ctx, base, ds, plans, **kw)
    small = sp.generalized_merge(ctx, base, ds, plans, chunk=8192, **kw)
    assert torch.equal(big, small)
