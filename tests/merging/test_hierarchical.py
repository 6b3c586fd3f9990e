"""Hierarchical Cosine-OT-LERP: Algorithm 1 by hand, function preservation, N models."""

from __future__ import annotations

import pytest
import torch

from fedmerge.merging import align
from fedmerge.merging.strategies import TensorContext, build_strategy
from strategy_helpers import logits_of, merge_states, state_of, tiny_gqa_model


def hier(base, deltas, params=None, model_params=None):
    s = build_strategy("hierarchical", params or {}, model_params or [{}] * len(deltas))
    return s.merge_tensor(TensorContext("model.layers.0.mlp.up_proj.weight", s.model_params, 0), base, deltas)


def test_algorithm_1_by_hand():
    # base = (1, 1), delta_A = (1, 0), delta_B = (1, 1): cos = 1 / sqrt(2), w = 0.7071
    # theta = (1 - w) p_A + w p_B = (1 - w)(2, 1) + w (2, 2) = (2, 1 + w)
    base = torch.tensor([1.0, 1.0])
    out = hier(base, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])])
    w = 2**-0.5
    assert torch.allclose(out, torch.tensor([2.0, 1.0 + w]), atol=1e-6)


def test_negative_or_undefined_similarity_keeps_the_reference():
    base = torch.tensor([1.0, 1.0])
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.5])
    # cos < 0 -> w = 0 -> theta = p_A
    assert torch.equal(hier(base, [a, b]), base + a)
    # a zero delta has no direction -> w = 0
    assert torch.equal(hier(base, [a, torch.zeros(2)]), base + a)
    # reference 1: the roles swap, theta = p_B
    assert torch.equal(hier(base, [a, b], {"reference": 1}), base + b)


def test_n_models_average_the_pairwise_merges_with_the_reference():
    # base 0; A = (1, 0), B = (1, 1) (w_B = 1/sqrt 2), C = (0, 1) (w_C = 0), D = (2, 0) (w_D = 1)
    # theta = p_A + 1/3 [w_B (p_B - p_A) + w_C (p_C - p_A) + w_D (p_D - p_A)]
    #       = (1, 0) + 1/3 [0.7071 (0, 1) + 0 + 1 (1, 0)] = (4/3, 0.2357)
    ds = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.0])]
    out = hier(torch.zeros(2), ds)
    assert torch.allclose(out, torch.tensor([4 / 3, 2**-0.5 / 3]), atol=1e-6)
    # weights change the shares c_m among the non-reference models: [_, 2, 1, 1] -> 1/2, 1/4, 1/4
    out = hier(torch.zeros(2), ds, model_params=[{}, {"weight": 2.0}, {}, {}])
    assert torch.allclose(out, torch.tensor([1.25, 2**-0.5 / 2]), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_pair():
    """Base, a fine-tune A of it, and perm(A): A with every attention block's heads permuted."""
    base_model, cfg = tiny_gqa_model(seed=0)
    base = state_of(base_model)
    g = torch.Generator().manual_seed(1)
    a = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v for k, v in base.items()}
    config = cfg.to_dict()
    perm = align.BlockAlignment((1, 0), (6, 4, 7, 5, 2, 0, 1, 3))
    pa = dict(a)
    for block in align.attention_blocks(list(a), config):
        pa = align.apply_block_permutation(pa, block, perm)
    return base, a, pa, cfg


def test_hierarchical_of_a_and_its_permutation_computes_a(tiny_pair):
    base, a, pa, cfg = tiny_pair
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    config = cfg.to_dict()
    want = logits_of(cfg, a, ids)
    assert torch.allclose(logits_of(cfg, pa, ids), want, atol=1e-5)  # same function, other layout
    merged = merge_states("hierarchical", base, [a, pa], config=config)
    assert torch.allclose(logits_of(cfg, merged, ids), want, atol=1e-4)
    # Averaging the weights without alignment mixes unrelated heads: A's function is lost.
    naive = merge_states("linear", base, [a, pa], config=config)
    assert (logits_of(cfg, naive, ids) - want).abs().max() > 100 * 1e-4
    # The literal Algorithm 1 weight (cosine before alignment) also ends at A: the aligned copy
    # of perm(A) is A itself, whatever weight it gets.
    literal = merge_states("hierarchical", base, [a, pa], {"similarity": "unaligned"}, config=config)
    assert torch.allclose(logits_of(cfg, literal, ids), want, atol=1e-4)


def test_hierarchical_records_the_alignment_it_used(tiny_pair):
    base, a, pa, cfg = tiny_pair
    s = build_strategy("hierarchical", {}, [{}, {}])
    names = list(base)
    groups = s.groups(names, cfg.to_dict())
    blocks = [g for g in groups if len(g) > 1]
    assert len(blocks) == 2 and sorted(n for g in groups for n in g) == sorted(names)
    for group in blocks:
        # Grouping is stateless: each group's contexts carry the base's config it is read from.
        ctxs = [TensorContext(n, s.model_params, 0, config=cfg.to_dict()) for n in group]
        s.merge_group(ctxs, [base[n] for n in group], [[a[n] - base[n], pa[n] - base[n]] for n in group])
    rec = s.alignments[(0, 1)]
    assert rec.heads_moved == 8 and rec.kv_perm == (1, 0)


