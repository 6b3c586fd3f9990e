"""TIES, DARE, DELLA and Model Breadcrumbs as rows of one table over a generalized task-arithmetic merge.

Every method here computes, per tensor and per element,

    theta = base + lambda * combine_i( w_i * s_i * sparsify_i(delta_i) )

and differs only in three choices, which ``VARIANTS`` lists one row per method:

- *sparsification* of each task vector: ``magnitude`` (keep the top-k by |delta|, TIES),
  ``random`` (Bernoulli keep with probability p, DARE), ``outliers`` (drop the largest gamma and
  the smallest magnitudes, Breadcrumbs), ``rank_sampling`` (keep with a probability that grows
  with the magnitude rank within a row, DELLA's MAGPRUNE);
- *sign consensus*: none (plain sum), or TIES' sign election, where only the entries that agree
  with the elected sign are kept (``consensus: sum`` elects the sign of sum_i w_i delta_i,
  ``count`` the sign of sum_i sign(w_i delta_i); a tie elects +);
- *rescale* ``s_i``: ``probability`` divides each kept entry by its keep probability (the DARE and
  DELLA papers: unbiased in expectation; for the deterministic masks, by the kept fraction), ``l1``
  scales the whole sparsified vector back to the L1 norm of the original (what mergekit does).

``normalize`` divides by the summed weights of the entries that contribute (with consensus: only
the agreeing models, per element; without: sum_i w_i). Each method is defined for one model too:
the election is then the identity and the method is its sparsification (DARE's own use).

Speed and memory: a tensor is processed in fixed-size chunks of its flattened elements, so the
temporary memory is a few chunks whatever the tensor size, and the statistics (magnitude ranks,
L1 norms) are gathered in passes over those chunks (``GeneralizedMerge``): the engine can read a
tensor too large to hold again for each pass. The top-k threshold is found exactly without a sort
(``rank_select``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence

from pydantic import Field, ValidationInfo, create_model, field_validator

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
from fedmerge.merging.strategies.rank_select import RankBand, RankSearch, abs_into
from fedmerge.merging.strategies.registry import register

# Elements per working chunk: 16 MiB of float32. Large enough that per-operation overhead is
# negligible (on a busy machine each operation pays a thread fork-join), small enough that
# temporaries stay far below one large tensor. Part of the definition
# of the random masks (draws are made chunk by chunk): changing it changes DARE/DELLA outputs.
CHUNK = 1 << 22
assert CHUNK < 1 << 24  # float32 counts of 0/1 flags over one chunk are exact
# Elements per block of TIES' sign election: its passes then stay in cache (a few MiB). Changes
# nothing in the result (every element gets the same operations).
ELECT_BLOCK = 1 << 22

Sparsification = Literal["none", "magnitude", "random", "outliers", "rank_sampling"]


# -- parameters ------------------------------------------------------------------------------------


class DensityWeight(ModelParams):
    weight: float = Field(1.0, description="scale of this model's task vector (applied before sign election)")
    density: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the task vector's entries kept")


class BreadcrumbsModel(DensityWeight):
    gamma: float = Field(0.01, ge=0.0, le=1.0, description="fraction of the largest-magnitude entries removed")


class DellaModel(DensityWeight):
    epsilon: float = Field(0.15, ge=0.0, le=0.5, description="keep probabilities range over density +/- epsilon")

    @field_validator("epsilon")
    @classmethod
    def _within_unit_interval(cls, eps: float, info: ValidationInfo) -> float:
        density = info.data.get("density")
        if density is not None and density < 1.0 and (density - eps < 0.0 or density + eps > 1.0):
            raise ValueError(f"density +/- epsilon must lie in [0, 1] (density={density}, epsilon={eps})")
        return eps


class TaskArithmeticParams(StrategyParams):
    """Global parameters of every variant; a variant's row changes only their defaults."""

    lambda_: float = Field(1.0, alias="lambda", description="scale of the combined task vector")
    normalize: bool = Field(False, description="divide by the summed weights of the contributing models")
    rescale: bool = Field(False, description="undo the shrinkage of sparsification (see rescale_mode)")
    rescale_mode: Literal["probability", "l1"] = Field("probability", description="probability: divide kept entries by their keep probability; l1: restore the L1 norm")
    int8_mask: bool = Field(False, description="accepted for mergekit configs; has no effect here")

    model_config = StrategyParams.model_config | {"populate_by_name": True}


