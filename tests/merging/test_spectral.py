"""Iso-C, Iso-CTS and TSV-M: hand-built matrices with chosen spectra, an independent float64
reference of each paper's formula for N = 2, 3, 5, the conventions (support, fallback, device)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedmerge.merging.strategies import StrategyError, TensorContext, build_strategy
from fedmerge.merging.strategies import spectral
from strategy_helpers import merge_states

MATRIX = "model.layers.0.mlp.up_proj.weight"


def run(method, base, deltas, params=None, model_params=None, name=MATRIX, device="cpu", seed=0, config=None):
    s = build_strategy(method, params or {}, model_params or [{}] * len(deltas))
    return s.merge_tensor(TensorContext(name, s.model_params, seed, device=device, config=config or {}), base, deltas)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def close(a, b, atol=1e-5):
    assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=atol), (a - b).abs().max()


# -- hand-built spectra ------------------------------------------------------------------------------


def test_iso_c_flattens_a_chosen_spectrum():
    # Three tasks in disjoint 2-dimensional blocks of one orthogonal U, V (6 x 6): the summed task
    # matrix has singular values 6, 1, 4, 2, 3, 2 on those directions, mean 18 / 6 = 3, so
    # Iso-C's update is 3 U V^T, and with alpha 0.75 theta = base + 2.25 U V^T.
    u, v = orthogonal(6, 1), orthogonal(6, 2)
    sigma = [(6.0, 1.0), (4.0, 2.0), (3.0, 2.0)]
    deltas = [u[:, 2 * t : 2 * t + 2] @ torch.diag(torch.tensor(s)) @ v[:, 2 * t : 2 * t + 2].T for t, s in enumerate(sigma)]
    base = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    out = run("iso_c", base, deltas, {"alpha": 0.75})
    close(out, base + 2.25 * u @ v.T)
    sv = torch.linalg.svdvals(out - base)
    close(sv, torch.full((6,), 2.25))  # the spectrum is flat


def test_iso_c_leaves_directions_no_model_moved_alone():
    # Two rank-1 tasks in a 5 x 4 matrix: the sum has rank 2 (singular values 3 and 1). Iso-C
    # flattens over its support only: 2 (u0 v0^T + u1 v1^T), nothing along the null directions.
    u, v = orthogonal(5, 4), orthogonal(4, 5)
    d1 = 3.0 * torch.outer(u[:, 0], v[:, 0])
    d2 = 1.0 * torch.outer(u[:, 1], v[:, 1])
    out = run("iso_c", torch.zeros(5, 4), [d1, d2])
    close(out, 2.0 * (torch.outer(u[:, 0], v[:, 0]) + torch.outer(u[:, 1], v[:, 1])))
    assert int(torch.linalg.matrix_rank(out)) == 2


def test_tsv_m_of_tasks_in_orthogonal_subspaces_is_their_sum():
    # Each task has rank 2 <= k = floor(6 / 3): nothing is truncated and the concatenated singular
    # vectors are already orthonormal, so TSV-M is exactly task arithmetic.
    u, v = orthogonal(6, 6), orthogonal(6, 7)
    deltas = [u[:, 2 * t : 2 * t + 2] @ torch.diag(torch.tensor([5.0 - t, 1.0 + t])) @ v[:, 2 * t : 2 * t + 2].T for t in range(3)]
    base = torch.ones(6, 6)
    close(run("tsv_m", base, deltas), base + sum(deltas))
    close(run("tsv_m", base, deltas, {"alpha": 0.5}), base + 0.5 * sum(deltas))


def test_tsv_m_keeps_each_tasks_top_floor_r_over_t_directions():
    # 8 x 8, three tasks: k = floor(8 / 3) = 2. Task t has its two large components on its own
    # directions 2t, 2t+1 and a small third one on direction 6 (shared): the small ones are dropped.
    u, v = orthogonal(8, 8), orthogonal(8, 9)
    top = [u[:, 2 * t : 2 * t + 2] @ torch.diag(torch.tensor([4.0, 3.0])) @ v[:, 2 * t : 2 * t + 2].T for t in range(3)]
    small = [0.5 * torch.outer(u[:, 6], v[:, 6 + (t % 2)]) for t in range(3)]
    out = run("tsv_m", torch.zeros(8, 8), [a + b for a, b in zip(top, small)])
    close(out, sum(top))


def test_iso_cts_adds_each_tasks_own_direction_to_the_common_subspace():
    # 4 x 4, two tasks, common_space_fraction 0.5: k = 2 common directions, s = 1 per task.
    #   task 0 = 10 e1 e1^T + 2 e3 a^T,  task 1 = 8 e2 e2^T + 2 e3 b^T,  a, b = (e3 +- e4) / sqrt 2
    # M = 10 e1 e1^T + 8 e2 e2^T + 2 sqrt2 e3 e3^T. Common: e1, e2 (10, 8). Each task minus the common
    # part is 2 e3 a^T (resp. b^T): its top direction has singular value 2. Orthogonalizing
    # [e1, e2, e3, e3] gives [e1, e2, e3/sqrt2, e3/sqrt2]; [e1, e2, a, b] is orthonormal already.
    # Spectrum mean (10 + 8 + 2 + 2) / 4 = 5.5: update = 5.5 (e1 e1^T + e2 e2^T + e3 (a + b)^T / sqrt2)
    #                                                 = 5.5 (e1 e1^T + e2 e2^T + e3 e3^T).
    # Iso-C instead flattens M over its rank 3: mean (18 + 2 sqrt2) / 3 on the same directions.
    # Both are checked in a random rotation P (.) Q^T of that frame.
    e = torch.eye(4)
    a, b = (e[2] + e[3]) / math.sqrt(2), (e[2] - e[3]) / math.sqrt(2)
    t0 = 10 * torch.outer(e[0], e[0]) + 2 * torch.outer(e[2], a)
    t1 = 8 * torch.outer(e[1], e[1]) + 2 * torch.outer(e[2], b)
    p, q = orthogonal(4, 10), orthogonal(4, 11)
    rot = lambda x: p @ x @ q.T  # noqa: E731
    shape = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0]))
    out = run("iso_cts", torch.zeros(4, 4), [rot(t0), rot(t1)], {"common_space_fraction": 0.5})
    close(out, rot(5.5 * shape))
    iso_c = run("iso_c", torch.zeros(4, 4), [rot(t0), rot(t1)])
    close(iso_c, rot((18 + 2 * math.sqrt(2)) / 3 * shape))


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    g = torch.Generator().manual_seed(12)
    deltas = [torch.randn(9, 7, generator=g) for _ in range(3)]
    base = torch.randn(9, 7, generator=g)
    close(run("iso_cts", base, deltas, {"common_space_fraction": 1.0}), run("iso_c", base, deltas), atol=1e-4)


@pytest.mark.parametrize(
    "rank, tasks, fraction, expected",
    [
        (4, 2, 0.5, (2, 1)),
        (768, 8, 0.8, (616, 19)),  # k0 = 614, s = round(154 / 8) = 19, k = 768 - 152
        (10, 3, 0.8, (7, 1)),  # k0 = 8, s = round(2 / 3) = 1
        (5, 3, 0.0, (2, 1)),  # s = round(5 / 3) = 2 would need 6 > 5 directions: lowered to 1
        (7, 2, 1.0, (7, 0)),
        (6, 4, 0.5, (2, 1)),  # k0 = 3, s = round(3 / 4) = 1, k = 6 - 4
        (9, 2, 0.5, (5, 2)),  # k0 = 4, s = round(2.5) = 2 (half to even, as the authors' round)
    ],
)
def test_common_split(rank, tasks, fraction, expected):
    assert spectral.common_split(rank, tasks, fraction) == expected


@given(rank=st.integers(1, 500), tasks=st.integers(2, 12), fraction=st.floats(0, 1))
def test_common_split_always_fills_the_rank(rank, tasks, fraction):
    k, s = spectral.common_split(rank, tasks, fraction)
    assert k + tasks * s == rank and k >= 0 and s >= 0


# -- identical inputs: what each definition gives --------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])
def test_identical_inputs(n):
    g = torch.Generator().manual_seed(13)
    d = torch.randn(10, 10, generator=g)
    base = torch.randn(10, 10, generator=g)
    u, s, vh = torch.linalg.svd(d)
    # Iso-C: M = n d, whose flattened spectrum is n mean(s) on d's singular vectors.
    close(run("iso_c", base, [d] * n) - base, n * s.mean() * u @ vh, atol=1e-4)
    # TSV-M: every task offers the same top k = floor(10 / n) triplets; orthogonalizing the repeated
    # vectors shares one direction among the copies, leaving the rank-k truncation of d.
    k = 10 // n
    close(run("tsv_m", base, [d] * n) - base, u[:, :k] @ torch.diag(s[:k]) @ vh[:k], atol=1e-4)
    # Weights scale the task matrices before the merge: n copies of weight 1/n sum to d itself.
    w = [{"weight": 1.0 / n}] * n
    close(run("iso_c", base, [d] * n, model_params=w) - base, s.mean() * u @ vh, atol=1e-4)


# -- N models against an independent reference of the formulas -------------------------------------


def _orth64(a):
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def ref_iso_c(ds):
    u, s, vh = torch.linalg.svd(sum(ds), full_matrices=False)
    return s.mean() * u @ vh


def ref_tsv_m(ds):
    k = min(ds[0].shape) // len(ds)
    parts = [torch.linalg.svd(d, full_matrices=False) for d in ds]
    u = torch.cat([p[0][:, :k] for p in parts], 1)
    s = torch.cat([p[1][:k] for p in parts])
    vh = torch.cat([p[2][:k] for p in parts], 0)
    return _orth64(u) @ torch.diag(s) @ _orth64(vh)


def ref_iso_cts(ds, fraction):
    r, t = min(ds[0].shape), len(ds)
    k, s = spectral.common_split(r, t, fraction)
    u, sv, vh = torch.linalg.svd(sum(ds), full_matrices=False)
    us, ss, vhs = [u[:, :k]], [sv[:k]], [vh[:k]]
    for d in ds:
        tu, ts, tvh = torch.linalg.svd(d - u[:, :k] @ u[:, :k].T @ d, full_matrices=False)
        us.append(tu[:, :s])
        ss.append(ts[:s])
        vhs.append(tvh[:s])
    return torch.cat(ss).mean() * _orth64(torch.cat(us, 1)) @ _orth64(torch.cat(vhs, 0))


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("shape", [(12, 10), (10, 15)])
def test_n_models_match_the_float64_reference(n, shape):
    g = torch.Generator().manual_seed(20 + n)
    ds = [torch.randn(*shape, generator=g, dtype=torch.float64) * (1 + i) for i in range(n)]
    base = torch.randn(*shape, generator=g)
    d32 = [d.float() for d in ds]
    close(run("iso_c", base, d32, {"alpha": 0.8}), base + 0.8 * ref_iso_c(ds).float(), atol=2e-4)
    close(run("tsv_m", base, d32), base + ref_tsv_m(ds).float(), atol=2e-4)
    close(run("iso_cts", base, d32, {"common_space_fraction": 0.6}), base + ref_iso_cts(ds, 0.6).float(), atol=2e-4)


# -- what is not a matrix, weights, determinism, device -----------------------------------------------


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv_m"])
def test_non_matrix_tensors_take_alpha_times_the_weighted_mean(method):
    base = torch.tensor([1.0, 2.0, 3.0])
    ds = [torch.tensor([1.0, 0.0, -2.0]), torch.tensor([3.0, 4.0, 2.0])]
    # weights 1 and 3: mean = (1 d1 + 3 d2) / 4 = (2.5, 3, 1); alpha 0.5 -> (1.25, 1.5, 0.5)
    out = run(method, base, ds, {"alpha": 0.5}, [{"weight": 1.0}, {"weight": 3.0}], name="model.norm.weight")
    close(out, base + torch.tensor([1.25, 1.5, 0.5]))


def test_token_tables_are_spectral_by_default_and_averaged_on_request():
    g = torch.Generator().manual_seed(30)
    ds = [torch.randn(16, 8, generator=g) for _ in range(3)]
    base = torch.zeros(16, 8)
    name = "model.embed_tokens.weight"
    close(run("iso_c", base, ds, name=name), ref_iso_c([d.double() for d in ds]).float(), atol=1e-4)
    close(run("iso_c", base, ds, {"token_tables": "mean"}, name=name), sum(ds) / 3)
    close(run("tsv_m", base, ds, {"token_tables": "mean"}, name="lm_head.weight"), sum(ds) / 3)
    # other matrices are spectral whatever token_tables says
    close(run("iso_c", base, ds, {"token_tables": "mean"}), ref_iso_c([d.double() for d in ds]).float(), atol=1e-4)


def test_zero_weight_leaves_a_model_out():
    g = torch.Generator().manual_seed(31)
    ds = [torch.randn(6, 5, generator=g) for _ in range(3)]
    for method in ("iso_c", "tsv_m", "iso_cts"):
        with_zero = run(method, torch.zeros(6, 5), ds, model_params=[{}, {"weight": 0.0}, {}])
        close(with_zero, run(method, torch.zeros(6, 5), [ds[0], ds[2]]))


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv_m"])
def test_deterministic_whatever_the_seed_and_the_visiting_order(method):
    # No randomness: the merge seed and the order tensors are visited in change nothing.
    g = torch.Generator().manual_seed(32)
    base = {"a.weight": torch.randn(8, 6, generator=g), "b.weight": torch.randn(5, 7, generator=g), "c.bias": torch.randn(6, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    a = merge_states(method, base, models, seed=0)
    b = merge_states(method, dict(reversed(list(base.items()))), models, seed=7)
    for k in base:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv_m"])
def test_svd_runs_on_the_context_device(method):
    # Inputs on the CPU, TensorContext.device "meta": the matrix path moves everything to that
    # device and computes there, so the result lives on it (meta tensors carry shapes, no data).
    ds = [torch.randn(6, 4), torch.randn(6, 4)]
    out = run(method, torch.randn(6, 4), ds, device="meta")
    assert out.device.type == "meta" and out.shape == (6, 4) and out.dtype == torch.float32
    # bf16 inputs: the SVD is float32, the result comes back in the base's dtype
    out = run(method, torch.randn(6, 4).bfloat16(), [d.bfloat16() for d in ds])
    assert out.dtype == torch.bfloat16 and out.device.type == "cpu"


# -- parameters ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, params, model_params, field",
    [
        ("iso_c", {"alpha": 0.0}, None, "parameters.alpha"),
        ("iso_c", {"alpha": -1.0}, None, "parameters.alpha"),
        ("iso_c", {"alpha": float("nan")}, None, "parameters.alpha"),
        ("tsv_m", {"alpha": float("inf")}, None, "parameters.alpha"),
        ("iso_cts", {"common_space_fraction": 1.5}, None, "parameters.common_space_fraction"),
        ("iso_cts", {"common_fraction": 0.5}, None, "parameters.common_fraction"),
        ("iso_c", {"token_tables": "svd"}, None, "parameters.token_tables"),
        ("tsv_m", {}, [{"weight": -1.0}, {}], "models[0].parameters.weight"),
        ("iso_c", {}, [{"weight": 0.0}, {"weight": 0.0}], "weight"),
        ("model_stock", {"filter_wise": "rows"}, None, "parameters.filter_wise"),
        ("model_stock", {}, [{"weight": 1.0}, {}], "models[0].parameters.weight"),
    ],
)
def test_bad_parameters_name_the_field(method, params, model_params, field):
    with pytest.raises(StrategyError) as err:
        build_strategy(method, params, model_params or [{}, {}])
    assert field in str(err.value)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv_m", "model_stock"])
def test_one_model_is_refused(method):
    with pytest.raises(StrategyError, match=f"{method} needs at least 2 models, got 1"):
        build_strategy(method, {}, [{}])


@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
@pytest.mark.parametrize("rank", [None, 7])
def test_orthogonal_factor_of_a_large_matrix_from_its_gram_matrix_equals_the_svd(monkeypatch, shape, rank):
    """Above GRAM_ELEMENTS the orthogonal factor comes from the short side's float64 Gram matrix:
    on random matrices, full-rank and rank-deficient (where only the support counts), it equals
    P Q^T of the SVD, has orthonormal rows or columns on the support, and is 0 where a is."""
    g = torch.Generator().manual_seed(31)
    m, n = shape
    a = torch.randn(m, n, generator=g) if rank is None else torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
    a[:, 3] = 0.0  # a zero column stays zero
    p, s, qh = torch.linalg.svd(a.double(), full_matrices=False)
    keep = s > s.amax() * (max(shape) * torch.finfo(torch.float32).eps)
    expected = ((p * keep) @ qh).float()
    monkeypatch.setattr(spectral, "GRAM_ELEMENTS", 1000)
    monkeypatch.setattr(spectral, "CHUNK", 37 * min(shape))  # several column chunks, the last one short
    got = spectral.orthogonal_factor(a)
    close(got, expected, atol=2e-5)
    short = got if m <= n else got.T
    gram = short @ short.T
    assert torch.allclose(torch.diagonal(gram).sum(), torch.tensor(float(keep.sum())), atol=1e-3)
    assert torch.all(got[:, 3] == 0.0) if m <= n else torch.all(got[:, 3].abs() < 1e-6)


@pytest.mark.parametrize("shape", [(12, 10), (10, 15)])
def test_large_matrix_paths_match_the_float64_reference(monkeypatch, shape):
    """With GRAM_ELEMENTS lowered, a tall matrix takes the Gram path and a wide one the direct
    path with Gram-based orthogonal factors: both still match the papers' formulas."""
    monkeypatch.setattr(spectral, "GRAM_ELEMENTS", 100)
    g = torch.Generator().manual_seed(41)
    ds = [torch.randn(*shape, generator=g, dtype=torch.float64) * (1 + i) for i in range(3)]
    base = torch.randn(*shape, generator=g)
    d32 = [d.float() for d in ds]
    close(run("iso_c", base, d32, {"alpha": 0.8}), base + 0.8 * ref_iso_c(ds).float(), atol=2e-4)
    close(run("tsv_m", base, d32), base + ref_tsv_m(ds).float(), atol=2e-4)
    close(run("iso_cts", base, d32, {"common_space_fraction": 0.6}), base + ref_iso_cts(ds, 0.6).float(), atol=2e-4)
