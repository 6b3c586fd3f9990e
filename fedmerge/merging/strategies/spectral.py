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
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field

from fedmerge.merging.strategies.base import ModelParams, Strategy, StrategyError, StrategyParams, TensorContext
from fedmerge.merging.strategies.registry import register

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
    """
    p, s, qh = _svd(a)
    return (p * support(s, a.shape)) @ qh


def flat_spectrum(u, s, vh):
    """mean(s) u v^T over the support of ``s`` (u, vh orthonormal on it): the isotropic matrix."""
    keep = support(s, (u.shape[0], vh.shape[1]))
    mean = (s * keep).sum() / keep.sum().clamp(min=1.0)
    return (u * (keep * mean)) @ vh


def iso_c(deltas: Sequence):
    """Iso-C update of one matrix: M = sum_t Delta_t = U S V^T -> mean(S) U V^T."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    return flat_spectrum(*_svd(total))


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
    """Iso-CTS update of one matrix (see the module docstring)."""
    import torch

    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    rank = min(total.shape)
    k, s = common_split(rank, len(deltas), fraction)
    u, sv, vh = _svd(total)
    us, ss, vhs = [u[:, :k]], [sv[:k]], [vh[:k]]
    if s:
        common = u[:, :k]
        for d in deltas:
            residual = d - common @ (common.T @ d)  # the task's part outside the common subspace
            tu, ts, tvh = _svd(residual)
            us.append(tu[:, :s])
            ss.append(ts[:s])
            vhs.append(tvh[:s])
    u_all, s_all, vh_all = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    keep = support(s_all, total.shape)
    u_perp = orthogonal_factor(u_all * keep)
    vh_perp = orthogonal_factor(vh_all * keep[:, None])
    return flat_spectrum(u_perp, s_all * keep, vh_perp)


def tsv_m(deltas: Sequence):
    """TSV-M update of one matrix: top floor(r / T) triplets per task, orthogonalized, summed."""
    import torch

    m, n = deltas[0].shape
    k = max(1, min(m, n) // len(deltas))  # at least one per task on matrices smaller than T
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = _svd(d)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u_all, s_all, vh_all = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    keep = support(s_all, (m, n))
    u_perp = orthogonal_factor(u_all * keep)
    vh_perp = orthogonal_factor(vh_all * keep[:, None])
    return (u_perp * (s_all * keep)) @ vh_perp


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

    def __init__(self, params: StrategyParams, model_params: Sequence[ModelParams]):
        super().__init__(params, model_params)
        if sum(mp.weight for mp in self.model_params) <= 0.0:
            raise StrategyError(f"{self.name} models[].parameters.weight: the weights sum to zero; at least one model must count")

    def update(self, deltas: Sequence):
        """The merged task matrix of one weight matrix from its weighted float32 task matrices."""
        raise NotImplementedError

    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence):
        import torch

        weights = [mp.weight for mp in ctx.model_params]
        if len(deltas) != len(weights):
            raise StrategyError(f"{self.name}: {len(deltas)} deltas for {ctx.name} but {len(weights)} model parameter sets")
        alpha = self.params.alpha
        used = [(w, d) for w, d in zip(weights, deltas) if w > 0.0 and d is not None]
        if not is_spectral(ctx.name, base, self.params.token_tables):
            total = sum(weights)
            out = base.clone()
            for w, d in used:
                out.add_(d, alpha=alpha * w / total)
            return out
        if not used:
            return base.clone()
        dev = torch.device(ctx.device)
        scaled = []
        for w, d in used:
            d32 = d.to(device=dev, dtype=torch.float32)
            scaled.append(d32 * w if w != 1.0 else d32)
        merged = self.update(scaled)
        return torch.add(base.to(device=dev, dtype=torch.float32), merged, alpha=alpha).to(base.dtype)


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