class ConsensusParams(TaskArithmeticParams):
    consensus: Literal["sum", "count"] = Field("sum", description="sign election: sign of the weighted sum, or of the count of signs")


# -- the generalized merge -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPlan:
    """How one model's task vector is sparsified and scaled for one tensor."""

    weight: float
    density: float = 1.0
    gamma: float = 0.0
    epsilon: float = 0.0


@dataclass
class _Buffers:
    """Chunk-sized scratch space shared by every model of one tensor merge."""

    f: object  # float32: |delta|, uniform draws
    i: object  # int32: histogram keys
    k: object  # float32 0/1 keep mask
    k2: object  # float32 second mask


def generalized_merge(
    ctx: TensorContext,
    base,
    deltas: Sequence,
    plans: Sequence[ModelPlan],
    *,
    sparsification: Sparsification,
    consensus: Literal["sum", "count"] | None,
    normalize: bool,
    rescale: bool,
    rescale_mode: Literal["probability", "l1"],
    lambda_: float,
    chunk: int = CHUNK,
):
    """Pure tensor math of every method in this module; ``None`` deltas count as zero.

    Returns a new tensor shaped like ``base``; inputs are not modified.
    """
    merge = GeneralizedMerge(
        ctx, base.shape, base.dtype, base.device, plans, [d is not None for d in deltas],
        sparsification=sparsification, consensus=consensus, normalize=normalize, rescale=rescale,
        rescale_mode=rescale_mode, lambda_=lambda_, chunk=chunk,
    )  # fmt: skip
    return merge_in_memory(merge, base, deltas, out=ctx.result_like(base))


