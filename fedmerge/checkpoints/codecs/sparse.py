"""The selecting codec ``sparse:<density>``: keep a seeded random share of each row, rescaled.

Each row is cut into blocks of ``b = min(64, row length)`` elements (the last one padded with
zeros), and each block keeps exactly ``k = max(1, round(density * b))`` of its elements: the
k-subset is one of a table of ``TABLE`` random k-subsets of ``range(b)``, the table and each
block's choice in it drawn from the stage's seed with ``hashing.hash32`` (so the mask is
regenerated from the seed alone; no index travels). Each element is kept with probability
exactly ``k / b`` over the seed, and decoding multiplies kept values by ``b / k``: the decoded
delta equals the original in expectation (as DARE's rescaled drop). What is stored is
``ceil(n / b) * k`` values per row, in row order, block by block.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from fedmerge.checkpoints.codecs.hashing import derive_seed, hash32
from fedmerge.checkpoints.errors import UnknownCompression

BLOCK = 64
TABLE = 1024  # k-subsets per tensor to choose from (a power of two)


@dataclass(frozen=True)
class SparseParams:
    density: float


def sparse_parse(arg: str | None) -> SparseParams:
    if arg is None:
        raise UnknownCompression("sparse needs the share of values to keep, e.g. sparse:0.25")
    try:
        density = float(arg)
    except ValueError:
        density = math.nan
    if not 0.0 < density <= 1.0:
        raise UnknownCompression(f"sparse:{arg}: the density must be a number in (0, 1], e.g. sparse:0.25")
    return SparseParams(density)


def sparse_spell(p: SparseParams) -> str:
    return f"sparse:{p.density:g}"


def block_shape(p: SparseParams, n: int) -> tuple[int, int, int]:
    """(block size b, kept per block k, blocks per row) for rows of n elements."""
    b = max(1, min(BLOCK, n))
    k = min(b, max(1, round(p.density * b)))
    return b, k, -(-n // b)


def sparse_width(p: SparseParams, n: int, value_dtype: str) -> int:
    b, k, nb = block_shape(p, n)
    return nb * k


def sparse_gain(p: SparseParams, n: int) -> float:
    b, k, _ = block_shape(p, n)
    return b / k


@functools.lru_cache(maxsize=64)
def subset_table(seed: int, b: int, k: int):
    """``TABLE`` sorted k-subsets of range(b) (int64, TABLE x k): each row orders range(b) by a
    hash keyed by ``seed`` (ties by position) and keeps the first k."""
    import torch

    counters = torch.arange(TABLE * b, dtype=torch.int64)
    keys = hash32(counters, derive_seed(seed, "subsets")).view(TABLE, b)
    order = torch.argsort(keys, dim=1, stable=True)
    return order[:, :k].sort(dim=1).values


def _positions(p: SparseParams, n: int, rows: int, ctx):
    """Index of each kept element within its block, (rows, blocks, k), for rows from ``ctx.first_row``."""
    import torch

    b, k, nb = block_shape(p, n)
    table = subset_table(ctx.seed, b, k)
    counters = torch.arange(ctx.first_row * nb, (ctx.first_row + rows) * nb, dtype=torch.int64)
    choice = hash32(counters, derive_seed(ctx.seed, "blocks")) & (TABLE - 1)
    return table[choice].view(rows, nb, k), b, k, nb


def sparse_encode(p: SparseParams, x, ctx):
    import torch

    rows, n = x.shape
    pos, b, k, nb = _positions(p, n, rows, ctx)
    padded = torch.nn.functional.pad(x, (0, nb * b - n)).view(rows, nb, b)
    return torch.gather(padded, 2, pos).view(rows, nb * k)


def sparse_decode(p: SparseParams, y, n: int, ctx):
    import torch

    rows = y.shape[0]
    pos, b, k, nb = _positions(p, n, rows, ctx)
    out = torch.zeros(rows, nb, b, dtype=torch.float32)
    out.scatter_(2, pos, y.to(torch.float32).view(rows, nb, k).mul(b / k))
    return out.view(rows, nb * b)[:, :n]
