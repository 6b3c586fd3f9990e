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
