"""TIES, DARE, DELLA and Model Breadcrumbs as settings of one generalized task-arithmetic merge.

Every method here computes, per tensor and per element,

    theta = base + lambda * combine_i( w_i * s_i * sparsify_i(delta_i) )

and differs only in three choices:

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
the agreeing models, per element; without: sum_i w_i).

Speed: a tensor is processed in fixed-size chunks of its flattened elements, so the temporary
memory is a few chunks whatever the tensor size. The top-k threshold is found exactly without a
sort: a seeded sample brackets it, one streaming pass counts what lies above the bracket and
collects the few magnitudes inside (with quantized bf16 deltas the bracket usually holds a single
value and counting suffices); a two-level radix histogram over the float bits of |delta| is the
fallback. Among equal magnitudes the element with the larger flat index ranks higher, so exactly
k elements are kept, deterministically.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

from pydantic import Field, ValidationInfo, field_validator

from fedmerge.merging.strategies.base import ModelParams, Strategy, StrategyError, StrategyParams, TensorContext, register

# Elements per working chunk: 16 MiB of float32. Large enough that per-operation overhead is
# negligible (on a busy machine each operation pays a thread fork-join), small enough that
# temporaries stay far below one large tensor. Part of the definition
# of the random masks (draws are made chunk by chunk): changing it changes DARE/DELLA outputs.
CHUNK = 1 << 22
assert CHUNK < 1 << 24  # float32 counts of 0/1 flags over one chunk are exact

_TOP_BUCKETS = 1 << 15  # |x| has a zero sign bit: the top 16 bits take values < 2**15
_LOW_BUCKETS = 1 << 16

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


class _TaskArithmeticBase(StrategyParams):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the combined task vector")
    normalize: bool = False
    rescale: bool = False
    rescale_mode: Literal["probability", "l1"] = "probability"
    int8_mask: bool = Field(False, description="accepted for mergekit configs; has no effect here")

    model_config = StrategyParams.model_config | {"populate_by_name": True}


class _WithConsensus(_TaskArithmeticBase):
    consensus: Literal["sum", "count"] = "sum"


class TiesParams(_WithConsensus):
    normalize: bool = True


class DareTiesParams(_WithConsensus):
    rescale: bool = True


class DareLinearParams(_TaskArithmeticBase):
    rescale: bool = True


class DellaParams(_WithConsensus):
    normalize: bool = True
    rescale: bool = True


class DellaLinearParams(_TaskArithmeticBase):
    rescale: bool = True


class BreadcrumbsParams(_TaskArithmeticBase):
    pass


class BreadcrumbsTiesParams(_WithConsensus):
    pass


# -- exact rank selection on magnitudes ------------------------------------------------------------


@dataclass(frozen=True)
class _Boundary:
    """The magnitude at one ascending rank: how many elements lie below it, how many equal it,
    and how many of the equal ones fall in each chunk (so ties can be split without a search)."""

    value: float
    less: int
    equal: int
    equal_per_chunk: tuple[int, ...]


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _abs_into(x, buf):
    import torch

    out = buf[: x.numel()]
    if x.dtype == out.dtype:
        torch.abs(x, out=out)
    else:  # magnitudes are ranked in float32 (exact for bf16/fp16; float64 is rounded)
        out.copy_(x).abs_()
    return out


_SAMPLE = 1 << 15  # magnitudes sampled to bracket a rank before the exact pass


def _rank_boundaries(flat, ranks: Sequence[int], fbuf, ibuf, sample: int = _SAMPLE) -> list[_Boundary]:
    """For each 0-based ascending rank r of |flat|, the exact magnitude found there.

    A seeded random sample brackets each rank between two magnitudes (a wide margin of order
    statistics); one streaming pass then counts the elements above the bracket and collects the
    few inside it, where the rank is read off exactly. If a bracket misses (vanishingly rare and
    detected), the radix histogram gives the answer instead. Either way the result is exact.
    """
    import torch

    n = flat.numel()
    dev = flat.device
    if not ranks:
        return []
    if n <= sample:
        ordered = flat.abs().float()
        values, order = torch.sort(ordered, stable=True)
        out = []
        for r in ranks:
            v = float(values[r])
            less = int(torch.searchsorted(values, torch.tensor([v], device=dev), right=False)[0])
            eq = (ordered == v)
            per = tuple(int(eq[s:e].sum()) for s, e in _chunks(n, fbuf.numel()))
            out.append(_Boundary(v, less, sum(per), per))
        return out

    gen = torch.Generator(device=dev).manual_seed(n)
    idx = torch.randint(n, (sample,), generator=gen, device=dev)
    drawn = flat[idx].abs().float().sort().values
    brackets = []
    for r in ranks:
        q = (r + 0.5) / n
        margin = 6.0 * math.sqrt(q * (1.0 - q) / sample) + 4.0 / sample
        i_lo, i_hi = math.floor((q - margin) * sample), math.ceil((q + margin) * sample)
        lo = float(drawn[i_lo]) if i_lo > 0 else -1.0
        hi = float(drawn[i_hi]) if i_hi < sample - 1 else math.inf
        brackets.append((lo, hi))

    # Quantized (e.g. bf16) deltas tie heavily: a bracket often holds one value, then counts suffice.
    above = [0] * len(ranks)
    cands: list[list] = [[] for _ in ranks]
    scratch = ibuf.view(torch.float32)  # comparisons into float 0/1 are far cheaper than into bool
    for s, e in _chunks(n, fbuf.numel()):
        a = _abs_into(flat[s:e], fbuf)
        flag = scratch[: e - s]
        for j, (lo, hi) in enumerate(brackets):
            torch.gt(a, hi, out=flag)
            above[j] += int(flag.sum())  # exact: 0/1 partial sums stay below 2**24
            if lo == hi:
                torch.eq(a, lo, out=flag)
                cands[j].append(int(flag.sum()))
            else:
                cands[j].append(a[(a >= lo) & (a <= hi)])

    out = []
    for j, r in enumerate(ranks):
        lo, hi = brackets[j]
        if lo == hi:
            per = tuple(cands[j])
            below = n - above[j] - sum(per)
            if below <= r < below + sum(per):
                out.append(_Boundary(lo, below, sum(per), per))
                continue
            return _radix_boundaries(flat, ranks, fbuf, ibuf)
        n_cand = sum(c.numel() for c in cands[j])
        below = n - above[j] - n_cand
        if not (below <= r < below + n_cand):
            return _radix_boundaries(flat, ranks, fbuf, ibuf)
        values = torch.cat(cands[j])
        v = float(values.sort().values[r - below])  # kthvalue degrades on heavily repeated values
        less = below + int(torch.count_nonzero(values < v))
        per = tuple(int(torch.count_nonzero(c == v)) for c in cands[j])
        out.append(_Boundary(v, less, sum(per), per))
    return out


def _radix_boundaries(flat, ranks: Sequence[int], fbuf, ibuf) -> list[_Boundary]:
    """Exact magnitudes at the given ascending ranks by a two-level radix histogram (the fallback).

    Level one histograms the top 16 bits of the float32 pattern of |x|, level two the low 16 bits
    of the elements in the bucket that holds the rank; together they pin the exact 32-bit value.
    """
    import torch

    n = flat.numel()
    dev = flat.device
    hist1 = torch.zeros(_TOP_BUCKETS, dtype=torch.int64, device=dev)
    for s, e in _chunks(n, fbuf.numel()):
        a = _abs_into(flat[s:e], fbuf)
        top = ibuf[: e - s]
        torch.bitwise_right_shift(a.view(torch.int32), 16, out=top)
        hist1 += torch.bincount(top, minlength=_TOP_BUCKETS)[:_TOP_BUCKETS]
    cum1 = hist1.cumsum(0)
    rank_t = torch.tensor(list(ranks), dtype=torch.int64, device=dev)
    buckets = torch.searchsorted(cum1, rank_t, right=True).tolist()
    below = {b: int(cum1[b] - hist1[b]) for b in set(buckets)}

    per_chunk: dict[int, list] = {b: [] for b in below}
    for s, e in _chunks(n, fbuf.numel()):
        a = _abs_into(flat[s:e], fbuf)
        key = ibuf[: e - s]
        for b, hists in per_chunk.items():
            # Elements of bucket b map to 1..65536, the others to the two sentinels 0 and 65537.
            torch.sub(a.view(torch.int32), b << 16, out=key)
            key.clamp_(-1, _LOW_BUCKETS).add_(1)
            hists.append(torch.bincount(key, minlength=_LOW_BUCKETS + 2)[1 : _LOW_BUCKETS + 1])

    out = []
    for r, b in zip(ranks, buckets):
        chunk_hists = torch.stack(per_chunk[b])
        low = chunk_hists.sum(0)
        cum2 = low.cumsum(0)
        j = int(torch.searchsorted(cum2, torch.tensor([r - below[b]], device=dev), right=True)[0])
        bits = torch.tensor([(b << 16) | j], dtype=torch.int32).view(torch.float32)
        out.append(_Boundary(float(bits[0]), below[b] + int(cum2[j] - low[j]), int(low[j]), tuple(chunk_hists[:, j].tolist())))
    return out


class _RankBand:
    """Mask of the elements whose ascending magnitude rank lies in [lo, hi).

    Ranks order by |x| and then by flat index, so ties at a boundary are split exactly. ``mask``
    must be called on the same consecutive chunks as the boundaries were computed on, in order.
    """

    def __init__(self, flat, lo: int, hi: int, fbuf, ibuf, sample: int = _SAMPLE):
        n = flat.numel()
        self.lo, self.hi, self.n = max(lo, 0), min(hi, n), n
        wanted = []
        if self.lo < self.hi:
            if self.lo > 0:
                wanted.append(self.lo)
            if self.hi < n:
                wanted.append(self.hi - 1)
        found = dict(zip(wanted, _rank_boundaries(flat, wanted, fbuf, ibuf, sample))) if wanted else {}
        self.lower = found.get(self.lo) if self.lo > 0 else None
        self.upper = found.get(self.hi - 1) if self.hi < n else None
        self._ties = {b.value: b for b in (self.lower, self.upper) if b is not None}
        self.reset()

    def reset(self) -> None:
        self._chunk = 0
        self._next_rank = {v: b.less for v, b in self._ties.items()}  # rank of the next tied element

    @property
    def empty(self) -> bool:
        return self.lo >= self.hi

    @property
    def kept(self) -> int:
        return max(0, self.hi - self.lo)

    def mask(self, a, kbuf, kbuf2):
        """``a``: |x| for the next chunk. Returns a float 0/1 mask (a view of ``kbuf``)."""
        import torch

        keep = kbuf[: a.numel()]
        if self.empty:
            return keep.zero_()
        # For each boundary value: do the tied elements of this chunk all fall inside the band,
        # all outside, or some of each (only then are their positions needed)?
        state = {}
        for v, b in self._ties.items():
            first = self._next_rank[v]
            count = b.equal_per_chunk[self._chunk]
            self._next_rank[v] = first + count
            if first >= self.lo and first + count <= self.hi:
                state[v] = ("in", first)
            elif first + count <= self.lo or first >= self.hi:
                state[v] = ("out", first)
            else:
                state[v] = ("split", first)
        self._chunk += 1
        if self.lower is not None:
            op = torch.gt if state[self.lower.value][0] == "out" else torch.ge
            op(a, self.lower.value, out=keep)
        else:
            keep.fill_(1.0)
        if self.upper is not None:
            tmp = kbuf2[: a.numel()]
            op = torch.lt if state[self.upper.value][0] == "out" else torch.le
            op(a, self.upper.value, out=tmp)
            keep.mul_(tmp)
        for v, (kind, first) in state.items():
            if kind == "split":
                self._drop_ties(a, keep, v, self.lo - first, self.hi - first, kbuf2)
        return keep

    @staticmethod
    def _drop_ties(a, keep, value: float, lo: int, hi: int, scratch) -> None:
        """Zero ``keep`` at the tied elements (|x| == value) of this chunk whose index among the
        chunk's tied elements (0, 1, ... in order) falls outside [lo, hi)."""
        import torch

        m = a.numel()
        flag = scratch[:m]
        torch.eq(a, value, out=flag)
        count = torch.cumsum(flag, 0)  # 1, 2, ... at tied elements; exact in float32 (m < 2**24)
        drop = torch.empty_like(count)
        torch.le(count, lo, out=drop)  # count - 1 < lo
        torch.gt(count, hi, out=count)  # count - 1 >= hi
        keep.sub_(drop.add_(count).mul_(flag))  # those tied elements had keep = 1


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
    import torch

    flat_base = base.reshape(-1)
    n = flat_base.numel()
    dev = flat_base.device
    dtype = flat_base.dtype

    # DELLA ranks magnitudes within rows: chunks must hold whole rows.
    row = base.numel() // base.shape[0] if base.dim() >= 2 and base.shape[0] else max(n, 1)
    if sparsification == "rank_sampling":
        chunk = max(1, chunk // row) * row
    size = max(1, min(chunk, n))
    bufs = _Buffers(
        f=torch.empty(size, dtype=torch.float32, device=dev),
        i=torch.empty(size, dtype=torch.int32, device=dev),
        k=torch.empty(size, dtype=torch.float32, device=dev),
        k2=torch.empty(size, dtype=torch.float32, device=dev),
    )
    sparsifiers = [
        _Sparsifier(ctx, i, d.reshape(-1), p, sparsification, rescale, rescale_mode, row, bufs, size)
        for i, (d, p) in enumerate(zip(deltas, plans))
        if d is not None
    ]
    if rescale and rescale_mode == "l1":
        for sp in sparsifiers:
            sp.fit_l1()

    total_weight = sum(p.weight for p in plans)
    if abs(total_weight) < 1e-8:
        total_weight = 1.0  # as mergekit: nothing sensible to divide by

    out = torch.empty_like(flat_base)
    n_work = len(sparsifiers) if consensus else min(1, len(sparsifiers))
    work = [torch.empty(size, dtype=dtype, device=dev) for _ in range(n_work)]
    acc_buf = torch.empty(size, dtype=dtype, device=dev)
    den_buf = torch.empty(size, dtype=dtype, device=dev) if (consensus and normalize) else None
    sgn_buf = torch.empty(size, dtype=dtype, device=dev) if consensus else None
    ones = torch.ones(size, dtype=dtype, device=dev) if consensus else None

    for sp in sparsifiers:
        sp.start()
    for s, e in _chunks(n, size):
        m = e - s
        acc = acc_buf[:m]
        if not sparsifiers:
            out[s:e] = flat_base[s:e]
            continue
        if consensus is None:
            t = work[0][:m]
            for j, sp in enumerate(sparsifiers):
                sp.chunk(s, e, acc if j == 0 else t)
                if j:
                    acc.add_(t)
            if normalize:
                acc.div_(total_weight)
        else:
            ts = [buf[:m] for buf in work]
            for sp, t in zip(sparsifiers, ts):
                sp.chunk(s, e, t)
            # Elected sign per element as +1/-1; a tie elects +.
            sgn = sgn_buf[:m]
            if consensus == "sum":
                torch.add(ts[0], ts[1], out=acc) if len(ts) > 1 else acc.copy_(ts[0])
                for t in ts[2:]:
                    acc.add_(t)
            else:
                torch.sign(ts[0], out=acc)
                for t in ts[1:]:
                    acc.add_(torch.sign(t, out=sgn))
            # copysign(1, acc) is +1 for acc = +0 (a tie: x + (-x) rounds to +0); acc is -0 only
            # when every contribution is a signed zero, where no model can agree anyway.
            torch.copysign(ones[:m], acc, out=sgn)
            # t * sgn > 0 exactly where a model agrees: clamping keeps |t| there and 0 elsewhere.
            den = den_buf[:m] if den_buf is not None else None
            for j, (sp, t) in enumerate(zip(sparsifiers, ts)):
                t.mul_(sgn).clamp_(min=0)
                if j == 0:
                    acc.copy_(t)
                else:
                    acc.add_(t)
                if den is not None:
                    t.sign_()
                    if j == 0:
                        torch.mul(t, sp.plan.weight, out=den)
                    else:
                        den.add_(t, alpha=sp.plan.weight)
            acc.mul_(sgn)
            if den is not None:
                zero = bufs.k[:m]
                torch.eq(den, 0, out=zero)
                den.add_(zero)  # no agreeing model: the numerator is 0, divide by 1
                acc.div_(den)
        torch.add(flat_base[s:e], acc, alpha=lambda_, out=out[s:e])
    return out.view(base.shape)


class _Sparsifier:
    """One model's sparsify-and-scale, applied chunk by chunk; replayable (``start`` rewinds)."""

    def __init__(self, ctx, index, flat, plan: ModelPlan, method, rescale, rescale_mode, row, bufs: _Buffers, size: int):
        self.ctx, self.index, self.flat, self.plan = ctx, index, flat, plan
        self.method = method if (method != "none" and plan.density < 1.0) else "none"
        self.rescale, self.mode, self.row = rescale, rescale_mode, row
        self.bufs, self.size = bufs, size
        self.dev = flat.device
        self.scale = plan.weight
        self.gen = None
        n = flat.numel()
        self.band = None
        if self.method == "magnitude":
            k = int(plan.density * n)
            self.band = _RankBand(flat, n - k, n, bufs.f, bufs.i)
        elif self.method == "outliers":
            keep_n = int(plan.density * n)
            n_top = int(plan.gamma * n)
            n_bot = n - keep_n - n_top
            if n_bot < 0:  # as mergekit: remove fewer outliers to reach the density
                n_top += n_bot
                n_bot = 0
            self.band = _RankBand(flat, n_bot, n - n_top, bufs.f, bufs.i)
        if rescale and rescale_mode == "probability":
            if self.band is not None and self.band.kept:
                self.scale = plan.weight * n / self.band.kept
            elif self.method == "random" and plan.density > 0:
                self.scale = plan.weight / plan.density
            # rank_sampling divides each kept entry by its own probability (see _della_chunk)

    def start(self):
        """Rewind before a pass: random masks are drawn afresh from the same per-(tensor, model)
        seed and tie counters restart, so a replayed pass sees exactly the same masks."""
        if self.method in ("random", "rank_sampling"):
            local = dataclasses.replace(self.ctx, device=str(self.dev))
            self.gen = local.generator(f"#sparsify:{self.index}")
        if self.band is not None:
            self.band.reset()

    def chunk(self, s, e, t, *, raw=False):
        """Write this model's processed delta for elements [s, e) into ``t`` (``raw``: unscaled)."""
        import torch

        d = self.flat[s:e]
        m = e - s
        scale = 1.0 if raw else self.scale
        if self.method == "none":
            torch.mul(d, scale, out=t)
            return t
        if self.method in ("magnitude", "outliers"):
            keep = self.band.mask(_abs_into(d, self.bufs.f), self.bufs.k, self.bufs.k2)
        elif self.method == "random":
            u = self.bufs.f[:m]
            torch.rand(m, generator=self.gen, device=self.dev, out=u)
            keep = self.bufs.k[:m]
            torch.lt(u, self.plan.density, out=keep)
        else:
            keep = self._della_keep(d, raw)
        if scale != 1.0:
            keep.mul_(scale)
        torch.mul(d, keep, out=t)
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

    def fit_l1(self):
        """mergekit's rescale: scale the sparsified vector back to the original L1 norm."""
        import torch

        if self.method == "none":
            return
        before = after = 0.0
        self.start()
        tmp = torch.empty(self.size, dtype=self.flat.dtype, device=self.dev)
        for s, e in _chunks(self.flat.numel(), self.size):
            before += float(self.flat[s:e].abs().sum(dtype=torch.float64))
            t = self.chunk(s, e, tmp[: e - s], raw=True)
            after += float(t.abs().sum(dtype=torch.float64))
        if before >= 1e-7 and after >= 1e-7:
            self.scale = self.plan.weight * before / after


# -- the registered methods ------------------------------------------------------------------------


class _GeneralizedTaskArithmetic(Strategy):
    """Shared body: a method is its class variables (see the module docstring)."""

    sparsification: ClassVar[Sparsification] = "none"
    uses_consensus: ClassVar[bool] = False

    def __init__(self, params, model_params):
        super().__init__(params, model_params)
        # With nothing pruned (every density 1) no statistic over the tensor and no random draw
        # is involved: the engine may then stream large tensors in row chunks.
        self.elementwise = all(mp.density >= 1.0 for mp in self.model_params)

    def _plan(self, mp) -> ModelPlan:
        return ModelPlan(
            weight=mp.weight,
            density=mp.density,
            gamma=getattr(mp, "gamma", 0.0),
            epsilon=getattr(mp, "epsilon", 0.0),
        )

    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence):
        if len(deltas) != len(ctx.model_params):
            raise StrategyError(f"{self.name}: {len(deltas)} deltas for {ctx.name} but {len(ctx.model_params)} model parameter sets")
        p = self.params
        return generalized_merge(
            ctx,
            base,
            deltas,
            [self._plan(mp) for mp in ctx.model_params],
            sparsification=self.sparsification,
            consensus=p.consensus if self.uses_consensus else None,
            normalize=p.normalize,
            rescale=p.rescale,
            rescale_mode=p.rescale_mode,
            lambda_=p.lambda_,
        )