class GeneralizedMerge(StreamedTensor):
    """Every method of this module on one tensor, in passes over fixed chunks of its elements.

    Stages: the constructor lays the tensor out in chunks (``CHUNK`` elements; DELLA ranks within
    rows, so its chunks hold whole rows) and plans one ``_Sparsifier`` per model with a delta;
    ``passes`` yields the statistics the sparsifiers need (the magnitude ranks bounding TIES' and
    Breadcrumbs' masks, then the L1 norms of ``rescale_mode: l1``) and rewinds them; ``merge``
    combines one chunk (sparsify each delta, elect signs, sum, normalize, scale, add to the base).
    The chunks and the order of random draws are the same whether the tensor is held in memory
    or read again from disk for every pass, so both give the same bytes.
    """

    def __init__(
        self,
        ctx: TensorContext,
        shape: Sequence[int],
        dtype,
        device,
        plans: Sequence[ModelPlan],
        present: Sequence[bool],
        *,
        sparsification: Sparsification,
        consensus: Literal["sum", "count"] | None,
        normalize: bool,
        rescale: bool,
        rescale_mode: Literal["probability", "l1"],
        lambda_: float,
        chunk: int = CHUNK,
    ):
        n = 1
        for dim in shape:
            n *= int(dim)
        self.ctx, self.n, self.dtype, self.device = ctx, n, dtype, device
        self.consensus, self.normalize, self.lambda_ = consensus, normalize, lambda_
        self.rescale_l1 = rescale and rescale_mode == "l1"
        # DELLA ranks magnitudes within rows: chunks must hold whole rows.
        self.row = n // int(shape[0]) if len(shape) >= 2 and shape[0] else max(n, 1)
        self.chunks = flat_chunks(n, chunk, self.row if sparsification == "rank_sampling" else None) if n else [(0, 0)]
        self.size = max(1, self.chunks[0][1] - self.chunks[0][0])
        self.sparsifiers = [
            _Sparsifier(ctx, i, n, p, sparsification, rescale, rescale_mode, self.row, device)
            for i, (p, has) in enumerate(zip(plans, present))
            if has
        ]
        total_weight = sum(p.weight for p in plans)
        self._den_floor = _divisor_floor([sp.plan.weight for sp in self.sparsifiers], dtype)
        self.total_weight = 1.0 if abs(total_weight) < 1e-8 else total_weight  # as mergekit: nothing sensible to divide by
        self._scratch: dict[str, Any] | None = None

    # -- scratch space, taken when the first pass starts, given back by ``close`` ----------------------
    def _buffers(self) -> dict[str, Any]:
        import torch

        if self._scratch is None:
            size, dev, dtype = self.size, self.device, self.dtype
            ctx = self.ctx
            taken: list = []

            def take(dt):
                buf = ctx.scratch(size, dt, dev)
                taken.append(buf._base if buf._base is not None else buf)
                return buf

            bufs = _Buffers(take(torch.float32), take(torch.int32), take(torch.float32), take(torch.float32))
            for sp in self.sparsifiers:
                sp.bufs = bufs
            n_work = len(self.sparsifiers) if self.consensus else min(1, len(self.sparsifiers))
            self._scratch = {
                "bufs": bufs,
                "work": [take(dtype) for _ in range(n_work)],
                "acc": take(dtype),
                "den": take(dtype) if (self.consensus and self.normalize) else None,
                "sgn": take(dtype) if self.consensus else None,
                "one": torch.ones(1, dtype=dtype, device=dev),
            }
            self._taken = taken
        return self._scratch

    def close(self) -> None:
        if self._scratch is not None and self.ctx.workspace is not None:
            self.ctx.workspace.give(self._taken)
        self._scratch = None
        self._taken = []
        for sp in self.sparsifiers:
            sp.bufs = None

    # -- statistics -------------------------------------------------------------------------------------
    def passes(self):
        bufs = self._buffers()["bufs"]
        searches = [sp for sp in self.sparsifiers if sp.search is not None]
        while any(not sp.search.done for sp in searches):
            active = [sp for sp in searches if not sp.search.done]
            for sp in active:
                sp.search.begin_pass()
            yield FunctionPass(lambda s, e, base, deltas, active=active: [sp.search.observe(s, e, deltas[sp.index], bufs.f, bufs.i) for sp in active])
            for sp in active:
                sp.search.end_pass()
        for sp in searches:
            sp.band = RankBand.from_search(self.n, sp.band_lo, sp.band_hi, sp.search)
            sp.search = None
        if self.rescale_l1:
            tmp = self._buffers()["acc"]
            for sp in self.sparsifiers:
                sp.start()
            yield FunctionPass(lambda s, e, base, deltas: [sp.observe_l1(deltas[sp.index], tmp[: e - s]) for sp in self.sparsifiers])
            for sp in self.sparsifiers:
                sp.fit_l1()
        for sp in self.sparsifiers:
            sp.start()

    # -- one chunk of the output ------------------------------------------------------------------------
    def merge(self, start, end, base, deltas, out=None):
        import torch

        m = end - start
        if out is None:
            out = torch.empty_like(base)
        if not self.sparsifiers:
            out.copy_(base)
            return out
        sc = self._buffers()
        acc = sc["acc"][:m]
        if self.consensus is None:
            t = sc["work"][0][:m]
            for j, sp in enumerate(self.sparsifiers):
                sp.chunk(deltas[sp.index], acc if j == 0 else t)
                if j:
                    acc.add_(t)
            if self.normalize:
                acc.div_(self.total_weight)
        else:
            sgn, den = self._elect(sc, acc, [buf[:m] for buf in sc["work"]], deltas, m)
            # acc holds the agreeing models' summed magnitudes: the elected sign and the divisor
            # are applied in the pass that adds the result to the base.
            if den is None:
                torch.addcmul(base, acc, sgn, value=self.lambda_, out=out)
            else:
                torch.addcdiv(base, acc, den.mul_(sgn), value=self.lambda_, out=out)
            return out
        torch.add(base, acc, alpha=self.lambda_, out=out)
        return out

    def _elect(self, sc, acc, ts, deltas, m):
        """TIES' sign election over one chunk: leaves the agreeing models' summed magnitudes in
        ``acc`` and returns the elected signs (+1/-1) and, when normalizing, the divisor (never 0).

        The masks are made chunk by chunk (their tie counts and random draws are per chunk); the
        election, a dozen elementwise passes, runs over blocks of ``ELECT_BLOCK`` elements so
        each pass finds its operands in cache. Every element gets the same operations either way.
        """
        for sp, t in zip(self.sparsifiers, ts):
            sp.chunk(deltas[sp.index], t)
        for s in range(0, m, ELECT_BLOCK):
            e = min(m, s + ELECT_BLOCK)
            self._elect_block(sc, acc[s:e], [t[s:e] for t in ts], s, e)
        return sc["sgn"][:m], (sc["den"][:m] if sc["den"] is not None else None)

    def _elect_block(self, sc, acc, ts, s, e) -> None:
        import torch

        n = e - s
        # Elected sign per element as +1/-1; a tie elects +.
        sgn = sc["sgn"][s:e]
        if self.consensus == "sum":
            torch.add(ts[0], ts[1], out=acc) if len(ts) > 1 else acc.copy_(ts[0])
            for t in ts[2:]:
                acc.add_(t)
        else:
            torch.sign(ts[0], out=acc)
            for t in ts[1:]:
                acc.add_(torch.sign(t, out=sgn))
        # copysign(1, acc) is +1 for acc = +0 (a tie: x + (-x) rounds to +0); acc is -0 only
        # when every contribution is a signed zero, where no model can agree anyway.
        torch.copysign(sc["one"].expand(n), acc, out=sgn)
        # t * sgn > 0 exactly where a model agrees: clamping keeps |t| there and 0 elsewhere.
        den = sc["den"][s:e] if sc["den"] is not None else None
        for t in ts:
            t.mul_(sgn).clamp_(min=0)
        torch.add(ts[0], ts[1], out=acc) if len(ts) > 1 else acc.copy_(ts[0])
        for t in ts[2:]:
            acc.add_(t)
        if den is not None:
            for j, (sp, t) in enumerate(zip(self.sparsifiers, ts)):
                t.sign_()
                if j == 0:
                    torch.mul(t, sp.plan.weight, out=den)
                else:
                    den.add_(t, alpha=sp.plan.weight)
            if self._den_floor is not None:  # weights all positive: den is 0 only where acc is
                den.clamp_(min=self._den_floor)
            else:
                zero = sc["bufs"].k[s:e]
                torch.eq(den, 0, out=zero)
                den.add_(zero)  # no agreeing model: the numerator is 0, divide by 1


