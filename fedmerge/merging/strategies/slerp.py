"""Spherical linear interpolation between exactly two models."""

from __future__ import annotations

import math
from typing import Sequence

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

# Elements per chunk: the norms and the dot product are summed chunk by chunk (part of the
# definition); a tensor of one chunk gets the whole-tensor figures.
CHUNK = 1 << 22


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
        if len(deltas) != 2:
            raise StrategyError(f"slerp merges exactly two models, got {len(deltas)} for {ctx.name}")
        return merge_in_memory(self.streamed(ctx, base.shape, base.dtype, [d is not None for d in deltas]), base, deltas, out=ctx.result_like(base))

    def streams(self, name: str, shape) -> bool:
        return True

    def streamed(self, ctx: TensorContext, shape, dtype, present) -> StreamedTensor:
        return _SlerpTensor(self.params.t, self.params.dot_threshold, shape)


class _SlerpTensor(StreamedTensor):
    """SLERP of one tensor: a pass for the two norms and the dot product, then the interpolation."""

    def __init__(self, t: float, dot_threshold: float, shape):
        numel = 1
        for dim in shape:
            numel *= int(dim)
        self.t, self.dot_threshold, self.numel = t, dot_threshold, numel
        self.chunks = flat_chunks(numel, CHUNK) if numel else [(0, 0)]
        self.s0 = self.s1 = None

    @staticmethod
    def _points(base, deltas):
        v0 = base.clone() if deltas[0] is None else base + deltas[0]
        v1 = base.clone() if deltas[1] is None else base + deltas[1]
        return v0, v1

    def passes(self):
        import torch

        norm0: list[float] = []
        norm1: list[float] = []
        dots: list[float] = []

        def observe(start, end, base, deltas):
            f0, f1 = self._points(base, deltas)
            norm0.append(float(torch.linalg.vector_norm(f0, dtype=torch.float64)))
            norm1.append(float(torch.linalg.vector_norm(f1, dtype=torch.float64)))
            dots.append(float(torch.dot(f0.double(), f1.double()) if self.numel <= 1 << 16 else torch.dot(f0, f1)))

        yield FunctionPass(observe)
        n0, n1 = (parts[0] if len(parts) == 1 else math.sqrt(sum(x * x for x in parts)) for parts in (norm0, norm1))
        if n0 == 0.0 or n1 == 0.0:
            cos = 1.0
        else:
            cos = max(-1.0, min(1.0, sum(dots) / (n0 * n1)))
        t = self.t
        if abs(cos) > self.dot_threshold:
            self.s0, self.s1 = 1.0 - t, t
        else:
            omega = math.acos(cos)
            sin_omega = math.sin(omega)
            self.s0 = math.sin((1.0 - t) * omega) / sin_omega
            self.s1 = math.sin(t * omega) / sin_omega

    def merge(self, start, end, base, deltas, out=None):
        v0, v1 = self._points(base, deltas)
        merged = v0.mul_(self.s0).add_(v1, alpha=self.s1)
        if out is None:
            return merged
        out.copy_(merged)
        return out
