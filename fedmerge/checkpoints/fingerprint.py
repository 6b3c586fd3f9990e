"""Content fingerprints: one SHA-256 per tensor's bytes, one per model, independent of sharding.

A model's fingerprint is SHA-256 over the sorted (name, dtype, shape, SHA-256 of bytes) of every
tensor, prefixed ``sha256:``. Two folders holding the same weights have the same fingerprint
however they were sharded, and a model in memory (its state dict) has the fingerprint of the
folder it would be saved as: the coordinator, the hospitals, the signer and the evaluator all
name a model by this one string.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from fedmerge.checkpoints.dtypes import safetensors_dtype

if TYPE_CHECKING:
    from fedmerge.checkpoints.reader import CheckpointReader


def tensor_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (moved to the CPU), without a copy where possible."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def tensor_digest(tensor) -> str:
    """SHA-256 of a tensor's raw bytes (contiguous, as stored)."""
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


def combine_digests(entries: Iterable[tuple[str, str, Sequence[int], str]]) -> str:
    """Fingerprint from per-tensor (name, safetensors dtype, shape, sha256 hex), in any order."""
    outer = hashlib.sha256()
    for name, dtype, shape, digest in sorted(entries, key=lambda e: e[0]):
        outer.update(json.dumps([name, dtype, list(shape), digest]).encode())
    return "sha256:" + outer.hexdigest()


def model_fingerprint(reader: "CheckpointReader", progress: bool = False) -> str:
    """Fingerprint of the checkpoint ``reader`` reads (every tensor is read once)."""
    names = sorted(reader.names())
    it: Iterable[str] = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc=f"fingerprint {reader.path.name}", unit="tensor", leave=False)
    rows = []
    for name in it:
        info = reader.info(name)
        rows.append((name, info.dtype, tuple(info.shape), tensor_digest(reader.get(name))))
    return combine_digests(rows)


def folder_fingerprint(folder) -> str:
    from fedmerge.checkpoints.reader import CheckpointReader

    with CheckpointReader(folder) as reader:
        return model_fingerprint(reader)


def state_dict_fingerprint(state: Mapping[str, object]) -> str:
    """The fingerprint of the folder a state dict (name -> tensor) would be saved as."""
    return combine_digests((name, safetensors_dtype(t.dtype), tuple(t.shape), tensor_digest(t)) for name, t in state.items())  # type: ignore[attr-defined]