def _divisor_floor(weights: Sequence[float], dtype) -> float | None:
    """With positive weights a divisor of the sign election is 0 (no model agrees, so the
    numerator is 0 too) or at least the smallest weight: clamping it to the smallest normal
    number of ``dtype`` then replaces the test for 0 in one pass. None when a weight is not."""
    import torch

    tiny = torch.finfo(dtype).tiny if dtype.is_floating_point else 0.0
    return tiny if weights and min(weights) >= tiny else None


class _Sparsifier:
    """One model's sparsify-and-scale, applied chunk by chunk; replayable (``start`` rewinds)."""

    def __init__(self, ctx, index, n, plan: ModelPlan, method, rescale, rescale_mode, row, device):
        self.ctx, self.index, self.n, self.plan = ctx, index, n, plan
        self.method = method if (method != "none" and plan.density < 1.0) else "none"
        self.rescale, self.mode, self.row = rescale, rescale_mode, row
        self.dev = device
        self.bufs: _Buffers | None = None
        self.scale = plan.weight
        self.gen = None
        self.band: RankBand | None = None
        self.search: RankSearch | None = None
        self.band_lo = self.band_hi = 0
        if self.method == "magnitude":
            k = int(plan.density * n)
            self.band_lo, self.band_hi = n - k, n
        elif self.method == "outliers":
            keep_n = int(plan.density * n)
            n_top = int(plan.gamma * n)
            n_bot = n - keep_n - n_top
            if n_bot < 0:  # as mergekit: remove fewer outliers to reach the density
                n_top += n_bot
                n_bot = 0
            self.band_lo, self.band_hi = n_bot, n - n_top
        if self.method in ("magnitude", "outliers"):
            self.search = RankSearch(n, RankBand.ranks_needed(n, self.band_lo, self.band_hi), device)
            kept = max(0, min(self.band_hi, n) - max(self.band_lo, 0))
        if rescale and rescale_mode == "probability":
            if self.search is not None and kept:
                self.scale = plan.weight * n / kept
            elif self.method == "random" and plan.density > 0:
                self.scale = plan.weight / plan.density
            # rank_sampling divides each kept entry by its own probability (see _della_keep)
        self._before = self._after = 0.0

    def start(self):
        """Rewind before a pass: random masks are drawn afresh from the same per-(tensor, model)
        seed and tie counters restart, so a replayed pass sees exactly the same masks."""
        if self.method in ("random", "rank_sampling"):
            local = dataclasses.replace(self.ctx, device=str(self.dev))
            self.gen = local.generator(f"#sparsify:{self.index}")
        if self.band is not None:
            self.band.reset()

    def chunk(self, d, t, *, raw=False):
        """Write this model's processed delta for the next chunk ``d`` into ``t`` (``raw``: unscaled)."""
        import torch

        m = d.numel()
        scale = 1.0 if raw else self.scale
        if self.method == "none":
            torch.mul(d, scale, out=t)
            return t
        if self.method in ("magnitude", "outliers"):
            keep = self.band.mask(abs_into(d, self.bufs.f), self.bufs.k, self.bufs.k2)
        elif self.method == "random":
            u = self.bufs.f[:m]
            torch.rand(m, generator=self.gen, device=self.dev, out=u)
            keep = self.bufs.k[:m]
            torch.lt(u, self.plan.density, out=keep)
        else:
            keep = self._della_keep(d, raw)
        if scale != 1.0:
            keep.mul_(scale)
        if t.dtype == keep.dtype:
            torch.mul(d, keep, out=t)
        else:  # a mixed-dtype product written to a narrower out= goes through a fresh temporary
            t.copy_(keep.mul_(d))
        return t

    def _della_keep(self, d, raw):
        """MAGPRUNE keep mask for whole rows, divided by the keep probability when rescaling."""
        import torch

        m = d.numel()
        rows = max(1, m // self.row)
        length = m // rows
        order = d.abs().view(rows, length).argsort(dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(length, device=self.dev).expand(rows, length))
        p = ranks.view(-1).to(torch.float32)
        del order, ranks
        if length > 1:
            p.mul_(2.0 * self.plan.epsilon / (length - 1)).add_(self.plan.density - self.plan.epsilon)
        else:
            p.fill_(self.plan.density)
        u = self.bufs.f[:m]
        torch.rand(m, generator=self.gen, device=self.dev, out=u)
        keep = self.bufs.k[:m]
        torch.lt(u, p, out=keep)
        if self.rescale and self.mode == "probability" and not raw:
            keep.div_(p.clamp_(min=1e-12))  # a kept entry has p > 0; the others stay 0
        return keep

    def observe_l1(self, d, tmp) -> None:
        """Accumulate mergekit's L1 norms before and after sparsification over the next chunk."""
        import torch

        if self.method == "none":
            return
        self._before += float(d.abs().sum(dtype=torch.float64))
        t = self.chunk(d, tmp, raw=True)
        self._after += float(t.abs().sum(dtype=torch.float64))

    def fit_l1(self):
        """mergekit's rescale: scale the sparsified vector back to the original L1 norm."""
        if self.method != "none" and self._before >= 1e-7 and self._after >= 1e-7:
            self.scale = self.plan.weight * self._before / self._after


# -- the methods: one row each ---------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One generalized task-arithmetic method: its name, paper, the three choices and its defaults."""

    name: str
    paper: str
    sparsification: Sparsification
    consensus: bool  # TIES' sign election (the ``consensus`` parameter chooses sum or count)
    per_model: type[ModelParams]
    defaults: Mapping[str, Any]  # global parameters whose default differs from TaskArithmeticParams'
    doc: str  # first line: summary; then the formula


TIES_PAPER = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv:2306.01708)"
DARE_PAPER = "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, ICML 2024 (arXiv:2311.03099)"
DELLA_PAPER = "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (arXiv:2406.11617)"
BREADCRUMBS_PAPER = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024 (arXiv:2312.06795)"

