"""Model Stock: interpolate from the base toward the average fine-tune by an angle-given ratio."""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field

from fedmerge.merging.strategies.base import ModelParams, Strategy, StrategyError, StrategyParams, TensorContext
from fedmerge.merging.strategies.registry import register


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
        import torch

        n = len(deltas)
        if n < 2:
            raise StrategyError(f"model_stock needs at least 2 task vectors for {ctx.name}, got {n}")
        ds = [torch.zeros_like(base) if d is None else d for d in deltas]
        rows = base.shape[0] if (self.params.filter_wise and base.dim() >= 2 and base.shape[0] > 0) else 1
        flat = [d.reshape(rows, -1).float() for d in ds]
        norms = [torch.linalg.vector_norm(f, dim=1) for f in flat]
        cos = torch.zeros(rows, dtype=torch.float32, device=base.device)
        for i in range(n):
            for j in range(i + 1, n):
                dot = torch.einsum("rk,rk->r", flat[i], flat[j])
                denom = norms[i] * norms[j]
                cos += torch.where(denom > 0, dot / denom.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(dot))
        cos = (cos / (n * (n - 1) / 2)).clamp_(0.0 if self.params.negative_cosine == "zero" else -1.0, 1.0)
        denom = 1.0 + (n - 1) * cos
        ratio = torch.where(denom > 1e-6, n * cos / denom.clamp(min=1e-6), torch.zeros_like(cos))
        avg = sum(flat) / n
        out = base.reshape(rows, -1).float() + ratio[:, None] * avg
        return out.reshape(base.shape).to(base.dtype)
