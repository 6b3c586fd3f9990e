"""Weighted averages: linear (model soups) and task arithmetic, as typed elementwise functions."""

from __future__ import annotations

from typing import Annotated, Sequence

from pydantic import Field

from fedmerge.merging.strategies.base import ModelParams, StrategyError, TensorContext
from fedmerge.merging.strategies.elementwise import elementwise_method


class WeightParam(ModelParams):
    weight: float = Field(1.0, description="scale of this model's contribution")


@elementwise_method("linear", paper="Wortsman et al., Model soups, ICML 2022 (arXiv:2203.05482)", needs_base=False)
def linear(ctx: TensorContext, base, deltas: Sequence, models: Sequence[WeightParam], *, normalize: Annotated[bool, Field(description="divide by the summed weights")] = True):
    """Weighted average of the models' weights (Wortsman et al. 2022, "Model soups").

    theta = sum_i w_i theta_i / sum_i w_i   (normalize=true, the default)
    theta = sum_i w_i theta_i               (normalize=false)

    On deltas from a shared reference: theta = base + sum_i w_i delta_i / sum_i w_i when normalized;
    unnormalized, the base is counted with weight sum_i w_i as well (exactly sum_i w_i theta_i).
    The paper's Eq. (1), (1 - alpha) theta_A + alpha theta_B, is weights [1 - alpha, alpha].
    One model gives that model (times its weight when not normalized).
    """
    weights = [mp.weight for mp in models]
    total = sum(weights)
    if normalize:
        if abs(total) < 1e-12:
            raise StrategyError(f"linear: weights sum to zero for {ctx.name}; cannot normalize")
        scale = 1.0 / total
        out = base.clone()
    else:
        scale = 1.0
        out = base * total
    for w, d in zip(weights, deltas):
        if w:
            out.add_(d, alpha=w * scale)
    return out


@elementwise_method("task_arithmetic", paper="Ilharco et al., Editing models with task arithmetic, ICLR 2023 (arXiv:2212.04089)")
def task_arithmetic(
    ctx: TensorContext,
    base,
    deltas: Sequence,
    models: Sequence[WeightParam],
    *,
    lambda_: Annotated[float, Field(description="scale applied to the summed task vectors")] = 1.0,
    normalize: Annotated[bool, Field(description="divide by the summed weights")] = False,
):
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic").

    theta = base + lambda * sum_i w_i delta_i        (normalize=false, the default, as mergekit)
    theta = base + lambda * sum_i w_i delta_i / sum_i w_i   (normalize=true)

    The paper's Eq. (2), base + alpha delta_A + (1 - alpha) delta_B, is weights [alpha, 1 - alpha].
    One model applies its task vector (or LoRA adapter) to the base: base + lambda w delta.
    """
    weights = [mp.weight for mp in models]
    scale = lambda_
    if normalize:
        total = sum(weights)
        if abs(total) < 1e-12:
            raise StrategyError(f"task_arithmetic: weights sum to zero for {ctx.name}; cannot normalize")
        scale /= total
    out = base.clone()
    for w, d in zip(weights, deltas):
        if w:
            out.add_(d, alpha=w * scale)
    return out


# The generated Strategy classes, under the names callers import.
Linear = linear
TaskArithmetic = task_arithmetic
