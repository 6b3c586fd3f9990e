"""Spectral merges of weight matrices: Iso-C, Iso-CTS and TSV-M.

All three look at each 2-D weight matrix's task matrices Delta_t (t = 1..T, one per model,
scaled by its ``weight``) through their singular value decompositions, per layer, and return
theta = base + alpha * Delta_merged:

- **Iso-C** (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025, arXiv:2502.04959): the task-arithmetic sum
  M = sum_t Delta_t = U S V^T keeps its singular vectors and gets a flat spectrum,
  Delta_merged = mean(S) U V^T.
- **Iso-CTS** (same paper): the top-k directions of M (the common subspace, k about
  ``common_space_fraction`` of the rank) are completed by the top-s directions of each task matrix
  with the common subspace projected out (its task-specific subspace); the concatenated bases are
  orthogonalized and the spectrum flattened to the mean of the kept singular values.
- **TSV-M** (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
  CVPR 2025, arXiv:2412.00081): each task keeps its top floor(r / T) singular triplets; the
  concatenated U and V are orthogonalized (their nearest matrices with orthonormal columns), and
  Delta_merged = U_perp diag(S) V_perp^T, so the tasks' subspaces stop interfering.

Conventions shared by the three:

- SVDs run on ``TensorContext.device`` (the engine's compute device: CUDA when present) in float32,
  whatever the compute dtype; the result comes back in the base tensor's dtype.
- *Numerical support.* A singular value below sigma_max * max(m, n) * eps(float32) (the usual
  numerical-rank tolerance) is zero: its singular vectors are arbitrary, so they are left out of
  the flattened spectrum and of the orthogonalizations (the orthogonal factor of A is taken on
  A's support: P Q^T over the nonzero singular values of A = P S Q^T). For the full-rank task
  matrices of real fine-tunes this is exactly the papers' definitions; for rank-deficient ones
  (LoRA adapters, tests with chosen spectra) it keeps the result deterministic and free of
  directions no model moved in.
- *Tensors that are not matrices* (norms, biases, anything not 2-D) are merged as alpha times the
  weighted mean of their task vectors, the authors' own fallback for non-matrix parameters.
- *Token tables* (input and position embeddings, the LM head: named in ``TOKEN_TABLES``) are 2-D
  and get the spectral treatment by default, as in the authors' code (every 2-D parameter).
  ``token_tables: mean`` merges them by the fallback instead. Measured on the demo world, where
  each hospital's knowledge sits largely in the rows of its own vocabulary, the spectral treatment
  is what makes these methods work: Iso-C at alpha 1.0 scored 61.1 mean accuracy with it and 55.9
  with ``mean`` (alpha 0.75: 59.0 and 52.1; benchmarks/demo_strategies.py). ``mean`` is there for
  vocabularies whose SVD costs too much on CPU (the table is the largest matrix of the model) and
  for experiments; with tied embeddings the one stored table is treated like any other.
- No randomness: the same inputs give the same bytes on one device type.
- *Large matrices through their Gram matrices.* A tall matrix (m >= n) of at least
  ``GRAM_ELEMENTS`` elements is not decomposed directly: its task matrices' cross-Gram matrices
  D_s^T D_t (n x n, float64) are accumulated over row chunks, every method's algebra is done on
  those (the thin SVD of a tall matrix is the eigendecomposition of its Gram matrix: M = U S V^T
  with M^T M = V S^2 V^T, so U = M V S^-1), and the output is streamed row chunk by row chunk as
  base + alpha sum_t D_t F_t, with F_t n x n. The result equals the direct SVD's within float
  tolerance (directions with singular values near the support threshold are the least precise in
  both). What is held is bounded by the matrix's smaller side, not its rows: Iso-C one n x n
  Gram, TSV-M and Iso-CTS T (T + 1) / 2 of them, plus one row chunk of the inputs, whatever the
  vocabulary of an embedding or LM head. The engine streams such a matrix from disk in two passes
  (``streamed``); held in memory, the same object runs over it, so both give the same bytes.
  Wide matrices (m < n) are held whole. From ``GRAM_ELEMENTS`` elements on they are not given
  to a full SVD either: each decomposition takes only the top singular triplets it keeps from the
  float64 Gram matrix of the short side (``gram_svd.top_triplets``: a subset eigendecomposition,
  the long side's vectors recovered slice by slice as X^T U S^-1), Iso-CTS's residuals
  (I - U_k U_k^T) Delta_t are projected slice by slice instead of formed, and the orthogonal
  factor of a large concatenated basis is (B B^T)^-1/2 B from the float64 Gram matrix of its
  short side (``orthogonal_factor``). Only one decomposition's factors are alive at a time, and
  what each holds besides them is one short-side float64 matrix and one slice.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

from pydantic import Field

from fedmerge.merging.strategies.base import (
    FunctionPass,
    ModelParams,
    Strategy,
    StrategyError,
    StrategyParams,
    StreamedTensor,
    TensorContext,
    flat_chunks,
    merge_in_memory,
)
from fedmerge.merging.strategies.gram_svd import long_slice, long_slices, short_gram, top_eigh, top_triplets
from fedmerge.merging.strategies.registry import register

# Tall matrices with at least this many elements go through their Gram matrices (see above).
GRAM_ELEMENTS = 1 << 22
# Elements per row chunk of the Gram passes (whole rows): the Gram matrices are summed chunk by
# chunk, so this is part of the definition of the large-matrix path.
CHUNK = 1 << 22

ISO_PAPER = "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, ICML 2025 (arXiv:2502.04959)"
TSV_PAPER = "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025 (arXiv:2412.00081)"

# Module names (one component of a tensor name) that hold per-token tables.
TOKEN_TABLES = frozenset(
    {
        "embed_tokens",
        "embed_positions",
        "embed_in",
        "embed_out",
        "tok_embeddings",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "shared",
        "lm_head",
    }
)


def is_token_table(name: str) -> bool:
    """Whether a tensor name is an embedding or LM-head table (a component is in ``TOKEN_TABLES``)."""
    return any(part in TOKEN_TABLES for part in name.split("."))


def is_spectral(name: str, tensor, token_tables: str = "spectral") -> bool:
    """Whether a tensor gets the spectral treatment: 2-D, at least 2 x 2, and not a token table
    merged by the mean (``token_tables: mean``)."""
    if tensor.dim() != 2 or min(tensor.shape) < 2:
        return False
    return token_tables == "spectral" or not is_token_table(name)


# -- linear algebra on the support -----------------------------------------------------------------


def _svd(x):
    import torch

    return torch.linalg.svd(x, full_matrices=False)


def support(s, shape):
    """0/1 float mask of the singular values ``s`` (descending or not) that are numerically nonzero."""
    import torch

    tol = s.amax() * (max(shape) * torch.finfo(torch.float32).eps)
    return (s > tol).to(s.dtype)


def orthogonal_factor(a):
    """The orthogonal factor of ``a`` on its support: P Q^T for a = P S Q^T, over S > 0.

    For a with independent columns this is the matrix with orthonormal columns nearest to ``a``
    (Frobenius); columns of ``a`` that are zero stay zero, and repeated columns share one direction.
    A large matrix goes through the float64 Gram matrix of its shorter side (``_orth_large``),
    which needs a fraction of the SVD's working memory.
    """
    if a.numel() >= GRAM_ELEMENTS:
        return _orth_large(a)
    p, s, qh = _svd(a)
    return (p * support(s, a.shape)) @ qh


def _orth_large(a):
    """``orthogonal_factor`` of a large matrix: with B = a (or a^T, whichever is wide, r x n),
    the factor is (B B^T)^-1/2 B over the support; B B^T (r x r) is summed in float64 over slices
    of the long side (``gram_svd.short_gram``), so no float64 copy of ``a`` and no SVD workspace
    is held. The root is Q S^-1/2 (Q S^-1/2)^T, scaled in place: one r x r float64 matrix less."""

    b = a if a.shape[0] <= a.shape[1] else a.T
    sig, q = _eig_desc(short_gram([a]), consume=True)
    keep = _support64(sig, a.shape)
    q.mul_(_inverse(sig, keep).sqrt())
    root = (q @ q.T).to(a.dtype)
    del q
    out = root @ b
    return out if b is a else out.T


def flat_spectrum(u, s, vh):
    """mean(s) u v^T over the support of ``s`` (u, vh orthonormal on it): the isotropic matrix.
    ``u`` is scaled in place (every caller hands over a factor it no longer needs)."""
    keep = support(s, (u.shape[0], vh.shape[1]))
    mean = (s * keep).sum() / keep.sum().clamp(min=1.0)
    return u.mul_(keep * mean) @ vh


def _summed(deltas: Sequence):
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    return total


def iso_c(deltas: Sequence):
    """Iso-C update of one matrix: M = sum_t Delta_t = U S V^T -> mean(S) U V^T.

    A large matrix goes through the Gram matrix G of its short side (M M^T or M^T M, float64):
    mean(S) U V^T = F M (or M F) with F = Q diag(mean(S) / S) Q^T from G's eigenvectors Q, applied
    slice by slice, so neither M nor its SVD is held."""
    if deltas[0].numel() < GRAM_ELEMENTS:
        return flat_spectrum(*_svd(_summed(deltas)))
    m, n = deltas[0].shape
    (f,) = iso_c_from_gram(short_gram(deltas), m, n, consume=True)
    out = deltas[0].new_empty(m, n)
    for lo, hi in long_slices(m, n):
        if m <= n:
            out[:, lo:hi] = f @ long_slice(deltas, lo, hi)
        else:
            out[lo:hi] = (long_slice(deltas, lo, hi).T @ f)
    return out


def common_split(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(k, s): k common directions and s per task, k + tasks * s = rank, k about fraction * rank.

    As the authors do: s = round((rank - int(fraction * rank)) / tasks) (round half to even), then
    k takes the rest; s is lowered if tasks * s would exceed the rank.
    """
    k0 = int(rank * fraction)
    s = round((rank - k0) / tasks)
    while s > 0 and s * tasks > rank:
        s -= 1
    return rank - s * tasks, s