def test_three_models_with_alignment(tiny_pair):
    # N = 3: A, perm(A) and A again, reference A: every pairwise merge is A, so is their mean.
    base, a, pa, cfg = tiny_pair
    merged = merge_states("hierarchical", base, [a, pa, a], config=cfg.to_dict())
    for k in a:
        assert torch.allclose(merged[k], a[k], atol=1e-5), k


# -- mode: symmetric ---------------------------------------------------------------------------------


def test_symmetric_mode_by_hand():
    # A = (1, 0), B = (1, 1), C = (0, 1), equal shares 1/3: w_AB = w_BC = 1/sqrt2, w_AC = 0.
    # n_A = n_C = (1 + 1/sqrt2) / 3, n_B = (1 + sqrt2) / 3; votes (1/3) / n: 2 - sqrt2, sqrt2 - 1, 2 - sqrt2
    # sum 3 - sqrt2; theta = [(2 - sqrt2) A + (sqrt2 - 1) B + (2 - sqrt2) C] / (3 - sqrt2) = (1, 1) / (3 - sqrt2)
    ds = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])]
    out = hier(torch.zeros(2), ds, {"mode": "symmetric"})
    assert torch.allclose(out, torch.full((2,), 1 / (3 - 2**0.5)), atol=1e-6)
    # two models: the mean, whatever their cosine (the only symmetric convex rule)
    base = torch.tensor([1.0, 1.0])
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.allclose(hier(base, [a, b], {"mode": "symmetric"}), base + (a + b) / 2, atol=1e-6)


def test_symmetric_mode_counts_a_duplicated_model_once():
    # [A, A, B] with A orthogonal to B: each copy of A agrees with the other, so they share one
    # vote: the result is the mean of A and B, as with [A, B].
    a, b = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 3.0, 0.0])
    base = torch.tensor([1.0, 2.0, 3.0])
    once = hier(base, [a, b], {"mode": "symmetric"})
    twice = hier(base, [a, a, b], {"mode": "symmetric"})
    assert torch.allclose(twice, once, atol=1e-6) and torch.allclose(once, base + (a + b) / 2, atol=1e-6)
    # identical inputs give the input back
    assert torch.allclose(hier(base, [a, a, a], {"mode": "symmetric"}), base + a, atol=1e-6)


def test_symmetric_mode_is_invariant_to_the_order_of_the_models_and_reference_mode_is_not():
    import itertools

    g = torch.Generator().manual_seed(5)
    shared = torch.randn(40, generator=g)
    ds = [shared * s + torch.randn(40, generator=g) for s in (1.0, 0.5, 2.0, 0.0)]
    weights = [1.0, 2.0, 0.5, 1.5]
    base = torch.randn(40, generator=g)
    sym = {"mode": "symmetric"}
    first = hier(base, ds, sym, [{"weight": w} for w in weights])
    for perm in itertools.permutations(range(4)):
        out = hier(base, [ds[i] for i in perm], sym, [{"weight": weights[i]} for i in perm])
        assert torch.allclose(out, first, atol=1e-6), perm
    # the paper's rule stays at its reference: swapping the first two inputs moves the result
    ref = hier(base, ds, None, [{"weight": w} for w in weights])
    swapped = hier(base, [ds[1], ds[0], *ds[2:]], None, [{"weight": w} for w in [weights[1], weights[0], *weights[2:]]])
    assert (ref - swapped).abs().max() > 0.1


def test_symmetric_mode_aligns_every_model_to_the_base(tiny_pair):
    # A and perm(A), in either order: both are brought back to the base's head layout, where they
    # are the same model, so the symmetric merge computes A's function.
    base, a, pa, cfg = tiny_pair
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    config = cfg.to_dict()
    want = logits_of(cfg, a, ids)
    for models in ([a, pa], [pa, a]):
        merged = merge_states("hierarchical", base, models, {"mode": "symmetric"}, config=config)
        assert torch.allclose(logits_of(cfg, merged, ids), want, atol=1e-4)


def test_symmetric_mode_has_no_reference():
    from fedmerge.merging.strategies import StrategyError

    with pytest.raises(StrategyError, match="parameters: .*reference"):
        build_strategy("hierarchical", {"mode": "symmetric", "reference": 1}, [{}, {}])
    with pytest.raises(StrategyError, match="parameters.mode"):
        build_strategy("hierarchical", {"mode": "average"}, [{}, {}])
    with pytest.raises(StrategyError, match="weights sum to zero"):
        build_strategy("hierarchical", {"mode": "symmetric"}, [{"weight": 0.0}, {"weight": 0.0}])


def test_merge_group_needs_nothing_from_groups(tiny_pair):
    # Stateless grouping: a fresh strategy object merges a block from its contexts alone, with the
    # same result as the object that planned the groups.
    base, a, pa, cfg = tiny_pair
    config = cfg.to_dict()
    planner = build_strategy("hierarchical", {}, [{}, {}])
    block = next(g for g in planner.groups(list(base), config) if len(g) > 1)
    ctxs = [TensorContext(n, planner.model_params, 0, config=config) for n in block]
    args = ([base[n] for n in block], [[a[n] - base[n], pa[n] - base[n]] for n in block])
    fresh = build_strategy("hierarchical", {}, [{}, {}])
    for x, y in zip(planner.merge_group(ctxs, *args), fresh.merge_group(ctxs, *args)):
        assert torch.equal(x, y)
