"""Hierarchical Cosine-OT-LERP: the paper's similarity-weighted interpolation with head alignment,
and a symmetric variant that needs no reference hospital."""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

from pydantic import Field, model_validator

from fedmerge.merging import align
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

# Elements per chunk of a tensor merged on its own: its dot products are summed chunk by chunk
# (part of the definition); a tensor of one chunk gets the whole-tensor figures.
CHUNK = 1 << 22

log = logging.getLogger(__name__)


class HierarchicalParams(StrategyParams):
    mode: Literal["reference", "symmetric"] = Field(
        "reference", description="reference: the paper's rule around one reference model; symmetric: no reference, invariant to the order of the models"
    )
    alignment: Literal["function_preserving", "per_projection", "none"] = "function_preserving"
    reference: int = Field(0, ge=0, description="index of the model the others are aligned to and interpolated from (mode reference)")
    similarity: Literal["aligned", "unaligned"] = Field(
        "aligned", description="cosine of the deltas after alignment (aligned) or before it, as Algorithm 1 writes it (unaligned)"
    )

    @model_validator(mode="after")
    def _reference_only_in_reference_mode(self):
        if self.mode == "symmetric" and "reference" in self.model_fields_set:
            raise ValueError("reference is the reference model of mode reference; mode symmetric has none (remove reference or set mode: reference)")
        return self


class HierarchicalModel(ModelParams):
    weight: float = Field(1.0, ge=0.0, description="share of this model: among the non-reference models (mode reference), among all (mode symmetric)")


