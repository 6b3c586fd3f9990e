"""Exact rank selection on magnitudes: which elements of a tensor have their |x| rank in [lo, hi).

The sparsifying merges (TIES' top-k, Breadcrumbs' band without outliers) keep the elements whose
ascending rank by magnitude lies in a band. Sorting a large tensor is slow and its temporaries are
as large as the tensor, so this module finds the band exactly without a sort, streaming the tensor
in fixed-size chunks:

- ``rank_boundaries``: a seeded random sample brackets each wanted rank between two magnitudes;
  one pass counts the elements above the bracket and collects the few inside it, where the rank is
  read off exactly (with quantized bf16 deltas a bracket usually holds a single value and counting
  suffices). A bracket that misses is detected and ``radix_boundaries`` answers instead.
- ``radix_boundaries``: a two-level radix histogram over the float32 bits of |x| (the top 16 bits,
  then the low 16 bits of the bucket holding the rank) pins the exact 32-bit value.
- ``RankBand``: the 0/1 mask of the band, chunk by chunk.

Invariants (tested in tests/merging/test_rank_select.py):

- ranks order elements by |x|, then by flat index: among equal magnitudes the later element ranks
  higher, so exactly ``hi - lo`` elements are kept whatever the ties, deterministically;
- the result does not depend on the chunk size nor on whether the sample or the radix path ran;
- magnitudes are ranked in float32 (exact for bf16 and fp16 inputs; float64 is rounded);
- ``Boundary.equal_per_chunk`` is tied to the chunk size the boundaries were computed with:
  ``RankBand.mask`` must be called on the same consecutive chunks, in order (``reset`` rewinds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

_TOP_BUCKETS = 1 << 15  # |x| has a zero sign bit: the top 16 bits take values < 2**15
_LOW_BUCKETS = 1 << 16

SAMPLE = 1 << 15  # magnitudes sampled to bracket a rank before the exact pass


@dataclass(frozen=True)
class Boundary:
    """The magnitude at one ascending rank: how many elements lie below it, how many equal it,
    and how many of the equal ones fall in each chunk (so ties can be split without a search)."""

    value: float
    less: int
    equal: int
    equal_per_chunk: tuple[int, ...]


def chunks(n: int, size: int):
    """(start, end) of consecutive chunks of ``size`` elements covering ``range(n)``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def abs_into(x, buf):
    """|x| in float32, written into the front of ``buf`` (a view of it is returned)."""
    import torch

    out = buf[: x.numel()]
    if x.dtype == out.dtype:
        torch.abs(x, out=out)
    else:  # magnitudes are ranked in float32 (exact for bf16/fp16; float64 is rounded)
        out.copy_(x).abs_()
    return out


def rank_boundaries(flat, ranks: Sequence[int], fbuf, ibuf, sample: int = SAMPLE) -> list[Boundary]:
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
            per = tuple(int(eq[s:e].sum()) for s, e in chunks(n, fbuf.numel()))
            out.append(Boundary(v, less, sum(per), per))
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
    for s, e in chunks(n, fbuf.numel()):
        a = abs_into(flat[s:e], fbuf)
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
                out.append(Boundary(lo, below, sum(per), per))
                continue
            return radix_boundaries(flat, ranks, fbuf, ibuf)
        n_cand = sum(c.numel() for c in cands[j])
        below = n - above[j] - n_cand
        if not (below <= r < below + n_cand):
            return radix_boundaries(flat, ranks, fbuf, ibuf)
        values = torch.cat(cands[j])
        v = float(values.sort().values[r - below])  # kthvalue degrades on heavily repeated values
        less = below + int(torch.count_nonzero(values < v))
        per = tuple(int(torch.count_nonzero(c == v)) for c in cands[j])
        out.append(Boundary(v, less, sum(per), per))
    return out


def radix_boundaries(flat, ranks: Sequence[int], fbuf, ibuf) -> list[Boundary]:
    """Exact magnitudes at the given ascending ranks by a two-level radix histogram (the fallback).

    Level one histograms the top 16 bits of the float32 pattern of |x|, level two the low 16 bits
    of the elements in the bucket that holds the rank; together they pin the exact 32-bit value.
    """
    import torch

    n = flat.numel()
    dev = flat.device
    hist1 = torch.zeros(_TOP_BUCKETS, dtype=torch.int64, device=dev)
    for s, e in chunks(n, fbuf.numel()):
        a = abs_into(flat[s:e], fbuf)
        top = ibuf[: e - s]
        torch.bitwise_right_shift(a.view(torch.int32), 16, out=top)
        hist1 += torch.bincount(top, minlength=_TOP_BUCKETS)[:_TOP_BUCKETS]
    cum1 = hist1.cumsum(0)
    rank_t = torch.tensor(list(ranks), dtype=torch.int64, device=dev)
    buckets = torch.searchsorted(cum1, rank_t, right=True).tolist()
    below = {b: int(cum1[b] - hist1[b]) for b in set(buckets)}

    per_chunk: dict[int, list] = {b: [] for b in below}
    for s, e in chunks(n, fbuf.numel()):
        a = abs_into(flat[s:e], fbuf)
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
        out.append(Boundary(float(bits[0]), below[b] + int(cum2[j] - low[j]), int(low[j]), tuple(chunk_hists[:, j].tolist())))
    return out


class RankBand:
    """Mask of the elements whose ascending magnitude rank lies in [lo, hi).

    Ranks order by |x| and then by flat index, so ties at a boundary are split exactly. ``mask``
    must be called on the same consecutive chunks as the boundaries were computed on, in order.
    """

    def __init__(self, flat, lo: int, hi: int, fbuf, ibuf, sample: int = SAMPLE):
        n = flat.numel()
        self.lo, self.hi, self.n = max(lo, 0), min(hi, n), n
        wanted = []
        if self.lo < self.hi:
            if self.lo > 0:
                wanted.append(self.lo)
            if self.hi < n:
                wanted.append(self.hi - 1)
        found = dict(zip(wanted, rank_boundaries(flat, wanted, fbuf, ibuf, sample))) if wanted else {}
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
