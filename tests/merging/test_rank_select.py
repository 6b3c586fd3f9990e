"""The exact rank-selection kernel: band masks against a stable sort, boundaries against sorted
values, and its invariants (exact count, ties split by index, chunk size and path independence)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.merging.strategies import rank_select as rs


def _reference_topk_mask(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Elements whose ascending rank by (|x|, index) is in [lo, hi): a stable sort, the slow way."""
    order = torch.sort(x.abs(), stable=True).indices
    mask = torch.zeros(x.numel())
    mask[order[lo:hi]] = 1.0
    return mask


def _band_mask(x: torch.Tensor, lo: int, hi: int, chunk: int, sample: int | None = None) -> torch.Tensor:
    f = torch.empty(chunk)
    i = torch.empty(chunk, dtype=torch.int32)
    band = rs.RankBand(x, lo, hi, f, i, sample)
    k1, k2 = torch.empty(chunk), torch.empty(chunk)
    out = [band.mask(x[s:e].abs(), k1, k2).clone() for s, e in rs.chunks(x.numel(), chunk)]
    return torch.cat(out)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(-6, 6), min_size=1, max_size=300),
    lo_frac=st.floats(0, 1),
    width=st.floats(0, 1),
    chunk=st.sampled_from([7, 64, 1024]),
)
def test_rank_band_matches_a_stable_sort_with_heavy_ties(values, lo_frac, width, chunk):
    x = torch.tensor(values, dtype=torch.float32) * 0.25
    n = x.numel()
    lo = int(lo_frac * n)
    hi = min(n, lo + int(width * n))
    assert torch.equal(_band_mask(x, lo, hi, chunk), _reference_topk_mask(x, lo, hi))


@pytest.mark.parametrize("kind", ["ties", "continuous"])
def test_rank_band_on_large_tensors_uses_the_sampled_bracket_exactly(kind):
    g = torch.Generator().manual_seed(6)
    n = 40_000  # a 2048-element sample brackets the ranks; the bracket pass does the rest
    x = torch.randn(n, generator=g)
    if kind == "ties":
        x = (x * 4).round() / 4  # a handful of distinct magnitudes: a bracket holds one value
    for lo, hi in ((n // 2, n), (n // 10, n - n // 100)):
        assert torch.equal(_band_mask(x, lo, hi, 1 << 13, sample=2048), _reference_topk_mask(x, lo, hi))


def test_radix_fallback_finds_exact_values():
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(5000, generator=g), torch.zeros(100), torch.full((300,), 0.5)])
    ranks = [0, 99, 2000, 5399]
    chunk = 1000
    got = rs.radix_boundaries(x, ranks, torch.empty(chunk), torch.empty(chunk, dtype=torch.int32))
    ordered = x.abs().sort().values
    for r, b in zip(ranks, got):
        assert b.value == float(ordered[r])
        assert b.less == int((x.abs() < b.value).sum())
        assert b.equal == int((x.abs() == b.value).sum())
        assert sum(b.equal_per_chunk) == b.equal


