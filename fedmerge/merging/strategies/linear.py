"""Weighted averages: linear (model soups) and task arithmetic."""

from __future__ import annotations

from typing import Sequence

from pydantic import Field

from fedmerge.merging.strategies.base import ModelParams, Strategy, StrategyError, StrategyParams, TensorContext, register


class WeightParam(ModelParams):
    weight: float = 1.0


class LinearParams(StrategyParams):
    normalize: bool = True


@register
class Linear(Strategy):
    """Weighted average of the models' weights (Wortsman et al. 2022, "Model soups").

    theta = sum_i w_i theta_i / sum_i w_i   (normalize=true, the default)
    theta = sum_i w_i theta_i               (normalize=false)

    On deltas from a shared reference: theta = base + sum_i w_i delta_i / sum_i w_i when normalized;
    unnormalized, the base is counted with weight sum_i w_i as well (exactly sum_i w_i theta_i).
    The paper's Eq. (1), (1 - alpha) theta_A + alpha theta_B, is weights [1 - alpha, alpha].
    """

    name = "linear"
    paper = "Wortsman et al., Model soups, ICML 2022 (arXiv:2203.05482)"
    Params = LinearParams
    PerModel = WeightParam
    needs_base = False
    elementwise = True

    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence):
        weights = [mp.weight for mp in ctx.model_params]
        total = sum(weights)
        if self.params.normalize:
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


class TaskArithmeticParams(StrategyParams):
    lambda_: float = Field(1.0, alias="lambda", description="scale applied to the summed task vectors")
    normalize: bool = False

    model_config = StrategyParams.model_config | {"populate_by_name": True}


@register
class TaskArithmetic(Strategy):
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic").

    theta = base + lambda * sum_i w_i delta_i        (normalize=false, the default, as mergekit)
    theta = base + lambda * sum_i w_i delta_i / sum_i w_i   (normalize=true)

    The paper's Eq. (2), base + alpha delta_A + (1 - alpha) delta_B, is weights [alpha, 1 - alpha].
    """

    name = "task_arithmetic"
    paper = "Ilharco et al., Editing models with task arithmetic, ICLR 2023 (arXiv:2212.04089)"
    Params = TaskArithmeticParams
    PerModel = WeightParam
    elementwise = True

    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence):
        weights = [mp.weight for mp in ctx.model_params]
        scale = self.params.lambda_
        if self.params.normalize:
            total = sum(weights)
            if abs(total) < 1e-12:
                raise StrategyError(f"task_arithmetic: weights sum to zero for {ctx.name}; cannot normalize")
            scale /= total
        out = base.clone()
        for w, d in zip(weights, deltas):
            if w:
                out.add_(d, alpha=w * scale)
        return out