def iso_cts(deltas: Sequence, fraction: float):
    """Iso-CTS update of one matrix (see the module docstring).

    The kept singular triplets are copied into preallocated U_all, V_all^T as each SVD finishes,
    so only one decomposition's factors are alive at a time. A large wide matrix takes its
    triplets from Gram matrices of its short side (``gram_svd.top_triplets``): neither M nor the
    residuals (I - U_k U_k^T) Delta_t are formed."""
    import torch

    shape = deltas[0].shape
    m, n = shape
    rank = min(shape)
    k, s = common_split(rank, len(deltas), fraction)
    r = k + len(deltas) * s
    u_all = deltas[0].new_empty(m, r)
    vh_all = deltas[0].new_empty(r, n)
    s_all = deltas[0].new_empty(r)
    if deltas[0].numel() >= GRAM_ELEMENTS and m < n:
        common = top_triplets(deltas, k, u_all[:, :k], s_all[:k], vh_all[:k])
        for t, d in enumerate(deltas if s else ()):
            cols = slice(k + t * s, k + (t + 1) * s)
            top_triplets([d], s, u_all[:, cols], s_all[cols], vh_all[cols], project=common)
        del common
        factors = [u_all, s_all, vh_all]
        del u_all, s_all, vh_all
        return _iso_cts_finish(factors, shape)
    total = _summed(deltas)
    u, sv, vh = _svd(total)
    del total
    u_all[:, :k], s_all[:k], vh_all[:k] = u[:, :k], sv[:k], vh[:k]
    del u, sv, vh
    if s:
        common = u_all[:, :k]
        for t, d in enumerate(deltas):
            projected = common @ (common.T @ d)
            residual = torch.sub(d, projected, out=projected)  # the task's part outside the common subspace
            cols = slice(k + t * s, k + (t + 1) * s)
            if residual.numel() >= GRAM_ELEMENTS:
                top_triplets([residual], s, u_all[:, cols], s_all[cols], vh_all[cols])
            else:
                tu, ts, tvh = _svd(residual)
                u_all[:, cols], s_all[cols], vh_all[cols] = tu[:, :s], ts[:s], tvh[:s]
                del tu, ts, tvh
            del residual, projected
        del common
    factors = [u_all, s_all, vh_all]
    del u_all, s_all, vh_all
    return _iso_cts_finish(factors, shape)