VARIANTS: tuple[Variant, ...] = (
    Variant("ties", TIES_PAPER, "magnitude", True, DensityWeight, {"normalize": True}, """\
TIES-merging: trim to the top-density magnitudes, elect a sign per entry, disjoint mean.

tau_i = w_i * topk_{density_i}(|delta_i|) (entries outside the top-k are 0)
s     = sign(sum_i tau_i)            (consensus: sum)   |  sign(sum_i sign(tau_i))  (count)
theta = base + lambda * sum_i tau_i [sign(tau_i) = s] / sum_i w_i [sign(tau_i) = s]
(the division only with normalize, the default; where no model agrees the entry is base).
Weights are applied before the election, as in mergekit; with equal weights this is the
paper's elect + disjoint merge. Defaults: density 1, normalize true, rescale false, lambda 1.
"""),
    Variant("dare_ties", DARE_PAPER, "random", True, DensityWeight, {"rescale": True}, """\
DARE + TIES: drop each delta entry with probability 1 - density, rescale, then TIES' sign election.

m_i ~ Bernoulli(density_i) per entry (seeded per tensor and model)
tau_i = w_i * m_i * delta_i / density_i     (rescale true, rescale_mode probability: the paper)
theta = base + lambda * sum_i tau_i [sign(tau_i) = s]  (/ sum_i w_i [sign(tau_i) = s] if normalize)
Defaults as mergekit: rescale true, normalize false, lambda 1, consensus sum.
"""),
    Variant("dare_linear", DARE_PAPER, "random", False, DensityWeight, {"rescale": True}, """\
DARE: drop each delta entry with probability 1 - density, rescale, add (task arithmetic).

tau_i = w_i * m_i * delta_i / density_i,  m_i ~ Bernoulli(density_i)
theta = base + lambda * sum_i tau_i     (/ sum_i w_i if normalize)
Defaults as mergekit: rescale true, normalize false, lambda 1.
"""),
    Variant("della", DELLA_PAPER, "rank_sampling", True, DellaModel, {"normalize": True, "rescale": True}, """\
DELLA: magnitude-ranked random drop (MAGPRUNE), rescale by 1/p, TIES' sign election, scale lambda.

Within each row (a 1-D tensor is one row) entry j of rank r_j (ascending |delta|, 0..L-1) is kept
with probability p_j = density - epsilon + 2 epsilon r_j / (L - 1), mean density;
tau_i = w_i * m_i * delta_i / p     (rescale probability)
theta = base + lambda * sum_i tau_i [sign(tau_i) = s] / sum_i w_i [sign(tau_i) = s]
Defaults as mergekit: epsilon 0.15, normalize true, rescale true, lambda 1.
"""),
    Variant("della_linear", DELLA_PAPER, "rank_sampling", False, DellaModel, {"rescale": True}, """\
DELLA without sign election: MAGPRUNE each task vector, rescale, add.

theta = base + lambda * sum_i w_i m_i delta_i / p   (/ sum_i w_i if normalize)
Defaults as mergekit: epsilon 0.15, normalize false, rescale true, lambda 1.
"""),
    Variant("breadcrumbs", BREADCRUMBS_PAPER, "outliers", False, BreadcrumbsModel, {}, """\
Model Breadcrumbs: drop the largest gamma and the smallest entries of each task vector, add.

With n entries: the int(gamma n) largest |delta| and the n - int(density n) - int(gamma n)
smallest are removed, so int(density n) remain (fewer outliers are removed if density + gamma > 1);
theta = base + lambda * sum_i w_i mask_i delta_i     (/ sum_i w_i if normalize)
Defaults as mergekit: density 1, gamma 0.01, normalize false, rescale false, lambda 1.
"""),
    Variant("breadcrumbs_ties", BREADCRUMBS_PAPER, "outliers", True, BreadcrumbsModel, {}, """\
Model Breadcrumbs masks followed by TIES' sign election.

tau_i = w_i mask_i delta_i (as breadcrumbs);
theta = base + lambda * sum_i tau_i [sign(tau_i) = s]  (/ sum_i w_i [sign(tau_i) = s] if normalize)
Defaults as mergekit: density 1, gamma 0.01, normalize false, rescale false, consensus sum.
"""),
)


