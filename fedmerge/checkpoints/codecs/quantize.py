"""Storing codecs: how a row of float32 values becomes bytes, and back.

- ``raw``: the values as they are, in the package's delta dtype (what follows a selecting stage
  when no quantizer is named).
- ``int8``: per-row absmax: ``s = max|x| / 127`` (float32), ``q = round(x / s)`` in [-127, 127];
  row bytes ``[q (n bytes)][s (4 bytes)]``; every value is within ``s / 2`` of the original.
- ``int4[:G]``: groups of G (default 64) consecutive values of a row, each with its own
  ``s = bf16(max|x| / 7)``, ``q = round(x * (1 / s))`` in [-7, 7] stored as ``q + 8`` in a nibble (low
  nibble first); row bytes ``[nibbles (ceil(n/2) bytes)][scales (ceil(n/G) bf16)]``; every value
  is within ``s / 2`` of the original. With G = 64 a row costs 0.53 bytes per value.

Every function takes and returns 2-D tensors of whole rows, so any row range encodes and decodes
on its own. Rounding is round-half-to-even everywhere (torch's ``round``), so encoding is
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmerge.checkpoints.dtypes import dtype_nbytes, torch_dtype
from fedmerge.checkpoints.errors import UnknownCompression


def _view(y, dtype):
    """uint8 columns as ``dtype`` values (copied when their layout or alignment does not allow a view)."""
    r = y.shape[0]
    flat = y.contiguous().reshape(-1)
    if flat.storage_offset() % dtype.itemsize:
        flat = flat.clone()
    return flat.view(dtype).reshape(r, -1)


def _tiny():
    import torch

    return torch.finfo(torch.float32).tiny


# -- raw -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawParams:
    pass


def raw_width(p: RawParams, n: int, value_dtype: str) -> int:
    return n * dtype_nbytes(value_dtype)


def raw_encode(p: RawParams, x, ctx):
    import torch

    r = x.shape[0]
    return x.to(torch_dtype(ctx.value_dtype)).contiguous().view(torch.uint8).reshape(r, -1)


def raw_decode(p: RawParams, y, n: int, ctx):
    import torch

    return _view(y, torch_dtype(ctx.value_dtype)).to(torch.float32)


def raw_fields(p: RawParams, n: int, value_dtype: str) -> list[tuple[int, int, str]]:
    return [(0, raw_width(p, n, value_dtype), value_dtype)]


# -- int8 ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Params:
    pass


def int8_parse(arg: str | None) -> Int8Params:
    if arg is not None:
        raise UnknownCompression(f"int8 takes no argument (got int8:{arg}); it scales each row by its largest value")
    return Int8Params()


def int8_width(p: Int8Params, n: int, value_dtype: str) -> int:
    return n + 4


def int8_encode(p: Int8Params, x, ctx):
    import torch

    s = x.abs().amax(dim=1).div_(127.0)
    q = torch.div(x, s.clamp_min(_tiny()).unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
    return torch.cat([q.view(torch.uint8), s.view(torch.uint8).reshape(-1, 4)], dim=1)


def int8_decode(p: Int8Params, y, n: int, ctx):
    import torch

    s = _view(y[:, n:], torch.float32)
    return _view(y[:, :n], torch.int8).to(torch.float32).mul_(s)


def int8_fields(p: Int8Params, n: int, value_dtype: str) -> list[tuple[int, int, str]]:
    return [(n, n + 4, "F32")]


# -- int4 ------------------------------------------------------------------------------------------
INT4_GROUP = 64


@dataclass(frozen=True)
class Int4Params:
    group: int = INT4_GROUP


def int4_parse(arg: str | None) -> Int4Params:
    if arg is None:
        return Int4Params()
    try:
        group = int(arg)
    except ValueError:
        group = 0
    if not 2 <= group <= 4096 or group % 2:
        raise UnknownCompression(f"int4:{arg}: the group size must be an even integer from 2 to 4096 (default {INT4_GROUP})")
    return Int4Params(group)


def int4_spell(p: Int4Params) -> str:
    return "int4" if p.group == INT4_GROUP else f"int4:{p.group}"


def _int4_sizes(p: Int4Params, n: int) -> tuple[int, int]:
    """(nibble bytes, groups) of a row of n values."""
    return -(-n // 2), -(-n // p.group)


def int4_width(p: Int4Params, n: int, value_dtype: str) -> int:
    nib, groups = _int4_sizes(p, n)
    return nib + 2 * groups


def int4_encode(p: Int4Params, x, ctx):
    import torch

    r, n = x.shape
    nib, groups = _int4_sizes(p, n)
    width = groups * p.group
    padded = x if width == n else torch.nn.functional.pad(x, (0, width - n))
    grouped = padded.view(r, groups, p.group)
    # abs().amax: a third of the cost of aminmax over short groups; a NaN still reaches the scale.
    s = grouped.abs().amax(dim=2).div_(7.0).to(torch.bfloat16)
    sf = s.to(torch.float32)
    inv = torch.where(sf > 0, 1.0 / sf.clamp_min(_tiny()), torch.zeros_like(sf))
    # float -> int8 is several times faster than float -> uint8; q + 8 is in 1..15 either way.
    q = torch.mul(grouped, inv.unsqueeze(2)).round_().clamp_(-7, 7).to(torch.int8).add_(8).view(r, width)
    if 2 * nib != width:
        q = q[:, : 2 * nib].contiguous()
    # Each pair of bytes read as one little-endian int16 is lo + 256 hi; its low byte after
    # ``v | (v >> 4)`` is lo + 16 hi: both nibbles of a pair in one pass over half the values.
    v = q.view(torch.int16)
    packed = v.bitwise_or_(v >> 4).view(torch.uint8).view(r, nib, 2)[:, :, 0]
    return torch.cat([packed, s.view(torch.uint8).reshape(r, 2 * groups)], dim=1)


def int4_decode(p: Int4Params, y, n: int, ctx):
    import torch

    r = y.shape[0]
    nib, groups = _int4_sizes(p, n)
    packed = y[:, :nib]
    values = torch.zeros(r, groups * p.group, dtype=torch.float32)
    pairs = values[:, : 2 * nib].view(r, nib, 2)
    pairs[:, :, 0] = packed & 15
    pairs[:, :, 1] = packed >> 4
    if 2 * nib != groups * p.group:
        values[:, 2 * nib :] = 8.0  # padding decodes to zero (and is cut off below)
    s = _view(y[:, nib:], torch.bfloat16).to(torch.float32)
    values = values.view(r, groups, p.group).sub_(8.0).mul_(s.unsqueeze(2)).view(r, groups * p.group)
    return values if groups * p.group == n else values[:, :n]


def int4_fields(p: Int4Params, n: int, value_dtype: str) -> list[tuple[int, int, str]]:
    nib, groups = _int4_sizes(p, n)
    return [(nib, nib + 2 * groups, "BF16")]
