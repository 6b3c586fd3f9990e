"""Hierarchical Cosine-OT-LERP: the paper's similarity-weighted interpolation with head alignment."""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

from pydantic import Field

from fedmerge.merging import align
from fedmerge.merging.strategies.base import ModelParams, Strategy, StrategyError, StrategyParams, TensorContext, register

log = logging.getLogger(__name__)


class HierarchicalParams(StrategyParams):
    alignment: Literal["function_preserving", "per_projection", "none"] = "function_preserving"
    reference: int = Field(0, ge=0, description="index of the model the others are aligned to and interpolated from")
    similarity: Literal["aligned", "unaligned"] = Field(
        "aligned", description="cosine of the deltas after alignment (aligned) or before it, as Algorithm 1 writes it (unaligned)"
    )


class HierarchicalModel(ModelParams):
    weight: float = Field(1.0, ge=0.0, description="relative share of this model among the non-reference models")


@register
class Hierarchical(Strategy):
    """Hierarchical Cosine-OT-LERP (the paper's Algorithms 1 and 2), generalized to N models.

    Two models A (the reference) and B, per tensor l, full weights p = base + delta:
        w_l = max(0, cos(delta_A,l, delta_B,l))
        theta_l = (1 - w_l) p_A,l + w_l p_B,l        (attention q/k/v/o: p_B aligned to A first)
    Alignment (``alignment``): ``function_preserving`` (default) permutes B's heads consistently
    across q/k/v/o of a block, respecting grouped-query attention, so aligned B computes exactly
    B's function; ``per_projection`` aligns each projection on its own (Algorithm 2 as written,
    may break the function); ``none`` skips alignment. ``similarity: aligned`` (default) takes the
    cosine after alignment, so that w_l measures the deltas actually interpolated; ``unaligned``
    takes it before, as Algorithm 1 is written. A zero delta gives w_l = 0.

    N models, reference r (``reference``, default 0): every other model m is aligned to r, and

        theta_l = p_r,l + sum_{m != r} c_m w_m,l (p_m,l - p_r,l),   w_m,l = max(0, cos(delta_r,l, delta_m,l))

    with c_m = weight_m / sum_{k != r} weight_k (equal by default): the weighted mean of the N - 1
    pairwise Algorithm-1 merges (r, m). For N = 2 this is exactly Algorithm 1.
    """

    name = "hierarchical"
    paper = "A Novel Hierarchical Integration Method for Efficient Model Merging in Medical LLMs (arXiv:2511.13373), Alg. 1-2"
    Params = HierarchicalParams
    PerModel = HierarchicalModel
    needs_base = True

    def __init__(self, params: StrategyParams, model_params: Sequence[ModelParams]):
        super().__init__(params, model_params)
        n = len(self.model_params)
        if self.params.reference >= n:
            raise StrategyError(f"hierarchical parameters.reference: {self.params.reference} is not a model index (0..{n - 1})")
        others = [mp.weight for i, mp in enumerate(self.model_params) if i != self.params.reference]
        if others and sum(others) <= 0:
            raise StrategyError("hierarchical models[].parameters.weight: the non-reference models' weights sum to zero")
        self._blocks: dict[tuple[str, ...], align.AttentionBlock] = {}
        self.alignments: dict[tuple[int, int], Any] = {}  # (layer, model) -> BlockAlignment or per-projection perms

    def _shares(self) -> list[float]:
        r = self.params.reference
        total = sum(mp.weight for i, mp in enumerate(self.model_params) if i != r)
        return [0.0 if i == r else mp.weight / total for i, mp in enumerate(self.model_params)]

    # -- grouping: one attention block per group ---------------------------------------------------
    def groups(self, names: Sequence[str], config: dict[str, Any]) -> list[tuple[str, ...]]:
        if self.params.alignment == "none":
            return [(n,) for n in names]
        blocks = align.attention_blocks(names, config)
        first_of = {}
        for b in blocks:
            self._blocks[b.names] = b
            first_of[b.names[0]] = b.names
        member = {n for b in blocks for n in b.names}
        out: list[tuple[str, ...]] = []
        for n in names:
            if n in first_of:
                out.append(first_of[n])
            elif n not in member:
                out.append((n,))
        # A block whose first name comes late in ``names`` is still emitted once, where q appears.
        return out

    # -- merging -------------------------------------------------------------------------------------
    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence):
        import torch

        r = self.params.reference
        shares = self._shares()
        d_ref = deltas[r]
        if d_ref is None:
            return base.clone()  # cos with a zero delta is 0: every w is 0, theta = p_r = base
        others = [m for m, d in enumerate(deltas) if m != r and d is not None and shares[m] > 0.0]
        ref_sq, dots, sqs = _similarity_sums(d_ref, [deltas[m] for m in others])
        coeffs = {}
        for m, dot, sq in zip(others, dots, sqs):
            w = _positive_cosine(dot, ref_sq, sq)
            if w > 0.0:
                coeffs[m] = shares[m] * w
        # theta = p_r + sum c_m w_m (p_m - p_r) = base + (1 - sum c_m w_m) delta_r + sum c_m w_m delta_m
        out = torch.add(base, d_ref, alpha=1.0 - sum(coeffs.values()))
        for m, c in coeffs.items():
            out.add_(deltas[m], alpha=c)
        return out

    def merge_group(self, contexts: Sequence[TensorContext], bases: Sequence[Any], deltas: Sequence[Sequence[Any]]) -> list[Any]:
        names = tuple(ctx.name for ctx in contexts)
        block = self._blocks.get(names)
        if block is None:
            return [self.merge_tensor(ctx, b, d) for ctx, b, d in zip(contexts, bases, deltas)]
        import torch

        r = self.params.reference
        n_models = len(deltas[0])
        shares = self._shares()
        base_of = dict(zip(names, bases))
        delta_of = [{name: deltas[i][m] for i, name in enumerate(names)} for m in range(n_models)]
        full = [{name: _full(base_of[name], delta_of[m][name]) for name in names} for m in range(n_models)]

        out = {}
        aligned_full = {}
        for m in range(n_models):
            if m == r or shares[m] == 0.0:
                continue
            if self.params.alignment == "function_preserving":
                a = align.block_permutation(full[r], full[m], block)
                aligned_full[m] = align.apply_block_permutation(full[m], block, a)
                moved = a.heads_moved
            else:
                a = align.per_projection_permutations(full[r], full[m], block)
                aligned_full[m] = align.apply_per_projection(full[m], block, a)
                moved = sum(sum(1 for i, s in enumerate(p) if i != s) for p in a.values())
            self.alignments[(block.layer, m)] = a
            if moved:
                log.info("layer %d: model %d aligned to model %d, %d heads moved", block.layer, m, r, moved)

        for name in names:
            base = base_of[name]
            d_ref = delta_of[r][name]
            ref_sq = _dot(d_ref, d_ref) if d_ref is not None else 0.0
            coeffs = {}
            for m, p_m in aligned_full.items():
                p = p_m[name]
                if self.params.similarity == "aligned" and p is not full[m][name]:
                    d_m = p - base
                else:
                    d_m = delta_of[m][name]
                if d_ref is None or d_m is None:
                    continue
                w = _positive_cosine(_dot(d_ref, d_m), ref_sq, _dot(d_m, d_m))
                if w > 0.0:
                    coeffs[m] = shares[m] * w
            # theta = (1 - sum c_m w_m) p_r + sum c_m w_m p_m (aligned): Algorithm 1 for N = 2.
            result = torch.mul(full[r][name], 1.0 - sum(coeffs.values()))
            for m, c in coeffs.items():
                result.add_(aligned_full[m][name], alpha=c)
            out[name] = result
        return [out[name] for name in names]


def _full(base, delta):
    return base if delta is None else base + delta


def _similarity_sums(ref, others) -> tuple[float, list[float], list[float]]:
    """|ref|^2, ref . other and |other|^2 for each other (whole-tensor BLAS dots: measured faster
    than chunked in-cache dots here)."""
    ref_sq = _dot(ref, ref)
    return ref_sq, [_dot(ref, o) for o in others], [_dot(o, o) for o in others]


def _dot(a, b) -> float:
    import torch

    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _positive_cosine(dot: float, sq_a: float, sq_b: float) -> float:
    if sq_a <= 0.0 or sq_b <= 0.0:
        return 0.0
    return max(0.0, min(1.0, dot / (sq_a**0.5 * sq_b**0.5)))