def _orthogonalized(factors: list, shape):
    """(U_perp, S_all on its support, V_perp^T) from ``factors`` = [U_all, S_all, V_all^T], which
    is emptied so each basis is freed as soon as its orthogonal factor exists."""
    u_all, s_all, vh_all = factors
    factors.clear()
    keep = support(s_all, shape)
    u_perp = orthogonal_factor(u_all.mul_(keep))
    del u_all
    vh_perp = orthogonal_factor(vh_all.mul_(keep[:, None]))
    del vh_all
    return u_perp, s_all * keep, vh_perp


def _iso_cts_finish(factors: list, shape):
    """Orthogonalized bases with the flat spectrum (``factors`` as for ``_orthogonalized``)."""
    return flat_spectrum(*_orthogonalized(factors, shape))


def tsv_m(deltas: Sequence):
    """TSV-M update of one matrix: top floor(r / T) triplets per task, orthogonalized, summed."""
    m, n = deltas[0].shape
    k = max(1, min(m, n) // len(deltas))  # at least one per task on matrices smaller than T
    r = k * len(deltas)
    u_all = deltas[0].new_empty(m, r)
    vh_all = deltas[0].new_empty(r, n)
    s_all = deltas[0].new_empty(r)
    for t, d in enumerate(deltas):
        cols = slice(t * k, (t + 1) * k)  # k <= min(m, n): spectral matrices are at least 2 x 2
        if d.numel() >= GRAM_ELEMENTS:  # the triplets from the short side's Gram matrix
            top_triplets([d], k, u_all[:, cols], s_all[cols], vh_all[cols])
            continue
        u, s, vh = _svd(d)
        u_all[:, cols], s_all[cols], vh_all[cols] = u[:, :k], s[:k], vh[:k]
        del u, s, vh
    factors = [u_all, s_all, vh_all]
    del u_all, s_all, vh_all
    u_perp, kept, vh_perp = _orthogonalized(factors, (m, n))
    return u_perp.mul_(kept) @ vh_perp


# -- the same updates from Gram matrices (large tall matrices) ---------------------------------------
#
# Each function takes the task matrices' cross-Gram matrices gram(s, t) = D_s^T D_t (n x n,
# float64) and returns, per task, the n x n matrix F_t with Delta_merged = sum_t D_t F_t.


def _eig_desc(g, consume: bool = False):
    """Singular values (descending) and right singular vectors of a matrix whose Gram matrix is
    ``g`` (float64); ``consume``: ``g`` may be overwritten (it is not copied)."""
    lam, v = top_eigh(g if consume else g.clone(), g.shape[0])
    return lam.clamp(min=0.0).sqrt(), v


def _support64(s, shape):
    """``support`` in float64, with the same float32 tolerance (boolean)."""
    import torch

    return s > s.amax() * (max(shape) * torch.finfo(torch.float32).eps)


def _inverse(s, keep):
    import torch

    return torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))


