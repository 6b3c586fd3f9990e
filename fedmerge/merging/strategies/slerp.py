"""Spherical linear interpolation between exactly two models."""

from __future__ import annotations

import math
from typing import Sequence

from pydantic import Field

from fedmerge.merging.strategies.base import ModelParams, Strategy, StrategyError, StrategyParams, TensorContext
from fedmerge.merging.strategies.registry import register


class SlerpParams(StrategyParams):
    t: float = Field(0.5, ge=0.0, le=1.0, description="0 gives model 0, 1 gives model 1")
    dot_threshold: float = Field(0.9995, gt=0.0, le=1.0, description="|cos| above which linear interpolation is used")


@register
class Slerp(Strategy):
    """SLERP between two models' full weights, per tensor (Shoemake 1985; as used by mergekit).

    With theta_0 = base + delta_0, theta_1 = base + delta_1 flattened, Omega the angle between them
    (cos Omega = theta_0 . theta_1 / (|theta_0| |theta_1|)):

        theta = sin((1 - t) Omega) / sin Omega * theta_0 + sin(t Omega) / sin Omega * theta_1

    The vectors themselves are interpolated (not their unit directions), so t=0 gives model 0 and
    t=1 model 1 exactly. When |cos Omega| > dot_threshold (nearly colinear, including identical
    tensors) or either vector is zero, the angle is ill-conditioned and linear interpolation
    (1 - t) theta_0 + t theta_1 is used instead. Defined for exactly two models; without a base the
    engine takes model 0 as the reference, which changes nothing here.
    """

    name = "slerp"
    paper = "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985"
    Params = SlerpParams
    PerModel = ModelParams
    needs_base = False
    min_models = 2
    max_models = 2

    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence):
        import torch

        if len(deltas) != 2:
            raise StrategyError(f"slerp merges exactly two models, got {len(deltas)} for {ctx.name}")
        t = self.params.t
        v0 = base.clone() if deltas[0] is None else base + deltas[0]
        v1 = base.clone() if deltas[1] is None else base + deltas[1]
        f0, f1 = v0.reshape(-1), v1.reshape(-1)
        n0 = float(torch.linalg.vector_norm(f0, dtype=torch.float64))
        n1 = float(torch.linalg.vector_norm(f1, dtype=torch.float64))
        if n0 == 0.0 or n1 == 0.0:
            cos = 1.0
        else:
            cos = float(torch.dot(f0.double(), f1.double()) if f0.numel() <= 1 << 16 else torch.dot(f0, f1)) / (n0 * n1)
            cos = max(-1.0, min(1.0, cos))
        if abs(cos) > self.params.dot_threshold:
            s0, s1 = 1.0 - t, t
        else:
            omega = math.acos(cos)
            sin_omega = math.sin(omega)
            s0 = math.sin((1.0 - t) * omega) / sin_omega
            s1 = math.sin(t * omega) / sin_omega
        return v0.mul_(s0).add_(v1, alpha=s1)