@register
class Hierarchical(Strategy):
    """Hierarchical Cosine-OT-LERP (the paper's Algorithms 1 and 2), generalized to N models.

    ``mode: reference`` (default): the paper's rule. Two models A (the reference) and B, per
    tensor l, full weights p = base + delta:
        w_l = max(0, cos(delta_A,l, delta_B,l))
        theta_l = (1 - w_l) p_A,l + w_l p_B,l        (attention q/k/v/o: p_B aligned to A first)
    N models, reference r (``reference``, default 0): every other model m is aligned to r, and
        theta_l = p_r,l + sum_{m != r} c_m w_m,l (p_m,l - p_r,l),   w_m,l = max(0, cos(delta_r,l, delta_m,l))
    with c_m = weight_m / sum_{k != r} weight_k (equal by default): the weighted mean of the N - 1
    pairwise Algorithm-1 merges (r, m). For N = 2 this is exactly Algorithm 1.

    ``mode: symmetric``: no reference. Every model is aligned to the base (the one frame all
    fine-tunes share), and per tensor l, with w_mk = max(0, cos(delta_m,l, delta_k,l)) (w_mm = 1)
    and c_m = weight_m / sum_k weight_k:
        n_m     = sum_k c_k w_mk                       (how much of the consortium agrees with m)
        a_m     = (c_m / n_m) / sum_k (c_k / n_k)
        theta_l = base + sum_m a_m delta_m,l  =  sum_m a_m p_m,l
    Like Algorithm 1, the result is a convex combination of the (aligned) models, so the step
    does not grow with the number of models. Each model's vote is divided among the models that
    agree with it: knowledge several models share gets one vote, knowledge only one model learned
    keeps its own. A duplicated (or re-sent) model changes nothing, identical inputs give the input
    back, and the result does not depend on the order of the models. For N = 2 with equal weights
    it is the mean, as every symmetric convex rule must be; the cosines matter from N = 3 on.
    Why not the simpler symmetrizations: averaging the reference rule over every choice of
    reference gives exactly the linear mean for every N (the pairwise terms w_rm (p_m - p_r)
    cancel because w is symmetric), and so do equal cosine weights on deviations from the mean;
    dividing each task vector by n_m without renormalizing (a sum for orthogonal task vectors)
    scored 40.6 mean accuracy on the demo world against 50.3 for the mean (docs/strategies.md).

    Alignment (``alignment``): ``function_preserving`` (default) permutes a model's heads
    consistently across q/k/v/o of a block, respecting grouped-query attention, so the aligned
    model computes exactly its own function; ``per_projection`` aligns each projection on its own
    (Algorithm 2 as written, may break the function); ``none`` skips alignment. ``similarity:
    aligned`` (default) takes the cosines after alignment, so that w measures the deltas actually
    combined; ``unaligned`` takes them before, as Algorithm 1 is written. A zero delta has cosine 0
    with every other.
    """

    name = "hierarchical"
    paper = "A Novel Hierarchical Integration Method for Efficient Model Merging in Medical LLMs (arXiv:2511.13373), Alg. 1-2"
    Params = HierarchicalParams
    PerModel = HierarchicalModel
    needs_base = True

    def __init__(self, params: StrategyParams, model_params: Sequence[ModelParams]):
        super().__init__(params, model_params)
        n = len(self.model_params)
        if self.params.mode == "reference":
            if self.params.reference >= n:
                raise StrategyError(f"hierarchical parameters.reference: {self.params.reference} is not a model index (0..{n - 1})")
            others = [mp.weight for i, mp in enumerate(self.model_params) if i != self.params.reference]
            if others and sum(others) <= 0:
                raise StrategyError("hierarchical models[].parameters.weight: the non-reference models' weights sum to zero")
        elif sum(mp.weight for mp in self.model_params) <= 0:
            raise StrategyError("hierarchical models[].parameters.weight: the weights sum to zero")
        # (layer, model) -> the BlockAlignment (or per-projection permutations) used: a record for
        # callers, never read by the merge itself.
        self.alignments: dict[tuple[int, int], Any] = {}

    def _shares(self) -> list[float]:
        if self.params.mode == "symmetric":
            total = sum(mp.weight for mp in self.model_params)
            return [mp.weight / total for mp in self.model_params]
        r = self.params.reference
        total = sum(mp.weight for i, mp in enumerate(self.model_params) if i != r)
        return [0.0 if i == r else mp.weight / total for i, mp in enumerate(self.model_params)]

    # -- grouping: one attention block per group ---------------------------------------------------
    def groups(self, names: Sequence[str], config: dict[str, Any]) -> list[tuple[str, ...]]:
        if self.params.alignment == "none":
            return [(n,) for n in names]
        blocks = align.attention_blocks(names, config)
        first_of = {b.names[0]: b.names for b in blocks}
        member = {n for b in blocks for n in b.names}
        out: list[tuple[str, ...]] = []
        for n in names:
            if n in first_of:
                out.append(first_of[n])
            elif n not in member:
                out.append((n,))
        # A block whose first name comes late in ``names`` is still emitted once, where q appears.
        return out

    @staticmethod
    def _block_of(names: tuple[str, ...], config: dict[str, Any]) -> align.AttentionBlock | None:
        """The attention block a group is, read again from its names and the base's config (so
        merging a group needs nothing remembered from ``groups``)."""
        if len(names) < 4:
            return None
        blocks = align.attention_blocks(names, config)
        return blocks[0] if len(blocks) == 1 and blocks[0].names == names else None

    # -- merging -------------------------------------------------------------------------------------
    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence):
        return merge_in_memory(self.streamed(ctx, base.shape, base.dtype, [d is not None for d in deltas]), base, deltas, out=ctx.result_like(base))

    def streams(self, name: str, shape) -> bool:
        return True  # the engine asks only for tensors merged on their own (not an attention block)

    def streamed(self, ctx: TensorContext, shape, dtype, present) -> StreamedTensor:
        return _LerpTensor(self.params.mode, self.params.reference, self._shares(), shape, present)

    def merge_group(self, contexts: Sequence[TensorContext], bases: Sequence[Any], deltas: Sequence[Sequence[Any]]) -> list[Any]:
        names = tuple(ctx.name for ctx in contexts)
        block = self._block_of(names, contexts[0].config) if contexts and self.params.alignment != "none" else None
        if block is None:
            return [self.merge_tensor(ctx, b, d) for ctx, b, d in zip(contexts, bases, deltas)]
        if self.params.mode == "symmetric":
            return self._merge_block_symmetric(block, names, bases, deltas)
        return self._merge_block_reference(block, names, bases, deltas)

    def _align(self, block: align.AttentionBlock, target: dict[str, Any], model: dict[str, Any], m: int, to: str) -> dict[str, Any]:
        """``model``'s full weights of one block with its heads permuted to match ``target``."""
        if self.params.alignment == "function_preserving":
            a = align.block_permutation(target, model, block)
            aligned = align.apply_block_permutation(model, block, a)
            moved = a.heads_moved
        else:
            a = align.per_projection_permutations(target, model, block)
            aligned = align.apply_per_projection(model, block, a)
            moved = sum(sum(1 for i, s in enumerate(p) if i != s) for p in a.values())
        self.alignments[(block.layer, m)] = a
        if moved:
            log.info("layer %d: model %d aligned to %s, %d heads moved", block.layer, m, to, moved)
        return aligned

    def _merge_block_reference(self, block, names, bases, deltas) -> list[Any]:
        import torch

        r = self.params.reference
        n_models = len(deltas[0])
        shares = self._shares()
        base_of = dict(zip(names, bases))
        delta_of = [{name: deltas[i][m] for i, name in enumerate(names)} for m in range(n_models)]
        full = [{name: _full(base_of[name], delta_of[m][name]) for name in names} for m in range(n_models)]
        aligned_full = {m: self._align(block, full[r], full[m], m, f"model {r}") for m in range(n_models) if m != r and shares[m] != 0.0}

        out = {}
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

    def _merge_block_symmetric(self, block, names, bases, deltas) -> list[Any]:
        n_models = len(deltas[0])
        shares = self._shares()
        base_of = dict(zip(names, bases))
        out = []
        aligned_deltas: list[dict[str, Any]] = []
        for m in range(n_models):
            delta_m = {name: deltas[i][m] for i, name in enumerate(names)}
            if shares[m] == 0.0:
                aligned_deltas.append(delta_m)
                continue
            full_m = {name: _full(base_of[name], delta_m[name]) for name in names}
            aligned = self._align(block, base_of, full_m, m, "the base")
            aligned_deltas.append({name: delta_m[name] if aligned[name] is full_m[name] else aligned[name] - base_of[name] for name in names})
        for i, name in enumerate(names):
            combined = [aligned_deltas[m][name] for m in range(n_models)]
            compared = combined if self.params.similarity == "aligned" else [deltas[i][m] for m in range(n_models)]
            out.append(_symmetric(base_of[name], combined, compared, shares))
        return out