def _orth_from_gram(w, shape):
    """Z with A Z = the orthogonal factor of A (on its support), from W = A^T A."""
    sig, q = _eig_desc(w, consume=True)
    keep = _support64(sig, shape)
    return (q * _inverse(sig, keep)) @ q.T


def _orth_rows(b, shape):
    """The orthogonal factor of a short, wide matrix ``b`` held whole: (B B^T)^-1/2 B on its support."""
    sig, q = _eig_desc(b @ b.T, consume=True)
    keep = _support64(sig, shape)
    return ((q * _inverse(sig, keep)) @ q.T) @ b


def _sum_gram(gram: Callable[[int, int], Any], tasks: int):
    total = None
    for a in range(tasks):
        for b in range(tasks):
            total = gram(a, b).clone() if total is None else total.add_(gram(a, b))
    return total


def iso_c_from_gram(g, m: int, n: int, consume: bool = False) -> list:
    """Iso-C from the Gram matrix of the summed task matrix M (one task): M P = mean(S) U V^T
    (``consume``: ``g`` may be overwritten)."""
    s, v = _eig_desc(g, consume)
    keep = _support64(s, (m, n))
    mean = (s * keep).sum() / keep.sum().clamp(min=1)
    return [(v * (_inverse(s, keep) * mean)) @ v.T]