class GeneralizedTaskArithmetic(Strategy):
    """Shared body of every row of ``VARIANTS``: a method is its ``variant``."""

    variant: ClassVar[Variant]
    min_models = 1

    def __init__(self, params, model_params):
        super().__init__(params, model_params)
        # With nothing pruned (every density 1) no statistic over the tensor and no random draw
        # is involved: the engine may then stream large tensors in row chunks.
        self.elementwise = all(mp.density >= 1.0 for mp in self.model_params)

    @staticmethod
    def _plan(mp) -> ModelPlan:
        return ModelPlan(
            weight=mp.weight,
            density=mp.density,
            gamma=getattr(mp, "gamma", 0.0),
            epsilon=getattr(mp, "epsilon", 0.0),
        )

    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence):
        if len(deltas) != len(ctx.model_params):
            raise StrategyError(f"{self.name}: {len(deltas)} deltas for {ctx.name} but {len(ctx.model_params)} model parameter sets")
        return merge_in_memory(self.streamed(ctx, base.shape, base.dtype, [d is not None for d in deltas], device=base.device), base, deltas, out=ctx.result_like(base))

    def streams(self, name: str, shape: Sequence[int]) -> bool:
        return True

    def streamed(self, ctx: TensorContext, shape, dtype, present, device=None) -> GeneralizedMerge:
        p = self.params
        v = self.variant
        return GeneralizedMerge(
            ctx, shape, dtype, ctx.device if device is None else device, [self._plan(mp) for mp in ctx.model_params], present,
            sparsification=v.sparsification, consensus=p.consensus if v.consensus else None, normalize=p.normalize,
            rescale=p.rescale, rescale_mode=p.rescale_mode, lambda_=p.lambda_,
        )  # fmt: skip


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _params_class(v: Variant) -> type[StrategyParams]:
    """The variant's parameter schema: the shared fields with the row's defaults."""
    base = ConsensusParams if v.consensus else TaskArithmeticParams
    overrides = {}
    for key, default in v.defaults.items():
        info = base.model_fields[key]
        overrides[key] = (info.annotation, Field(default, description=info.description))
    return create_model(f"{_class_name(v.name)}Params", __base__=base, __module__=__name__, **overrides)


def _strategy_class(v: Variant) -> type[GeneralizedTaskArithmetic]:
    cls_name = _class_name(v.name)
    namespace = {
        "__doc__": v.doc,
        "__module__": __name__,
        "__qualname__": cls_name,
        "name": v.name,
        "paper": v.paper,
        "Params": _params_class(v),
        "PerModel": v.per_model,
        "variant": v,
        # DELLA's per-row ranking (argsort, int64 ranks) sets its peak and its pace: buffers kept
        # for reuse saved it no time and raised its peak to 997-1,000 MB on the 1.12 B set.
        "reuse_buffers": v.sparsification != "rank_sampling",
    }
    return register(type(cls_name, (GeneralizedTaskArithmetic,), namespace))


METHODS: dict[str, type[GeneralizedTaskArithmetic]] = {v.name: _strategy_class(v) for v in VARIANTS}
