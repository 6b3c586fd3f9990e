"""The Gram-matrix decompositions the spectral methods use on large matrices held whole
(gram_svd): against torch.linalg.svd in float64, and each method's large-matrix path against its
direct-SVD path, on random wide and tall matrices, full-rank and rank-deficient."""

from __future__ import annotations

import pytest
import torch

from fedmerge.merging.strategies import gram_svd, spectral

SHAPES = [(40, 90), (90, 40), (48, 48)]


def _matrix(m, n, rank, seed):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(m, n, generator=g)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)


def _svd64(x):
    return torch.linalg.svd(x.double(), full_matrices=False)


def _split(monkeypatch, m, n):
    """Several long-side slices, the last one short."""
    monkeypatch.setattr(gram_svd, "PIECE", 7 * min(m, n))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [None, 5])
@pytest.mark.parametrize("k", [3, 12])
def test_top_triplets_equal_the_svd(monkeypatch, shape, rank, k):
    m, n = shape
    _split(monkeypatch, m, n)
    mats = [_matrix(m, n, rank, 1), _matrix(m, n, rank, 2)]
    x = mats[0] + mats[1]
    u_buf, s_buf, vh_buf = torch.full((m, k + 2), 9.0), torch.full((k + 2,), 9.0), torch.full((k + 2, n), 9.0)
    q = gram_svd.top_triplets(mats, k, u_buf[:, 1 : k + 1], s_buf[1 : k + 1], vh_buf[1 : k + 1])
    # only the slices asked for are written
    assert torch.all(u_buf[:, 0] == 9.0) and torch.all(u_buf[:, -1] == 9.0) and torch.all(vh_buf[[0, -1]] == 9.0)
    u, s, vh = u_buf[:, 1 : k + 1], s_buf[1 : k + 1], vh_buf[1 : k + 1]
    pu, ps, pvh = _svd64(x)
    keep = ps[:k] > ps[0] * max(m, n) * torch.finfo(torch.float32).eps
    scale = float(ps[0])
    torch.testing.assert_close(s.double(), ps[:k] * keep + s.double() * ~keep, rtol=0, atol=2e-5 * scale)
    assert torch.all(s[~keep] < 1e-4 * scale)  # what lies below the support is (numerically) zero
    # The triplets on the support: the same rank-one terms (sign-free), and orthonormal vectors.
    j = int(keep.sum())
    torch.testing.assert_close((u[:, :j] * s[:j]) @ vh[:j], ((pu[:, :j] * ps[:j]) @ pvh[:j]).float(), rtol=0, atol=2e-5 * scale)
    torch.testing.assert_close(u[:, :j] @ u[:, :j].T, (pu[:, :j] @ pu[:, :j].T).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(vh[:j].T @ vh[:j], (pvh[:j].T @ pvh[:j]).float(), rtol=0, atol=1e-5)
    # Off the support, the long side's vectors are zero; the short side's are unit vectors.
    long_side = vh if m <= n else u.T
    assert torch.all(long_side[j:] == 0.0)
    assert q.dtype == torch.float64 and q.shape == (min(m, n), k)
    torch.testing.assert_close(q.T @ q, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank", [None, 6])
def test_projected_triplets_equal_the_svd_of_the_residual(monkeypatch, rank):
    """(I - P P^T) D decomposed without forming it equals the SVD of the explicit residual."""
    m, n, k = 30, 80, 8
    _split(monkeypatch, m, n)
    d = _matrix(m, n, rank, 3)
    p = torch.linalg.qr(torch.randn(m, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64))[0]
    u, s, vh = torch.empty(m, k), torch.empty(k), torch.empty(k, n)
    gram_svd.top_triplets([d], k, u, s, vh, project=p)
    residual = d.double() - p @ (p.T @ d.double())
    pu, ps, pvh = _svd64(residual)
    scale = float(ps[0])
    j = int((ps[:k] > ps[0] * n * torch.finfo(torch.float32).eps).sum())
    torch.testing.assert_close(s[:j].double(), ps[:j], rtol=0, atol=2e-5 * scale)
    torch.testing.assert_close((u[:, :j] * s[:j]) @ vh[:j], ((pu[:, :j] * ps[:j]) @ pvh[:j]).float(), rtol=0, atol=2e-5 * scale)
    assert float((p.T.float() @ u[:, :j]).abs().max()) < 1e-6  # the vectors lie outside P's span
    with pytest.raises(ValueError, match="short side"):
        gram_svd.top_triplets([d.T], k, u.T, s, vh.T, project=p)


def test_top_eigh_gives_the_largest_eigenpairs_descending():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(20, 20, generator=g, dtype=torch.float64)
    sym = a @ a.T
    lam, vec = torch.linalg.eigh(sym)
    got_lam, got_vec = gram_svd.top_eigh(sym.clone(), 4)
    torch.testing.assert_close(got_lam, lam.flip(0)[:4], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(sym @ got_vec, got_vec * got_lam, rtol=0, atol=1e-9)
    torch.testing.assert_close(got_vec.T @ got_vec, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert gram_svd.top_eigh(sym.clone(), 0)[1].shape == (20, 0)


def _deltas(m, n, tasks, rank, seed):
    return [_matrix(m, n, rank, seed + t) * 0.01 * (1 + t) for t in range(tasks)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tasks,rank", [(2, None), (3, None), (2, 4), (3, 3)])
@pytest.mark.parametrize("method", ["iso_c", "tsv_m", "iso_cts"])
def test_large_matrix_path_equals_the_direct_svd_path(monkeypatch, shape, tasks, rank, method):
    """Each method's update of a matrix held whole: through gram_svd (above GRAM_ELEMENTS) and by
    torch.linalg.svd (below) agree within float tolerance, rank-deficient tasks included."""
    m, n = shape
    ds = _deltas(m, n, tasks, rank, 11)
    for d in ds:
        d[:, 2] = 0.0  # a column no model moved in
    update = {"iso_c": spectral.iso_c, "tsv_m": spectral.tsv_m, "iso_cts": lambda d: spectral.iso_cts(d, 0.6)}[method]
    direct = update(ds)
    monkeypatch.setattr(spectral, "GRAM_ELEMENTS", 100)
    monkeypatch.setattr(spectral, "CHUNK", 5 * min(m, n))
    _split(monkeypatch, m, n)
    large = update(ds)
    scale = float(direct.abs().max())
    assert scale > 0
    torch.testing.assert_close(large, direct, rtol=0, atol=2e-4 * scale)
    assert torch.all(large[:, 2].abs() <= 1e-5 * scale)