def tsv_m_from_gram(gram: Callable[[int, int], Any], tasks: int, m: int, n: int) -> list:
    """TSV-M (see ``tsv_m``) from the tasks' cross-Gram matrices."""
    import torch

    k = max(1, min(m, n) // tasks)
    vs, ss = [], []
    for t in range(tasks):
        s, v = _eig_desc(gram(t, t))
        vs.append(v[:, :k].clone())  # not a view: the full eigenbasis is freed
        ss.append(s[:k])
        del s, v
    s_all = torch.cat(ss)
    keep = _support64(s_all, (m, n))
    inv = _inverse(s_all, keep)
    es = [vs[t] * inv[t * k : (t + 1) * k] for t in range(tasks)]  # U_t,k = D_t E_t (0 off the support)
    # Each n x n float64 intermediate is dropped once used: these are the path's working memory.
    vh_perp = _orth_rows(torch.cat([v.T for v in vs], 0).mul_(keep[:, None]), (tasks * k, n))
    del vs
    w = es[0].new_empty(tasks * k, tasks * k)
    for a in range(tasks):
        for b in range(tasks):
            w[a * k : (a + 1) * k, b * k : (b + 1) * k] = es[a].T @ gram(a, b) @ es[b]
    z = _orth_from_gram(w, (m, tasks * k))
    del w
    tail = z @ vh_perp.mul_((s_all * keep)[:, None])
    del z, vh_perp
    return [es[t] @ tail[t * k : (t + 1) * k] for t in range(tasks)]


def iso_cts_from_gram(gram: Callable[[int, int], Any], tasks: int, m: int, n: int, fraction: float) -> list:
    """Iso-CTS (see ``iso_cts``) from the tasks' cross-Gram matrices.

    U_k = M V_k S_k^-1; A_t = U_k^T D_t; the residual R_t = D_t - U_k A_t has Gram matrix
    D_t^T D_t - A_t^T A_t; everything, down to the output, is D_t times an n x r matrix."""
    import torch

    rank = min(m, n)
    k, s_task = common_split(rank, tasks, fraction)
    s_m, v_m = _eig_desc(_sum_gram(gram, tasks), consume=True)
    v_k, inv_k = v_m[:, :k], _inverse(s_m[:k], _support64(s_m, (m, n))[:k])
    common = v_k * inv_k  # U_k = sum_u D_u common
    a = [sum(common.T @ gram(u, t) for u in range(tasks)) for t in range(tasks)]  # A_t = U_k^T D_t = common^T M^T D_t  (k x n)
    v_ts, s_ts = [], []
    for t in range(tasks):
        if s_task:
            s, v = _eig_desc(gram(t, t) - a[t].T @ a[t], consume=True)
            v_ts.append(v[:, :s_task].clone())  # not a view: the full eigenbasis is freed
            s_ts.append(s[:s_task])
            del s, v
    s_all = torch.cat([s_m[:k], *s_ts])
    keep = _support64(s_all, (m, n))
    inv = _inverse(s_all, keep)
    r = s_all.numel()
    # E_u: U_all = sum_u D_u E_u; column block 0 the common directions, block t task t's own.
    es = [torch.zeros(n, r, dtype=v_m.dtype, device=v_m.device) for _ in range(tasks)]
    for u in range(tasks):
        es[u][:, :k] = common * keep[:k]
    for t in range(tasks if s_task else 0):  # no task-specific directions: the common ones alone
        cols = slice(k + t * s_task, k + (t + 1) * s_task)
        own = v_ts[t] * inv[cols]  # U_t,s = R_t V_t,s / s = D_t own - U_k A_t own
        es[t][:, cols] += own
        shift = common @ (a[t] @ own)
        for u in range(tasks):
            es[u][:, cols] -= shift
    # Each n x n float64 intermediate is dropped once used: these are the path's working memory.
    del a, common
    vh_perp = _orth_rows(torch.cat([v_k.T, *[v.T for v in v_ts]], 0).mul_(keep[:, None]), (r, n))
    del v_k, v_m, v_ts
    w = None
    for x in range(tasks):
        for y in range(tasks):
            term = es[x].T @ gram(x, y) @ es[y]
            w = term if w is None else w.add_(term)
            del term
    z = _orth_from_gram(w, (m, r))
    del w
    kept = s_all * keep
    keep2 = _support64(kept, (m, n))
    mean = (kept * keep2).sum() / keep2.sum().clamp(min=1)
    tail = z @ vh_perp.mul_((keep2 * mean)[:, None])
    del z, vh_perp
    return [e @ tail for e in es]


class GramTensor(StreamedTensor):
    """A tall matrix (m >= n) merged from Gram matrices: one pass accumulates them over row
    chunks (float64), the method turns them into the per-task F_t, a second pass writes
    base + alpha sum_t D_t F_t chunk by chunk. Iso-C works on the summed task matrix alone."""

    def __init__(self, method: "SpectralMerge", shape, weights: Sequence[float], present: Sequence[bool], device, chunk: int = CHUNK):
        m, n = int(shape[0]), int(shape[1])
        self.method, self.m, self.n, self.device = method, m, n, device
        self.used = [(i, w) for i, (w, has) in enumerate(zip(weights, present)) if w > 0.0 and has]
        self.summed = isinstance(method, IsoC)
        self.chunks = flat_chunks(m * n, chunk, n)
        self.factors: list | None = None

    def _tasks(self, deltas, rows: int) -> list:
        """The weighted float32 task matrices of one row chunk (their sum for Iso-C)."""
        import torch

        dev = torch.device(self.device)
        ds = []
        for i, w in self.used:
            d32 = deltas[i].to(device=dev, dtype=torch.float32).view(rows, self.n)
            ds.append(d32 * w if w != 1.0 else d32)
        if self.summed and ds:
            total = ds[0].clone()
            for d in ds[1:]:
                total.add_(d)
            return [total]
        return ds

    def passes(self):
        import torch

        if not self.used:
            return
        k = 1 if self.summed else len(self.used)
        grams: dict[tuple[int, int], Any] = {}

        def observe(start, end, base, deltas):
            xs = [x.double() for x in self._tasks(deltas, (end - start) // self.n)]
            for a in range(k):
                for b in range(a, k):
                    g = grams.get((a, b))
                    if g is None:
                        grams[a, b] = xs[a].T @ xs[b]
                    else:
                        g.addmm_(xs[a].T, xs[b])

        yield FunctionPass(observe)

        def gram(a: int, b: int):
            return grams[a, b] if a <= b else grams[b, a].T

        factors = self.method.update_from_gram(gram, k, self.m, self.n)
        self.factors = [f.to(device=torch.device(self.device), dtype=torch.float32) for f in factors]

    def merge(self, start, end, base, deltas, out=None):
        import torch

        rows = (end - start) // self.n
        b32 = base.to(device=torch.device(self.device), dtype=torch.float32).view(rows, self.n)
        if self.factors is None:
            merged = b32.clone()
        else:
            tasks = self._tasks(deltas, rows)
            update = tasks[0] @ self.factors[0]
            for x, f in zip(tasks[1:], self.factors[1:]):
                update.addmm_(x, f)
            merged = torch.add(b32, update, alpha=self.method.params.alpha)
        merged = merged.reshape(-1).to(base.dtype)
        if out is None:
            return merged
        out.copy_(merged)
        return out


class _MeanTensor(StreamedTensor):
    """Tensors that are not matrices: alpha times the weighted mean of the task vectors (no pass)."""

    def __init__(self, weights: Sequence[float], alpha: float, numel: int):
        self.weights, self.alpha = list(weights), alpha
        self.chunks = flat_chunks(numel, CHUNK) if numel else [(0, 0)]

    def merge(self, start, end, base, deltas, out=None):
        merged = _weighted_mean(base, deltas, self.weights, self.alpha)
        if out is None:
            return merged
        out.copy_(merged)
        return out


def _weighted_mean(base, deltas, weights, alpha):
    total = sum(weights)
    out = base.clone()
    for w, d in zip(weights, deltas):
        if w > 0.0 and d is not None:
            out.add_(d, alpha=alpha * w / total)
    return out


# -- the strategies ----------------------------------------------------------------------------------


class SpectralParams(StrategyParams):
    alpha: float = Field(1.0, gt=0.0, description="scale of the merged task matrix: theta = base + alpha Delta_merged")
    token_tables: Literal["spectral", "mean"] = Field("spectral", description="embeddings and LM head: spectral like every matrix, or the weighted mean like norms and biases")


class IsoCtsParams(SpectralParams):
    common_space_fraction: float = Field(0.8, ge=0.0, le=1.0, description="share of each matrix's rank given to the common subspace of the summed task matrix")


class SpectralModel(ModelParams):
    weight: float = Field(1.0, ge=0.0, description="scale of this model's task vector before the merge (0 leaves it out)")


class SpectralMerge(Strategy):
    """Shared body: weight matrices through ``update``, every other tensor through the weighted mean."""

    PerModel = SpectralModel
    min_models = 2
    reuse_buffers = False  # Gram and factor matrices set the peak (Iso-CTS: 1,046 MB with reuse, widths set)

    def __init__(self, params: StrategyParams, model_params: Sequence[ModelParams]):
        super().__init__(params, model_params)
        if sum(mp.weight for mp in self.model_params) <= 0.0:
            raise StrategyError(f"{self.name} models[].parameters.weight: the weights sum to zero; at least one model must count")

    def update(self, deltas: Sequence):
        """The merged task matrix of one weight matrix from its weighted float32 task matrices."""
        raise NotImplementedError

    def update_from_gram(self, gram: Callable[[int, int], Any], tasks: int, m: int, n: int) -> list:
        """The same update from the cross-Gram matrices (see ``GramTensor``): per task, F_t."""
        raise NotImplementedError

    def _gram_path(self, name: str, shape) -> bool:
        return len(shape) == 2 and int(shape[0]) >= int(shape[1]) >= 2 and (self.params.token_tables == "spectral" or not is_token_table(name))

    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence):
        import torch

        weights = [mp.weight for mp in ctx.model_params]
        if len(deltas) != len(weights):
            raise StrategyError(f"{self.name}: {len(deltas)} deltas for {ctx.name} but {len(weights)} model parameter sets")
        alpha = self.params.alpha
        if not is_spectral(ctx.name, base, self.params.token_tables):
            return _weighted_mean(base, deltas, weights, alpha)
        used = [(w, d) for w, d in zip(weights, deltas) if w > 0.0 and d is not None]
        if not used:
            return base.clone()
        if base.numel() >= GRAM_ELEMENTS and self._gram_path(ctx.name, base.shape):
            return merge_in_memory(self.streamed(ctx, base.shape, base.dtype, [d is not None for d in deltas]), base, deltas, out=ctx.result_like(base))
        dev = torch.device(ctx.device)
        scaled = []
        for w, d in used:
            d32 = d.to(device=dev, dtype=torch.float32)
            scaled.append(d32 * w if w != 1.0 else d32)
        del used
        merged = self.update(scaled)
        del scaled
        # base + alpha * merged, written over the update (same arithmetic, one matrix less held)
        return torch.add(base.to(device=dev, dtype=torch.float32), merged, alpha=alpha, out=merged).to(base.dtype)

    def streams(self, name: str, shape) -> bool:
        return len(shape) != 2 or min(int(d) for d in shape) < 2 or self._gram_path(name, shape) or (self.params.token_tables == "mean" and is_token_table(name))

    def streamed(self, ctx: TensorContext, shape, dtype, present) -> StreamedTensor:
        weights = [mp.weight for mp in ctx.model_params]
        if self._gram_path(ctx.name, shape):
            return GramTensor(self, shape, weights, present, ctx.device)
        numel = 1
        for dim in shape:
            numel *= int(dim)
        return _MeanTensor(weights, self.params.alpha, numel)


@register
class IsoC(SpectralMerge):
    """Iso-C: task-arithmetic sum of each weight matrix with its singular-value spectrum made flat.

    Per weight matrix, with Delta_t = w_t (theta_t - base):
        M = sum_t Delta_t = U S V^T                  (thin SVD; S over the support of M)
        theta = base + alpha * mean(S) U V^T
    Tensors that are not matrices (norms, biases; token tables with token_tables: mean):
        theta = base + alpha * sum_t w_t delta_t / sum_t w_t.
    The flat spectrum gives every direction of the summed update the same weight, so tasks whose
    directions are weak in the sum are not drowned out. alpha (default 1) is the paper's scaling
    factor, chosen on validation data; it matters (see docs/strategies.md).
    """

    name = "iso_c"
    paper = ISO_PAPER
    Params = SpectralParams

    def update(self, deltas):
        return iso_c(deltas)

    def update_from_gram(self, gram, tasks, m, n):
        return iso_c_from_gram(gram(0, 0), m, n, consume=True)


@register
class IsoCts(SpectralMerge):
    """Iso-CTS: Iso-C's common subspace completed with each task's own directions, then made isotropic.

    Per weight matrix (rank r = min(m, n), T tasks): k common and s per-task directions with
    k + T s = r, k about common_space_fraction * r (``common_split``);
        M = sum_t Delta_t = U S V^T;  common: U_k, S_k, V_k
        task t: (I - U_k U_k^T) Delta_t = U_t S_t V_t^T;  its top s: U_t,s, S_t,s, V_t,s
        U* = orth([U_k, U_1,s .. U_T,s]),  V* = orth([V_k, V_1,s .. V_T,s])   (orthogonal factors)
        theta = base + alpha * mean([S_k, S_1,s .. S_T,s]) U* V*^T
    common_space_fraction 1 is Iso-C. Other tensors: alpha times the weighted mean, as Iso-C.
    """

    name = "iso_cts"
    paper = ISO_PAPER
    Params = IsoCtsParams

    def update(self, deltas):
        return iso_cts(deltas, self.params.common_space_fraction)

    def update_from_gram(self, gram, tasks, m, n):
        return iso_cts_from_gram(gram, tasks, m, n, self.params.common_space_fraction)


@register
class TsvM(SpectralMerge):
    """TSV-M: each task's top singular vectors, decorrelated across tasks, summed with their singular values.

    Per weight matrix (rank r = min(m, n), T tasks, k = floor(r / T), at least 1):
        Delta_t = U_t S_t V_t^T;  keep the top k of each
        U = [U_1,k .. U_T,k],  S = diag(S_1,k .. S_T,k),  V = [V_1,k .. V_T,k]
        theta = base + alpha * orth(U) S orth(V)^T      (orth: the orthogonal factor, P Q^T of P Sigma Q^T)
    Other tensors: alpha times the weighted mean of the task vectors. The paper uses alpha = 1.
    """

    name = "tsv_m"
    paper = TSV_PAPER
    Params = SpectralParams

    def update(self, deltas):
        return tsv_m(deltas)

    def update_from_gram(self, gram, tasks, m, n):
        return tsv_m_from_gram(gram, tasks, m, n)

