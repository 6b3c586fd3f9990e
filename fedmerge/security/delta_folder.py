"""A verified package's deltas written out as a delta folder (what ``DeltaCheckpoint`` reads).

The folder is an ordinary safetensors checkpoint written by the bottom layer's
``CheckpointWriter`` (planned from the manifest, so every shard header is known before its first
byte), plus ``fedmerge.json`` saying whose deltas these are, for which round and against which
reference. Bytes arrive chunk by chunk, already authenticated and hashed by the verifier; the
folder appears (by rename) only once the whole package has passed.

A compressed package is unpacked as it travelled: each encoded matrix is stored as the uint8
``rows x row_bytes`` tensor of its encoded rows, and ``fedmerge.json`` names the spec, the seed
and each encoded tensor's shape and value dtype, so ``DeltaCheckpoint`` decodes a row chunk at a
time when the engine asks for it and nothing is decoded, or held in float32, here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedmerge.checkpoints import CheckpointWriter, TensorInfo
from fedmerge.checkpoints.codecs.folder import encoding_metadata
from fedmerge.checkpoints.codecs.folder import stored_info as encoded_info
from fedmerge.security.errors import PackageError
from fedmerge.security.manifest import DeltaManifest, TensorEntry

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 1024**3


def delta_metadata(manifest: DeltaManifest) -> dict:
    """The ``fedmerge.json`` of an unpacked package: ``kind: delta``, where the deltas came from,
    and, compressed, how to decode them (``compression``: spec and seed; ``encoded``: name ->
    shape and value dtype of each encoded tensor)."""
    m = manifest
    meta = {"kind": "delta", "sender": m.sender, "round": m.round, "reference": m.reference, "nonce": m.nonce, "created": m.created, "label": m.label, "package_format": m.format, "sealed": m.sealed is not None}
    if m.compression is not None:
        meta.update(encoding_metadata(m.compression.spec, m.compression.seed, {t.name: (t.shape, t.dtype) for t in m.tensors if m.codec_of(t) is not None}))
    return meta


def stored_info(manifest: DeltaManifest, t: TensorEntry) -> TensorInfo:
    """How a package's tensor is stored in a delta folder: as is, or as its encoded rows."""
    codec = manifest.codec_of(t)
    return TensorInfo(t.name, t.shape, t.dtype) if codec is None else encoded_info(codec)


class DeltaFolderWriter:
    """Streams the tensors of one package into a delta folder, in manifest order."""

    def __init__(self, out: Path, manifest: DeltaManifest, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False):
        if out.exists() and not overwrite:
            raise PackageError(f"{out}: already exists; choose another folder to unpack into", path=out)
        self.out = out
        self.manifest = manifest
        self._writer = CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        self._writer.plan([stored_info(manifest, t) for t in manifest.tensors])

    def write(self, tensor: TensorEntry, data, final: bool) -> None:
        """The next chunk of ``tensor`` (chunks arrive in order; ``final`` on its last one)."""
        self._writer.add_bytes(tensor.name, data, final)

    def commit(self) -> Path:
        out = self._writer.commit(metadata=delta_metadata(self.manifest))
        log.info("unpacked %d tensors from %s (round %d) into %s", len(self.manifest.tensors), self.manifest.sender, self.manifest.round, out)
        return out

    def abort(self) -> None:
        self._writer.abort()