@register
class Ties(_GeneralizedTaskArithmetic):
    """TIES-merging: trim to the top-density magnitudes, elect a sign per entry, disjoint mean.

    tau_i = w_i * topk_{density_i}(|delta_i|) (entries outside the top-k are 0)
    s     = sign(sum_i tau_i)            (consensus: sum)   |  sign(sum_i sign(tau_i))  (count)
    theta = base + lambda * sum_i tau_i [sign(tau_i) = s] / sum_i w_i [sign(tau_i) = s]
    (the division only with normalize, the default; where no model agrees the entry is base).
    Weights are applied before the election, as in mergekit; with equal weights this is the
    paper's elect + disjoint merge. Defaults: density 1, normalize true, rescale false, lambda 1.
    """

    name = "ties"
    paper = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv:2306.01708)"
    Params = TiesParams
    PerModel = DensityWeight
    sparsification = "magnitude"
    uses_consensus = True


@register
class DareTies(_GeneralizedTaskArithmetic):
    """DARE + TIES: drop each delta entry with probability 1 - density, rescale, then TIES' sign election.

    m_i ~ Bernoulli(density_i) per entry (seeded per tensor and model)
    tau_i = w_i * m_i * delta_i / density_i     (rescale true, rescale_mode probability: the paper)
    theta = base + lambda * sum_i tau_i [sign(tau_i) = s]  (/ sum_i w_i [sign(tau_i) = s] if normalize)
    Defaults as mergekit: rescale true, normalize false, lambda 1, consensus sum.
    """

    name = "dare_ties"
    paper = "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, ICML 2024 (arXiv:2311.03099)"
    Params = DareTiesParams
    PerModel = DensityWeight
    sparsification = "random"
    uses_consensus = True


