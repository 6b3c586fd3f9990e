"""Folders of encoded deltas: how a compressed delta is stored on disk, and read back.

A delta folder written from a compressed package (``fedmerge.security.delta_folder``) or from a
compressed publication (``fedmerge.checkpoints.rebuild``) holds each encoded matrix as the uint8
``rows x row_bytes`` tensor of its encoded rows, under the matrix's own name; its
``fedmerge.json`` says how to decode them:

    "compression": {"spec": "int4", "seed": 123}
    "encoded": {"model.layers.0.mlp.up_proj.weight": {"shape": [5632, 2048], "dtype": "F32"}, ...}

(``dtype``: the delta's value dtype, what a ``raw`` store writes). Other tensors are stored as
they are.
"""

from __future__ import annotations

from typing import Any

from fedmerge.checkpoints.codecs.pipeline import TensorCodec, parse_compression
from fedmerge.checkpoints.errors import CheckpointError, CodecError
from fedmerge.checkpoints.layout import METADATA_NAME, TensorInfo

COMPRESSION_KEY = "compression"
ENCODED_KEY = "encoded"


def encoding_metadata(spec: str, seed: int, encoded: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, Any]:
    """The ``fedmerge.json`` entries of a folder whose ``encoded`` tensors (name -> (shape, value dtype)) are compressed."""
    return {COMPRESSION_KEY: {"spec": spec, "seed": seed}, ENCODED_KEY: {n: {"shape": list(s), "dtype": d} for n, (s, d) in encoded.items()}}


def stored_info(codec: TensorCodec) -> TensorInfo:
    """How an encoded tensor is stored: its encoded rows, as bytes."""
    return TensorInfo(codec.name, (codec.rows, codec.row_bytes), "U8")


def folder_codecs(meta: dict[str, Any], reader) -> dict[str, TensorCodec]:
    """The decoders of a folder's encoded tensors (name -> codec), each checked against its stored tensor;
    ``{}`` for a folder that holds no encoded tensor."""
    comp, encoded = meta.get(COMPRESSION_KEY), meta.get(ENCODED_KEY)
    if comp is None and encoded is None:
        return {}
    where = reader.folder / METADATA_NAME
    try:
        compression = parse_compression(str(comp["spec"]))
        seed = int(comp["seed"])
        out = {}
        for name, e in dict(encoded).items():
            shape, dtype = tuple(int(d) for d in e["shape"]), str(e["dtype"])
            out[name] = codec = compression.for_tensor(name, shape, seed, dtype)
            stored = reader.info(name)
            if stored != stored_info(codec):
                raise CheckpointError(
                    f"{reader.file_of(name)}: tensor {name!r} is stored as {stored.dtype} {list(stored.shape)}, "
                    f"but {compression.spec} of shape {list(shape)} takes U8 {[codec.rows, codec.row_bytes]}"
                )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, CodecError) as exc:
        raise CheckpointError(f"{where}: the compression record of this delta folder is not usable ({type(exc).__name__}: {exc})") from None
    return out
