"""A compression spec applied to tensors: rows in, bytes out, any row range on its own.

A tensor of shape (rows, ...) is treated as ``rows`` rows of ``n = prod(shape[1:])`` values.
Only tensors with at least two dimensions are compressed; vectors (norms, biases) and scalars
are a tiny share of any model and travel exactly. Each row goes through the spec's stages in
order (``registry``); every encoded row has the same byte width, so the encoded tensor is a
``rows x row_bytes`` uint8 matrix and rows a..b are bytes ``a * row_bytes .. b * row_bytes``:
what is sent, hashed and stored, and what a merge decodes a row chunk at a time.

Every random choice is seeded per tensor and per stage from the package's seed
(``derive_seed(package_seed, tensor name, stage index)``), so a package decodes the same way
for everyone who holds it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from fedmerge.checkpoints.codecs.hashing import derive_seed
from fedmerge.checkpoints.codecs.registry import NONE, RAW, Stage, StageContext, parse_stages
from fedmerge.checkpoints.errors import EncodedDataInvalid


@dataclass(frozen=True)
class Compression:
    stages: tuple[Stage, ...]

    @property
    def spec(self) -> str:
        """The canonical spelling (what manifests, configs and messages carry)."""
        return "+".join(s.spec for s in self.stages) if self.stages else NONE

    @property
    def is_none(self) -> bool:
        return not self.stages

    def applies_to(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of this shape is encoded (matrices and up, with at least one value)."""
        return bool(self.stages) and len(shape) >= 2 and math.prod(shape) > 0

    def for_tensor(self, name: str, shape: tuple[int, ...], package_seed: int, value_dtype: str) -> "TensorCodec":
        return TensorCodec(self, name, tuple(int(d) for d in shape), package_seed, value_dtype)

    def nbytes(self, shape: tuple[int, ...], value_dtype: str) -> int:
        """Bytes a tensor of this shape takes in a package: encoded, or raw in ``value_dtype``."""
        from fedmerge.checkpoints.dtypes import dtype_nbytes

        if not self.applies_to(shape):
            return math.prod(shape) * dtype_nbytes(value_dtype)
        return shape[0] * _row_plan(self.stages, math.prod(shape[1:]), value_dtype)[1]

    def __str__(self) -> str:
        return self.spec


@functools.lru_cache(maxsize=256)
def parse_compression(spec: str) -> Compression:
    """A ``Compression`` from its spelling (``none``, ``int4``, ``sparse:0.25+int4``...)."""
    return Compression(parse_stages(spec))


def canonical_spec(spec: str) -> str:
    return parse_compression(spec).spec


def _row_plan(stages: tuple[Stage, ...], n: int, value_dtype: str) -> tuple[tuple[int, ...], int]:
    """(inputs of each stage, bytes of an encoded row), with ``raw`` appended when nothing stores."""
    widths = [n]
    for s in _with_store(stages)[:-1]:
        widths.append(s.codec.width(s.params, widths[-1], value_dtype))
    last = _with_store(stages)[-1]
    return tuple(widths), last.codec.width(last.params, widths[-1], value_dtype)


def _with_store(stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    if stages and stages[-1].codec.stores:
        return stages
    return (*stages, Stage(RAW, RAW.parse(None)))


class TensorCodec:
    """One tensor's encoder and decoder under a compression spec, a row range at a time."""

    def __init__(self, compression: Compression, name: str, shape: tuple[int, ...], package_seed: int, value_dtype: str):
        if not compression.applies_to(shape):
            raise EncodedDataInvalid(f"tensor {name!r} of shape {list(shape)} is not compressed under {compression.spec}")
        self.name = name
        self.shape = shape
        self.value_dtype = value_dtype
        self.stages = _with_store(compression.stages)
        self.rows = shape[0]
        self.n = math.prod(shape[1:])
        self.inputs, self.row_bytes = _row_plan(compression.stages, self.n, value_dtype)
        self.seeds = tuple(derive_seed(package_seed, name, i) for i in range(len(self.stages)))
        gain = 1.0
        for s, n in zip(self.stages, self.inputs):
            gain *= s.codec.gain(s.params, n)
        self.gain = gain  # the most decoding multiplies any stored float by
        store = self.stages[-1]
        self.fields = store.codec.float_fields(store.params, self.inputs[-1], value_dtype) if store.codec.float_fields else []

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def _ctx(self, i: int, first_row: int) -> StageContext:
        return StageContext(first_row, self.seeds[i], self.value_dtype)

    def encode(self, x, first_row: int):
        """float32 rows ``first_row ..`` (any shape with those rows first) -> uint8 (rows, row_bytes)."""
        import torch

        r = x.shape[0]
        y = x.reshape(r, self.n)
        if y.dtype != torch.float32:
            y = y.to(torch.float32)
        for i, s in enumerate(self.stages):
            y = s.codec.encode(s.params, y, self._ctx(i, first_row))
        if y.shape != (r, self.row_bytes):  # a codec bug, never a user error
            raise EncodedDataInvalid(f"tensor {self.name!r}: encoding gave {tuple(y.shape)} bytes, expected {(r, self.row_bytes)}")
        return y

    def decode(self, y, first_row: int):
        """uint8 (rows, row_bytes) of rows ``first_row ..`` -> float32 (rows, *shape[1:])."""
        r = y.shape[0]
        if tuple(y.shape) != (r, self.row_bytes):
            raise EncodedDataInvalid(f"tensor {self.name!r}: encoded rows are {tuple(y.shape)}, expected ({r}, {self.row_bytes}) under {self.spec}")
        out = y
        for i in range(len(self.stages) - 1, -1, -1):
            s = self.stages[i]
            out = s.codec.decode(s.params, out, self.inputs[i], self._ctx(i, first_row))
        return out.reshape(r, *self.shape[1:])

    @property
    def spec(self) -> str:
        return "+".join(s.spec for s in self.stages if s.codec is not RAW)

    def finite(self, chunk, offset: int) -> bool:
        """Whether the stored floats in ``chunk`` (bytes ``offset ..`` of the encoded tensor) are
        finite and stay finite once decoding scales them. numpy only: the verifier has no torch."""
        import numpy as np

        buf = np.frombuffer(chunk, dtype=np.uint8)
        if not len(buf) or not self.fields:
            return True
        w = self.row_bytes
        r0, r1 = offset // w, -(-(offset + len(buf)) // w)
        lead = offset - r0 * w
        if lead == 0 and len(buf) == (r1 - r0) * w:
            grid = buf.reshape(r1 - r0, w)
        else:  # a chunk that starts or ends inside a row: zeros (finite) around it
            grid = np.zeros((r1 - r0) * w, dtype=np.uint8)
            grid[lead : lead + len(buf)] = buf
            grid = grid.reshape(r1 - r0, w)
        bound = np.float32(self.gain)
        with np.errstate(over="ignore", invalid="ignore"):
            for a, b, dtype in self.fields:
                if not np.isfinite(_as_float32(np.ascontiguousarray(grid[:, a:b]), dtype) * bound).all():
                    return False
        return True


def _as_float32(block, dtype: str):
    import numpy as np

    if dtype == "F32":
        return block.view("<f4")
    if dtype == "F16":
        return block.view("<f2").astype(np.float32)
    if dtype == "BF16":
        return (block.view("<u2").astype(np.uint32) << 16).view("<f4")
    raise EncodedDataInvalid(f"no float check for dtype {dtype!r}")
