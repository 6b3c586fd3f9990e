"""Top singular triplets of a large matrix from the float64 Gram matrix of its short side.

For X (m x n) with short side p = min(m, n), the Gram matrix of the short side (X X^T when X is
wide, X^T X when it is tall; p x p) has eigenvalues S^2 and eigenvectors the singular vectors of
that side; the other side's vectors follow as X^T Q S^-1 (wide) or X Q S^-1 (tall). The Gram
matrix is summed in float64 over slices of the long side (``PIECE`` elements each), and only the
top k eigenpairs are computed (LAPACK's MRRR driver through SciPy on the CPU, overwriting its
input), so what is held besides the inputs and the outputs is one p x p float64 matrix and one
slice, instead of a full SVD's copy of X, both full factors and its workspace.

Squaring doubles the condition number, which is why the Gram matrix is float64: a singular value
s is then resolved to about 1e-8 sigma_max, far inside the float32 support threshold
(sigma_max * max(m, n) * eps(float32), ``_support``) below which a direction counts as zero and
gets no vector on the other side. Within that support the triplets equal float32
``torch.linalg.svd``'s within float32 tolerance (up to the sign of each pair, and to rotations
inside repeated singular values, neither of which any method here sees).
"""

from __future__ import annotations

from typing import Sequence

# Elements of the long-side slices converted to float64 one at a time.
PIECE = 1 << 20


def _support(s, shape):
    """Boolean mask of the singular values ``s`` above the float32 numerical-rank tolerance."""
    import torch

    return s > s.amax() * (max(shape) * torch.finfo(torch.float32).eps)


def inverse_on_support(s, keep):
    """1 / s where ``keep``, 0 elsewhere."""
    import torch

    return torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))


def top_eigh(g, k: int):
    """The k largest eigenvalues (descending) and their eigenvectors (p x k) of the symmetric
    float64 matrix ``g`` (p x p). ``g`` is consumed: on the CPU its storage is overwritten."""
    import torch

    p = g.shape[0]
    k = max(0, min(int(k), p))
    if k == 0:
        return g.new_zeros(0), g.new_zeros(p, 0)
    if g.device.type == "cpu" and g.dtype == torch.float64:
        from scipy.linalg import eigh

        # The k smallest of -g are g's k largest, already in descending order (no reversed
        # copy). g is symmetric: its transpose is the same matrix in the column-major order
        # LAPACK works in, so overwrite_a really overwrites instead of copying.
        lam, vec = eigh(g.detach().neg_().numpy().T, subset_by_index=[0, k - 1], overwrite_a=True, check_finite=False, driver="evr")
        return torch.from_numpy(lam).neg_(), torch.from_numpy(vec)
    lam, vec = torch.linalg.eigh(g)
    return lam[p - k :].flip(0), vec[:, p - k :].flip(1)


def long_slices(m: int, n: int):
    """(lo, hi) slices of the long side of an m x n matrix, ``PIECE`` elements each at most."""
    step = max(1, PIECE // min(m, n))
    long = n if m <= n else m
    return [(lo, min(long, lo + step)) for lo in range(0, long, step)]


def long_slice(mats: Sequence, lo: int, hi: int, buf=None, project=None):
    """The float64 sum of ``mats``' slice lo:hi of the long side, short side first (p x c):
    columns of a wide (or square) matrix, rows of a tall one, transposed. Written into ``buf``
    (p x c or wider, reused from slice to slice so the heap sees one block) when given;
    ``project`` (p x j, orthonormal columns): with its span projected out."""
    import torch

    m, n = mats[0].shape
    parts = [d[:, lo:hi] if m <= n else d[lo:hi].T for d in mats]
    if buf is None:
        out = parts[0].to(torch.float64, copy=True)
    else:
        out = buf[:, : hi - lo]
        out.copy_(parts[0])
    for part in parts[1:]:
        out.add_(part)
    if project is not None:
        out.sub_(project @ (project.T @ out))
    return out


def slice_buffer(mats: Sequence):
    """A float64 buffer for ``long_slice``: the short side times the widest slice."""
    import torch

    m, n = mats[0].shape
    lo, hi = long_slices(m, n)[0]
    return mats[0].new_empty(min(m, n), hi - lo, dtype=torch.float64)


def short_gram(mats: Sequence, buf=None, project=None):
    """Gram matrix of the short side of X = sum(mats) (of (I - project project^T) X with
    ``project``), float64, summed over long-side slices (X itself is never formed)."""
    m, n = mats[0].shape
    buf = slice_buffer(mats) if buf is None else buf
    g = None
    for lo, hi in long_slices(m, n):
        piece = long_slice(mats, lo, hi, buf, project)
        g = piece @ piece.T if g is None else g.addmm_(piece, piece.T)
    return g


def top_triplets(mats: Sequence, k: int, u_out, s_out, vh_out, project=None):
    """Writes the top k singular triplets of X = sum(mats) (m x n) into ``u_out`` (m x k),
    ``s_out`` (k) and ``vh_out`` (k x n), slices of larger buffers being filled; returns the
    short side's singular vectors in float64 (p x k).

    ``project`` (wide X only; m x j, orthonormal columns, float64): decompose (I - PP^T) X
    instead, without forming it. Directions off the support get zero vectors on the long side.
    """
    import torch

    m, n = mats[0].shape
    wide = m <= n
    if project is not None and not wide:
        raise ValueError("top_triplets projects the short side only (a wide matrix's columns)")
    if k == 0:
        return mats[0].new_zeros(min(m, n), 0, dtype=torch.float64)
    buf = slice_buffer(mats)
    g = short_gram(mats, buf, project)
    lam, q = top_eigh(g, k)
    del g
    s = lam.clamp(min=0.0).sqrt()
    if project is not None:  # the eigenvectors lie in the complement; make it exact
        q.sub_(project @ (project.T @ q))
    inv = inverse_on_support(s, _support(s, (m, n)))
    s_out.copy_(s)
    (u_out if wide else vh_out.T).copy_(q)
    other = vh_out if wide else u_out.T  # k x (long side)
    for lo, hi in long_slices(m, n):
        other[:, lo:hi].copy_(q.T @ long_slice(mats, lo, hi, buf)).mul_(inv[:, None])
    return q