class _LerpTensor(StreamedTensor):
    """One tensor merged on its own (no head alignment): a pass for the dot products between the
    deltas, then the combination, chunk by chunk. Mode reference: the reference's dot products with
    every model; mode symmetric: every pair."""

    def __init__(self, mode: str, reference: int, shares: Sequence[float], shape, present: Sequence[bool]):
        numel = 1
        for dim in shape:
            numel *= int(dim)
        self.mode, self.r, self.shares, self.present = mode, reference, list(shares), list(present)
        self.chunks = flat_chunks(numel, CHUNK) if numel else [(0, 0)]
        self.coeffs: dict[int, float] = {}  # theta = base + sum_m coeffs[m] delta_m

    def _pairs(self) -> list[tuple[int, int]]:
        if self.mode == "symmetric":
            live = [m for m, has in enumerate(self.present) if has and self.shares[m] > 0.0]
            return [(a, b) for i, a in enumerate(live) for b in live[i:]]
        if not self.present[self.r]:
            return []
        others = [m for m, has in enumerate(self.present) if m != self.r and has and self.shares[m] > 0.0]
        return [(self.r, self.r)] + [p for m in others for p in ((self.r, m), (m, m))]

    def passes(self):
        import torch

        dots: dict[tuple[int, int], float] = {p: 0.0 for p in self._pairs()}

        def observe(start, end, base, deltas):
            for a, b in dots:
                dots[a, b] += float(torch.dot(deltas[a], deltas[b]))

        if dots:
            yield FunctionPass(observe)
        if self.mode == "symmetric":
            live = [m for m, has in enumerate(self.present) if has and self.shares[m] > 0.0]
            votes = _symmetric_votes(live, self.shares, lambda a, b: dots[min(a, b), max(a, b)])
            self.coeffs = votes
        elif self.present[self.r]:
            coeffs = {}
            for (a, m) in dots:
                if a == self.r and m != self.r:
                    w = _positive_cosine(dots[self.r, m], dots[self.r, self.r], dots[m, m])
                    if w > 0.0:
                        coeffs[m] = self.shares[m] * w
            # theta = p_r + sum c_m w_m (p_m - p_r) = base + (1 - sum c_m w_m) delta_r + sum c_m w_m delta_m
            self.coeffs = {self.r: 1.0 - sum(coeffs.values()), **coeffs}

    def merge(self, start, end, base, deltas, out=None):
        import torch

        items = list(self.coeffs.items())
        if out is None:
            out = torch.empty_like(base)
        if not items:
            return out.copy_(base)
        m0, c0 = items[0]
        torch.add(base, deltas[m0], alpha=c0, out=out)  # straight into the result: no temporary per chunk
        for m, c in items[1:]:
            out.add_(deltas[m], alpha=c)
        return out


def _symmetric_votes(live: Sequence[int], shares: Sequence[float], dot) -> dict[int, float]:
    """a_m = (c_m / n_m) / sum_k (c_k / n_k), n_m = sum_k c_k w_mk, w_mk = max(0, cos), w_mm = 1,
    from ``dot(a, b)`` of the compared deltas."""
    sq = {m: dot(m, m) for m in live}
    agree = {m: shares[m] for m in live}  # the model agrees with itself
    for a_i, a in enumerate(live):
        for b in live[a_i + 1 :]:
            w = _positive_cosine(dot(a, b), sq[a], sq[b])
            if w > 0.0:
                agree[a] += shares[b] * w
                agree[b] += shares[a] * w
    votes = {m: shares[m] / agree[m] for m in live}
    total = sum(votes.values())
    return {m: votes[m] / total for m in live}


def _symmetric(base, deltas: Sequence, compared: Sequence, shares: Sequence[float]):
    """base + sum_m a_m delta_m (see ``_symmetric_votes``), the compared deltas held whole."""
    live = [m for m, d in enumerate(deltas) if d is not None and shares[m] > 0.0]

    def dot(a: int, b: int) -> float:
        if compared[a] is None or compared[b] is None:
            return 0.0
        return _dot(compared[a], compared[b])

    votes = _symmetric_votes(live, shares, dot)
    out = base.clone()
    for m in live:
        out.add_(deltas[m], alpha=votes[m])
    return out


def _full(base, delta):
    return base if delta is None else base + delta


def _dot(a, b) -> float:
    import torch

    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _positive_cosine(dot: float, sq_a: float, sq_b: float) -> float:
    if sq_a <= 0.0 or sq_b <= 0.0:
        return 0.0
    return max(0.0, min(1.0, dot / (sq_a**0.5 * sq_b**0.5)))