@register
class DareLinear(_GeneralizedTaskArithmetic):
    """DARE: drop each delta entry with probability 1 - density, rescale, add (task arithmetic).

    tau_i = w_i * m_i * delta_i / density_i,  m_i ~ Bernoulli(density_i)
    theta = base + lambda * sum_i tau_i     (/ sum_i w_i if normalize)
    Defaults as mergekit: rescale true, normalize false, lambda 1.
    """

    name = "dare_linear"
    paper = DareTies.paper
    Params = DareLinearParams
    PerModel = DensityWeight
    sparsification = "random"


@register
class Della(_GeneralizedTaskArithmetic):
    """DELLA: magnitude-ranked random drop (MAGPRUNE), rescale by 1/p, TIES' sign election, scale lambda.

    Within each row (a 1-D tensor is one row) entry j of rank r_j (ascending |delta|, 0..L-1) is kept
    with probability p_j = density - epsilon + 2 epsilon r_j / (L - 1), mean density;
    tau_i = w_i * m_i * delta_i / p     (rescale probability)
    theta = base + lambda * sum_i tau_i [sign(tau_i) = s] / sum_i w_i [sign(tau_i) = s]
    Defaults as mergekit: epsilon 0.15, normalize true, rescale true, lambda 1.
    """

    name = "della"
    paper = "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (arXiv:2406.11617)"
    Params = DellaParams
    PerModel = DellaModel
    sparsification = "rank_sampling"
    uses_consensus = True