# -- invariants --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", [64, 2048, 1 << 15])
def test_sampled_and_radix_boundaries_agree_exactly(sample):
    # Both paths are exact, so they must return the same Boundary whatever the sample size (a
    # small sample takes the bracket path with wide brackets, or misses and falls back).
    g = torch.Generator().manual_seed(8)
    x = torch.cat([(torch.randn(30_000, generator=g) * 8).round() / 8, torch.randn(20_000, generator=g)])
    chunk = 4096
    ranks = [0, 1, 12_345, 25_000, 49_999]
    bufs = (torch.empty(chunk), torch.empty(chunk, dtype=torch.int32))
    assert rs.rank_boundaries(x, ranks, *bufs, sample=sample) == rs.radix_boundaries(x, ranks, *bufs)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.integers(-3, 3), min_size=2, max_size=200),
    k_frac=st.floats(0, 1),
    chunks=st.tuples(st.sampled_from([3, 16, 97]), st.sampled_from([5, 50, 4096])),
)
def test_top_k_keeps_exactly_k_the_latest_of_ties_and_ignores_the_chunk_size(values, k_frac, chunks):
    x = torch.tensor(values, dtype=torch.float32)
    n = x.numel()
    k = int(k_frac * n)
    a, b = (_band_mask(x, n - k, n, c) for c in chunks)
    assert torch.equal(a, b)  # the chunk size is not part of the definition
    assert int(a.sum()) == k  # exactly k, whatever the ties
    if 0 < k < n:
        kept, dropped = x.abs()[a == 1], x.abs()[a == 0]
        assert kept.min() >= dropped.max()  # the largest magnitudes are kept
        # among elements tied at the threshold, the later ones are kept
        t = float(kept.min())
        tied = (x.abs() == t).nonzero().flatten()
        kept_tied = [int(i) for i in tied if a[i] == 1]
        assert kept_tied == [int(i) for i in tied[len(tied) - len(kept_tied):]]


def test_empty_and_full_bands_and_replay_after_reset():
    x = torch.tensor([0.5, -0.25, 0.5, 1.0, 0.0, -0.5])
    f, i = torch.empty(4), torch.empty(4, dtype=torch.int32)
    k1, k2 = torch.empty(4), torch.empty(4)
    empty = rs.RankBand(x, 3, 3, f, i)
    assert empty.empty and empty.kept == 0
    assert all(int(empty.mask(x[s:e].abs(), k1, k2).sum()) == 0 for s, e in rs.chunks(6, 4))
    full = rs.RankBand(x, -2, 99, f, i)  # clipped to [0, n)
    assert full.kept == 6
    assert all(bool((full.mask(x[s:e].abs(), k1, k2) == 1).all()) for s, e in rs.chunks(6, 4))
    # the three 0.5s are tied at the lower boundary of ranks [3, 5): rank order by index puts
    # indices 0, 2, 5 at ranks 2, 3, 4, so indices 2 and 5 are in the band, 0 is not
    band = rs.RankBand(x, 3, 5, f, i)
    first = torch.cat([band.mask(x[s:e].abs(), k1, k2).clone() for s, e in rs.chunks(6, 4)])
    assert first.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    band.reset()  # a replayed pass sees the same mask
    again = torch.cat([band.mask(x[s:e].abs(), k1, k2).clone() for s, e in rs.chunks(6, 4)])
    assert torch.equal(first, again)


def test_half_precision_inputs_are_ranked_exactly():
    # bf16 magnitudes are exact in float32, so a bf16 tensor selects what its float32 copy selects.
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5000, generator=g).bfloat16()
    assert torch.equal(_band_mask(x, 1000, 4000, 512), _reference_topk_mask(x.float(), 1000, 4000))


def test_chunks_cover_the_range_once():
    assert list(rs.chunks(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(rs.chunks(0, 4)) == []


@pytest.mark.parametrize("kind", ["continuous", "few_values", "one_value", "wide_span"])
def test_kth_smallest_magnitude_equals_the_sorted_value(kind):
    g = torch.Generator().manual_seed(11)
    n = 200_000  # above the size it sorts directly: the bit histograms narrow it first
    if kind == "continuous":
        x = torch.rand(n, generator=g)
    elif kind == "few_values":  # bf16 deltas: a few thousand distinct magnitudes, large clusters
        x = (torch.rand(n, generator=g) * 3000).floor() * 2.0**-20
    elif kind == "one_value":
        x = torch.full((n,), 0.125)
    else:  # zeros, subnormals and huge values: the bits span most of the float32 range
        x = torch.cat([torch.zeros(1000), torch.rand(n, generator=g) * 1e-40, torch.rand(n, generator=g) * 1e30])
    ordered = x.sort().values
    for k in (0, 1, x.numel() // 3, x.numel() // 2, x.numel() - 1):
        assert rs.kth_smallest_magnitude(x.clone(), k) == float(ordered[k])
