"""Model Stock: interpolate from the base toward the average fine-tune by an angle-given ratio."""

from __future__ import annotations

from typing import Literal, Sequence

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
from fedmerge.merging.strategies.registry import register

# Elements per chunk (whole rows with filter_wise): the norms and dot products are summed chunk by
# chunk, so this is part of the definition; a tensor of one chunk gets the whole-tensor figures.
CHUNK = 1 << 22


class ModelStockParams(StrategyParams):
    filter_wise: bool = Field(False, description="one ratio per row (first dimension) instead of one per tensor, as mergekit's option")
    negative_cosine: Literal["zero", "keep"] = Field(
        "zero", description="zero: a negative mean cosine counts as 0 (t = 0, the base); keep: use it as is, as mergekit does"
    )


@register
class ModelStock(Strategy):
    """Model Stock: w = t avg_i(theta_i) + (1 - t) base, t = N cos / (1 + (N - 1) cos), per tensor.

    Jang et al. show that fine-tunes of one base lie on a thin shell around a center, and that
    with N fine-tunes at pairwise angle theta the point of their span nearest that center is

        t     = N cos(theta) / (1 + (N - 1) cos(theta))
        theta_merged = base + t * (1/N) sum_i delta_i

    per layer. cos(theta) is the cosine between task vectors delta_i = theta_i - base (flattened);
    with N > 2 the paper assumes equal pairwise angles, and the mean of the N (N - 1) / 2 pairwise
    cosines is used (as mergekit does). A pair with a zero task vector has cosine 0. The cosine is
    clamped to [0, 1] by default, so t lies in [0, 1] (the base at cos 0, the average at cos 1): the
    paper's geometry assumes an acute angle, and for cos < 0 its formula would extrapolate away from
    the fine-tunes. ``negative_cosine: keep`` uses the cosine as mergekit does (clamped to [-1, 1]
    only); mergekit-format configs get it by default. Where 1 + (N - 1) cos is not positive the
    formula has no meaning and t is 0. ``filter_wise`` computes one
    ratio per row of the tensor (a 1-D tensor is one row). Identical inputs give the input back.
    """

    name = "model_stock"
    paper = "Jang et al., Model Stock: All we need is just a few fine-tuned models, ECCV 2024 (arXiv:2403.19522)"
    Params = ModelStockParams
    PerModel = ModelParams
    min_models = 2

    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence):
        n = len(deltas)
        if n < 2:
            raise StrategyError(f"model_stock needs at least 2 task vectors for {ctx.name}, got {n}")
        return merge_in_memory(self.streamed(ctx, base.shape, base.dtype, [d is not None for d in deltas]), base, deltas, out=ctx.result_like(base))

    def streams(self, name: str, shape) -> bool:
        return True

    def streamed(self, ctx: TensorContext, shape, dtype, present) -> StreamedTensor:
        return _ModelStockTensor(self.params, shape, len(present))


class _ModelStockTensor(StreamedTensor):
    """Model Stock on one tensor: a pass for the norms and pairwise dot products, then the merge.

    ``rows`` ratios (one per row with filter_wise, else one): each chunk holds whole rows, so a
    row's figures come from one chunk; a per-tensor figure is summed over the chunks."""

    def __init__(self, params: ModelStockParams, shape, n_models: int):
        numel = 1
        for dim in shape:
            numel *= int(dim)
        self.params, self.n = params, n_models
        self.rows = int(shape[0]) if (params.filter_wise and len(shape) >= 2 and shape[0] > 0) else 1
        self.row_len = numel // self.rows if self.rows else numel
        self.chunks = flat_chunks(numel, CHUNK, self.row_len if self.rows > 1 else None) if numel else [(0, 0)]
        self.ratio = None

    def _views(self, start: int, end: int, base, deltas):
        import torch

        r = (end - start) // self.row_len if self.rows > 1 else 1
        return [(torch.zeros_like(base) if d is None else d).reshape(r, -1).float() for d in deltas]

    def passes(self):
        import torch

        norms: list[list] = [[] for _ in range(self.n)]
        dots: dict[tuple[int, int], list] = {(i, j): [] for i in range(self.n) for j in range(i + 1, self.n)}

        def observe(start, end, base, deltas):
            flat = self._views(start, end, base, deltas)
            for i in range(self.n):
                norms[i].append(torch.linalg.vector_norm(flat[i], dim=1))
            for (i, j), acc in dots.items():
                acc.append(torch.einsum("rk,rk->r", flat[i], flat[j]))

        yield FunctionPass(observe)
        self.ratio = self._ratio([_combine_norm(parts, self.rows > 1) for parts in norms], {k: _combine_sum(v, self.rows > 1) for k, v in dots.items()})

    def _ratio(self, norms, dots):
        import torch

        n = self.n
        cos = torch.zeros(self.rows, dtype=torch.float32, device=norms[0].device)
        for (i, j), dot in dots.items():
            denom = norms[i] * norms[j]
            cos += torch.where(denom > 0, dot / denom.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(dot))
        cos = (cos / (n * (n - 1) / 2)).clamp_(0.0 if self.params.negative_cosine == "zero" else -1.0, 1.0)
        denom = 1.0 + (n - 1) * cos
        return torch.where(denom > 1e-6, n * cos / denom.clamp(min=1e-6), torch.zeros_like(cos))

    def merge(self, start, end, base, deltas, out=None):
        flat = self._views(start, end, base, deltas)
        ratio = self.ratio[start // self.row_len : end // self.row_len] if self.rows > 1 else self.ratio
        avg = sum(flat) / self.n
        merged = (base.reshape(len(ratio) if self.rows > 1 else 1, -1).float() + ratio[:, None] * avg).reshape(-1).to(base.dtype)
        if out is None:
            return merged
        out.copy_(merged)
        return out


def _combine_sum(parts: list, by_row: bool):
    """Per-chunk figures into the tensor's: rows are in one chunk each; one figure is summed."""
    import torch

    return torch.cat(parts) if by_row else (parts[0] if len(parts) == 1 else torch.stack(parts).sum(0))


def _combine_norm(parts: list, by_row: bool):
    import torch

    if by_row or len(parts) == 1:
        return torch.cat(parts)
    return torch.stack(parts).square().sum(0).sqrt()