@register
class DellaLinear(_GeneralizedTaskArithmetic):
    """DELLA without sign election: MAGPRUNE each task vector, rescale, add.

    theta = base + lambda * sum_i w_i m_i delta_i / p   (/ sum_i w_i if normalize)
    Defaults as mergekit: epsilon 0.15, normalize false, rescale true, lambda 1.
    """

    name = "della_linear"
    paper = Della.paper
    Params = DellaLinearParams
    PerModel = DellaModel
    sparsification = "rank_sampling"


@register
class Breadcrumbs(_GeneralizedTaskArithmetic):
    """Model Breadcrumbs: drop the largest gamma and the smallest entries of each task vector, add.

    With n entries: the int(gamma n) largest |delta| and the n - int(density n) - int(gamma n)
    smallest are removed, so int(density n) remain (fewer outliers are removed if density + gamma > 1);
    theta = base + lambda * sum_i w_i mask_i delta_i     (/ sum_i w_i if normalize)
    Defaults as mergekit: density 1, gamma 0.01, normalize false, rescale false, lambda 1.
    """

    name = "breadcrumbs"
    paper = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024 (arXiv:2312.06795)"
    Params = BreadcrumbsParams
    PerModel = BreadcrumbsModel
    sparsification = "outliers"


@register
class BreadcrumbsTies(_GeneralizedTaskArithmetic):
    """Model Breadcrumbs masks followed by TIES' sign election.

    tau_i = w_i mask_i delta_i (as breadcrumbs);
    theta = base + lambda * sum_i tau_i [sign(tau_i) = s]  (/ sum_i w_i [sign(tau_i) = s] if normalize)
    Defaults as mergekit: density 1, gamma 0.01, normalize false, rescale false, consensus sum.
    """

    name = "breadcrumbs_ties"
    paper = Breadcrumbs.paper
    Params = BreadcrumbsTiesParams
    PerModel = BreadcrumbsModel
    sparsification = "outliers"
    uses_consensus = True
