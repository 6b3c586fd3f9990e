"""Head alignment: permuted models keep their function and are aligned back exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.merging import align
from strategy_helpers import logits_of, state_of, tiny_gqa_model

N_HEADS, N_KV = 8, 2
GROUP = N_HEADS // N_KV


@pytest.fixture(scope="module")
def tiny():
    model, cfg = tiny_gqa_model(seed=0)
    return state_of(model), cfg


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def gqa_permutation(kv_perm, within) -> align.BlockAlignment:
    """Slot j of the KV heads takes head kv_perm[j]; its query slot r takes head within[j][r] of that group."""
    q = tuple(kv_perm[j] * GROUP + within[j][r] for j in range(N_KV) for r in range(GROUP))
    return align.BlockAlignment(tuple(kv_perm), q)


def inverse(a: align.BlockAlignment) -> align.BlockAlignment:
    inv = lambda p: tuple(sorted(range(len(p)), key=lambda i: p[i]))  # noqa: E731
    return align.BlockAlignment(inv(a.kv_perm), inv(a.q_perm))


PERM = gqa_permutation((1, 0), ((2, 0, 3, 1), (1, 2, 3, 0)))  # moves every head, not an involution


def permuted(state, config, alignments):
    out = dict(state)
    for block, a in zip(align.attention_blocks(list(state), config), alignments):
        out = align.apply_block_permutation(out, block, a)
    return out


def test_attention_blocks_read_names_and_head_geometry(tiny):
    state, cfg = tiny
    blocks = align.attention_blocks(list(state), cfg.to_dict())
    assert [b.layer for b in blocks] == [0, 1]
    b = blocks[1]
    assert (b.n_heads, b.n_kv_heads, b.head_dim, b.group_size) == (8, 2, 8, 4)
    assert b.names == tuple(f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo")
    # Qwen-style biases are part of the block; o_proj's bias is carried but never moved.
    names = [f"model.layers.3.self_attn.{p}_proj.{k}" for p in "qkvo" for k in ("weight", "bias")] + ["model.layers.3.mlp.up_proj.weight"]
    qb = align.attention_blocks(names, {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32})[0]
    assert qb.q_bias.endswith("q_proj.bias") and qb.v_bias.endswith("v_proj.bias") and qb.head_dim == 8
    assert len(qb.names) == 8


def test_missing_head_geometry_and_wrong_shapes_are_named(tiny):
    state, cfg = tiny
    with pytest.raises(align.AlignmentError, match="num_attention_heads"):
        align.attention_blocks(list(state), {})
    block = align.attention_blocks(list(state), {**cfg.to_dict(), "num_key_value_heads": 4})[0]
    with pytest.raises(align.AlignmentError, match=r"k_proj\.weight has shape \[16, 64\], expected \[32, 64\]"):
        align.block_permutation(state, state, block)
    with pytest.raises(align.AlignmentError, match="not function-preserving"):
        bad = align.BlockAlignment((0, 1), (4, 1, 2, 3, 0, 5, 6, 7))  # query head 4 into group 0
        align.apply_block_permutation(state, align.attention_blocks(list(state), cfg.to_dict())[0], bad)


def test_gqa_head_permutation_keeps_the_function(tiny, ids):
    state, cfg = tiny
    config = cfg.to_dict()
    moved = permuted(state, config, [PERM, PERM])
    assert not torch.equal(moved["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.q_proj.weight"])
    assert torch.allclose(logits_of(cfg, moved, ids), logits_of(cfg, state, ids), atol=1e-5)


def test_permuted_model_is_aligned_back_exactly(tiny):
    state, cfg = tiny
    config = cfg.to_dict()
    moved = permuted(state, config, [PERM, inverse(PERM)])
    for block in align.attention_blocks(list(state), config):
        a = align.block_permutation(state, moved, block)
        assert a.cost_aligned < 1e-6 < a.cost_identity
        assert a.heads_moved == N_HEADS and a.kv_heads_moved == N_KV
        back = align.apply_block_permutation(moved, block, a)
        for name in block.names:
            assert torch.equal(back[name], state[name]), name
    # The recovered permutation is the inverse of the one applied.
    b0 = align.attention_blocks(list(state), config)[0]
    assert align.block_permutation(state, moved, b0) .q_perm == inverse(PERM).q_perm


def test_identical_models_align_to_the_identity(tiny):
    state, cfg = tiny
    block = align.attention_blocks(list(state), cfg.to_dict())[0]
    a = align.block_permutation(state, state, block)
    assert a.is_identity and a.heads_moved == 0 and a.cost_identity == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    kv=st.permutations(range(N_KV)),
    within=st.lists(st.permutations(range(GROUP)), min_size=N_KV, max_size=N_KV),
    noise=st.floats(0.0, 0.05),
)
def test_random_gqa_permutations_are_recovered(tiny, kv, within, noise):
    # Any function-preserving permutation of a (slightly fine-tuned) copy is undone exactly.
    state, cfg = tiny
    block = align.attention_blocks(list(state), cfg.to_dict())[0]
    perm = gqa_permutation(tuple(kv), tuple(tuple(w) for w in within))
    g = torch.Generator().manual_seed(len(kv) + int(noise * 1e6))
    tuned = {n: state[n] + noise * state[n].std() * torch.randn(state[n].shape, generator=g) for n in block.names}
    other = align.apply_block_permutation(tuned, block, perm)
    a = align.block_permutation(state, other, block)
    assert a.q_perm == inverse(perm).q_perm and a.kv_perm == inverse(perm).kv_perm


def test_function_preserving_alignment_never_changes_a_models_function_per_projection_may(ids):
    # Align an unrelated model B to A: the function-preserving permutation leaves B computing
    # exactly what it computed; aligning each projection on its own (Algorithm 2 as written)
    # moves q, k, v and o heads inconsistently and B computes something else.
    a_model, cfg = tiny_gqa_model(seed=1)
    b_model, _ = tiny_gqa_model(seed=2)
    a, b = state_of(a_model), state_of(b_model)
    config = cfg.to_dict()
    fp, pp = dict(b), dict(b)
    moved_any = False
    for block in align.attention_blocks(list(b), config):
        perm = align.block_permutation(a, b, block)
        moved_any |= not perm.is_identity
        fp = align.apply_block_permutation(fp, block, perm)
        pp = align.apply_per_projection(pp, block, align.per_projection_permutations(a, b, block))
    assert moved_any
    base_logits = logits_of(cfg, b, ids)
    assert torch.allclose(logits_of(cfg, fp, ids), base_logits, atol=1e-5)
    assert (logits_of(cfg, pp, ids) - base_logits).abs().max() > 1e-2
