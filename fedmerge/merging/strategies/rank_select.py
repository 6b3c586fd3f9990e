"""Exact rank selection on magnitudes: which elements of a tensor have their |x| rank in [lo, hi).

The sparsifying merges (TIES' top-k, Breadcrumbs' band without outliers) keep the elements whose
ascending rank by magnitude lies in a band. Sorting a large tensor is slow and its temporaries are
as large as the tensor, so this module finds the band exactly without a sort, streaming the tensor
in fixed-size chunks:

- ``RankSearch``: the search below as passes over a tensor fed in chunks, so a tensor too large
  to hold (read again from disk for every pass) is ranked as exactly as one in memory;
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

import functools
import math
from dataclasses import dataclass
from typing import Sequence

_TOP_BUCKETS = 1 << 15  # |x| has a zero sign bit: the top 16 bits take values < 2**15
_LOW_BUCKETS = 1 << 16

SAMPLE = 1 << 15  # fewest magnitudes sampled to bracket a rank before the exact pass
SAMPLE_MAX = 1 << 18  # most: a larger sample narrows the bracket (fewer candidates to collect)


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


class RankSearch:
    """The exact magnitudes at given ascending ranks of |x|, for x fed in chunks, in passes.

    The chunks must be the same consecutive ranges in every pass (``Boundary.equal_per_chunk``
    counts per chunk). Phases, one pass each: ``sample`` (the seeded sample that brackets each
    rank), ``count`` (elements above each bracket, the candidates inside it), and only when a
    bracket misses, ``radix_top`` and ``radix_low`` (the two radix histograms). A tensor of at
    most ``sample`` elements is gathered whole in one ``exact`` pass and sorted. ``observe`` each
    chunk of a pass, then ``end_pass``; ``result`` is set once ``done``.
    """

    def __init__(self, n: int, ranks: Sequence[int], device, sample: int | None = None, radix: bool = False):
        sample = sample_size(n) if sample is None else sample
        self.n, self.ranks, self.device, self.sample = n, list(ranks), device, sample
        self.result: list[Boundary] | None = None
        self._parts: list = []
        if not self.ranks:
            self.phase = "done"
            self.result = []
        elif radix:
            self.phase = "radix_top"
        else:
            self.phase = "exact" if n <= sample else "sample"
        if self.phase == "sample":
            self._picks = _sample_positions(n, sample, str(device))  # gathered chunk by chunk: the same multiset as flat[idx]

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def observe(self, start: int, end: int, x, fbuf, ibuf) -> None:
        """Feed the chunk of elements [start, end); ``fbuf`` (float32) and ``ibuf`` (int32) are
        scratch space of at least ``end - start`` elements."""
        import torch

        if self.phase == "exact":
            self._parts.append(x.abs().float())
            self._chunk_sizes.append(end - start)
        elif self.phase == "sample":
            lo, hi = (int(v) for v in torch.searchsorted(self._picks, torch.tensor([start, end], device=self._picks.device)))
            self._parts.append(torch.index_select(x, 0, self._picks[lo:hi] - start))  # a quarter of x[...]'s time
        elif self.phase == "count":
            a = abs_into(x, fbuf)
            flag = ibuf.view(torch.float32)[: end - start]  # comparisons into float 0/1 are far cheaper than into bool
            for j, (lo, hi) in enumerate(self._brackets):
                if lo == hi:
                    torch.gt(a, hi, out=flag)
                    self._above[j] += int(flag.sum())  # exact: 0/1 partial sums stay below 2**24
                    torch.eq(a, lo, out=flag)
                    self._cands[j].append(int(flag.sum()))
                else:  # the bool mask of the elements above the bracket also cuts the bracket's out
                    above = a > hi
                    self._above[j] += int(torch.count_nonzero(above))
                    inside = a >= lo
                    self._cands[j].append(a[inside.logical_xor_(above)])
        elif self.phase == "radix_top":
            a = abs_into(x, fbuf)
            top = ibuf[: end - start]
            torch.bitwise_right_shift(a.view(torch.int32), 16, out=top)
            self._hist1 += torch.bincount(top, minlength=_TOP_BUCKETS)[:_TOP_BUCKETS]
        elif self.phase == "radix_low":
            a = abs_into(x, fbuf)
            key = ibuf[: end - start]
            for b, hists in self._per_chunk.items():
                # Elements of bucket b map to 1..65536, the others to the two sentinels 0 and 65537.
                torch.sub(a.view(torch.int32), b << 16, out=key)
                key.clamp_(-1, _LOW_BUCKETS).add_(1)
                hists.append(torch.bincount(key, minlength=_LOW_BUCKETS + 2)[1 : _LOW_BUCKETS + 1])

    def begin_pass(self) -> None:
        """Called before the first chunk of each pass (sets up the phase's accumulators)."""
        import torch

        self._chunk_sizes: list[int] = []
        if self.phase == "count":
            self._above = [0] * len(self.ranks)
            self._cands: list[list] = [[] for _ in self.ranks]
        elif self.phase == "radix_top":
            self._hist1 = torch.zeros(_TOP_BUCKETS, dtype=torch.int64, device=self.device)

    def end_pass(self) -> None:
        import torch

        if self.phase == "exact":
            ordered = torch.cat(self._parts)
            self._parts = []
            values, _ = torch.sort(ordered, stable=True)
            out = []
            bounds = list(_offsets(self._chunk_sizes))
            for r in self.ranks:
                v = float(values[r])
                less = int(torch.searchsorted(values, torch.tensor([v], device=values.device), right=False)[0])
                eq = ordered == v
                per = tuple(int(eq[s:e].sum()) for s, e in bounds)
                out.append(Boundary(v, less, sum(per), per))
            self._finish(out)
        elif self.phase == "sample":
            drawn = torch.cat(self._parts).abs().float()
            self._parts = []
            sample = self.sample
            self._brackets = []
            for r in self.ranks:
                q = (r + 0.5) / self.n
                margin = 6.0 * math.sqrt(q * (1.0 - q) / sample) + 4.0 / sample
                i_lo, i_hi = math.floor((q - margin) * sample), math.ceil((q + margin) * sample)
                lo = kth_smallest_magnitude(drawn, i_lo) if i_lo > 0 else -1.0
                hi = kth_smallest_magnitude(drawn, i_hi) if i_hi < sample - 1 else math.inf
                self._brackets.append((lo, hi))
            self.phase = "count"
        elif self.phase == "count":
            self._resolve_counts()
        elif self.phase == "radix_top":
            cum1 = self._hist1.cumsum(0)
            rank_t = torch.tensor(self.ranks, dtype=torch.int64, device=self.device)
            self._buckets = torch.searchsorted(cum1, rank_t, right=True).tolist()
            self._below = {b: int(cum1[b] - self._hist1[b]) for b in set(self._buckets)}
            self._per_chunk: dict[int, list] = {b: [] for b in self._below}
            self.phase = "radix_low"
        elif self.phase == "radix_low":
            out = []
            for r, b in zip(self.ranks, self._buckets):
                chunk_hists = torch.stack(self._per_chunk[b])
                low = chunk_hists.sum(0)
                cum2 = low.cumsum(0)
                j = int(torch.searchsorted(cum2, torch.tensor([r - self._below[b]], device=self.device), right=True)[0])
                bits = torch.tensor([(b << 16) | j], dtype=torch.int32).view(torch.float32)
                out.append(Boundary(float(bits[0]), self._below[b] + int(cum2[j] - low[j]), int(low[j]), tuple(chunk_hists[:, j].tolist())))
            self._per_chunk = {}
            self._finish(out)

    def _resolve_counts(self) -> None:
        import torch

        out = []
        for j, r in enumerate(self.ranks):
            lo, hi = self._brackets[j]
            if lo == hi:
                per = tuple(self._cands[j])
                below = self.n - self._above[j] - sum(per)
                if below <= r < below + sum(per):
                    out.append(Boundary(lo, below, sum(per), per))
                    continue
                break  # the bracket missed: the radix passes answer every rank
            n_cand = sum(c.numel() for c in self._cands[j])
            below = self.n - self._above[j] - n_cand
            if not (below <= r < below + n_cand):
                break
            values = torch.cat(self._cands[j])
            v = kth_smallest_magnitude(values, r - below)
            less = below + int(torch.count_nonzero(values < v))
            per = tuple(int(torch.count_nonzero(c == v)) for c in self._cands[j])
            out.append(Boundary(v, less, sum(per), per))
        self._cands = []
        if len(out) == len(self.ranks):
            self._finish(out)
        else:
            self.phase = "radix_top"

    def _finish(self, out: list[Boundary]) -> None:
        self.result = out
        self.phase = "done"

    def run(self, flat, fbuf, ibuf) -> list[Boundary]:
        """Every pass over a tensor held in memory, in chunks of ``fbuf.numel()`` elements."""
        n = flat.numel()
        while not self.done:
            self.begin_pass()
            for s, e in chunks(n, fbuf.numel()):
                self.observe(s, e, flat[s:e], fbuf, ibuf)
            self.end_pass()
        return self.result  # type: ignore[return-value]


def sample_size(n: int) -> int:
    """How many magnitudes of an ``n``-element tensor are sampled: 1/64 of them within
    [SAMPLE, SAMPLE_MAX]. The bracket's width shrinks with the square root of the sample, and
    collecting the candidates inside it (a scan whose cost grows with their share) is the
    costliest step of the counting pass."""
    return min(SAMPLE_MAX, max(SAMPLE, n >> 6))


@functools.lru_cache(maxsize=16)
def _sample_positions(n: int, sample: int, device: str):
    """The sorted positions sampled from a tensor of ``n`` elements (seeded by ``n``): the same
    for every model's delta of a tensor, and for every tensor of one shape, so drawn once."""
    import torch

    gen = torch.Generator(device=device).manual_seed(n)
    return torch.randint(n, (sample,), generator=gen, device=device).sort().values


def kth_smallest_magnitude(values, k: int) -> float:
    """The k-th smallest (0-based) of non-negative ``values``, exactly, by the radix search below
    (two bit histograms, one chunk) rather than a sort: a bracket's candidates can be a large
    share of a tensor (with deltas of bf16 weights a few thousand distinct magnitudes cover it,
    so a bracket's edges fall on large clusters), and sorting them cost more than the pass that
    collected them. ``kthvalue`` is avoided: it degrades on heavily repeated values."""
    import torch

    n = values.numel()
    fbuf, ibuf = torch.empty(n, device=values.device), torch.empty(n, dtype=torch.int32, device=values.device)
    return radix_boundaries(values.reshape(-1), [k], fbuf, ibuf)[0].value


def _offsets(sizes: Sequence[int]):
    start = 0
    for size in sizes:
        yield start, start + size
        start += size


def rank_boundaries(flat, ranks: Sequence[int], fbuf, ibuf, sample: int | None = None) -> list[Boundary]:
    """For each 0-based ascending rank r of |flat|, the exact magnitude found there.

    A seeded random sample brackets each rank between two magnitudes (a wide margin of order
    statistics); one streaming pass then counts the elements above the bracket and collects the
    few inside it, where the rank is read off exactly. If a bracket misses (vanishingly rare and
    detected), the radix histogram gives the answer instead. Either way the result is exact.
    """
    return RankSearch(flat.numel(), ranks, flat.device, sample).run(flat, fbuf, ibuf)


def radix_boundaries(flat, ranks: Sequence[int], fbuf, ibuf) -> list[Boundary]:
    """Exact magnitudes at the given ascending ranks by a two-level radix histogram (the fallback).

    Level one histograms the top 16 bits of the float32 pattern of |x|, level two the low 16 bits
    of the elements in the bucket that holds the rank; together they pin the exact 32-bit value.
    """
    return RankSearch(flat.numel(), ranks, flat.device, radix=True).run(flat, fbuf, ibuf)


class RankBand:
    """Mask of the elements whose ascending magnitude rank lies in [lo, hi).

    Ranks order by |x| and then by flat index, so ties at a boundary are split exactly. ``mask``
    must be called on the same consecutive chunks as the boundaries were computed on, in order.
    """

    def __init__(self, flat, lo: int, hi: int, fbuf, ibuf, sample: int | None = None):
        n = flat.numel()
        wanted = self.ranks_needed(n, lo, hi)
        self._setup(n, lo, hi, dict(zip(wanted, rank_boundaries(flat, wanted, fbuf, ibuf, sample))) if wanted else {})

    @staticmethod
    def ranks_needed(n: int, lo: int, hi: int) -> list[int]:
        """The ranks whose boundaries the band [lo, hi) of n elements needs (see ``RankSearch``)."""
        lo, hi = max(lo, 0), min(hi, n)
        wanted = []
        if lo < hi:
            if lo > 0:
                wanted.append(lo)
            if hi < n:
                wanted.append(hi - 1)
        return wanted

    @classmethod
    def from_search(cls, n: int, lo: int, hi: int, search: RankSearch) -> "RankBand":
        """The band from a finished ``RankSearch`` of ``ranks_needed(n, lo, hi)``."""
        band = cls.__new__(cls)
        band._setup(n, lo, hi, dict(zip(search.ranks, search.result or [])))
        return band

    def _setup(self, n: int, lo: int, hi: int, found: dict[int, Boundary]) -> None:
        self.lo, self.hi, self.n = max(lo, 0), min(hi, n), n
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
                self._drop_ties(a, keep, v, self.lo - first, self.hi - first)
        return keep

    @staticmethod
    def _drop_ties(a, keep, value: float, lo: int, hi: int) -> None:
        """Zero ``keep`` at the tied elements (|x| == value) of this chunk whose index among the
        chunk's tied elements (0, 1, ... in order) falls outside [lo, hi)."""
        import torch

        tied = torch.eq(a, value).nonzero().squeeze(1)  # positions of the tied elements, in order
        drop = torch.cat([tied[: max(lo, 0)], tied[max(hi, 0) :]])
        keep.index_fill_(0, drop, 0.0)  # those tied elements had keep = 1
