"""Task vectors: what each input contributes to a merge, one tensor at a time.

Every input is a *delta source* (``fedmerge.merging.source.DeltaSource``, re-exported here): a
``label``, ``names()``, ``info(name)`` and ``get_delta(name, *, rows=None, base=None) -> float32
CPU tensor | None`` (``None`` means a zero delta for that tensor), plus what the engine needs to
check and describe it. Strategies only ever see deltas, so a full fine-tune, a LoRA adapter and a
delta spooled by the coordinator are interchangeable inputs:

- ``TaskVector(model, base)``: a full model folder minus the base, computed lazily per tensor.
- ``DeltaCheckpoint(folder)``: a folder of safetensors whose tensors *are* deltas, exact or as a
  compressed package left them (decoded a row chunk at a time, see ``fedmerge.checkpoints.codecs``).
- ``LoraDelta(adapter, base)``: a PEFT LoRA adapter, each adapted module's B @ A x scaling
  (see ``fedmerge.merging.lora``).

``rows=(a, b)`` produces a slice of rows of a tensor's delta and ``base=`` (the base tensor,
already read, in float32) lets the engine read the base only once however many inputs there are.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from fedmerge.checkpoints import (
    METADATA_NAME,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    IncompatibleCheckpoint,
    TensorInfo,
    combine_digests,
    tensor_bytes,
)
from fedmerge.checkpoints.codecs.folder import folder_codecs
from fedmerge.checkpoints.delta import subtract_reference
from fedmerge.merging.lora import LoraDelta, is_lora_adapter  # noqa: F401  (re-exported: contract name)
from fedmerge.merging.source import DeltaSource, DeltaTensors, NotADeltaSource, require_delta_source  # noqa: F401  (re-exported: contract names)

DELTA_KIND = "delta"


class _DigestRecorder:
    """Per-tensor SHA-256 of the raw bytes a source reads, fed chunk by chunk in row order.

    Gives the same fingerprint as ``model_fingerprint`` without a second pass over the files.
    Chunks of one tensor must arrive in order; the engine guarantees that. A tensor read again
    (the engine makes several passes over a large tensor of a whole-tensor method) is hashed once.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._open: dict[str, Any] = {}
        self.done: dict[str, tuple[str, tuple[int, ...], str]] = {}

    def feed(self, info: TensorInfo, raw, rows: tuple[int, int] | None) -> None:
        if not self.enabled or info.name in self.done:
            return
        h = self._open.get(info.name)
        if h is None:
            if rows is not None and rows[0] != 0:
                return  # started mid-tensor: this tensor is not fingerprinted
            h = self._open[info.name] = hashlib.sha256()
        h.update(tensor_bytes(raw))
        if rows is None or rows[1] == (info.shape[0] if info.shape else 0):
            self.done[info.name] = (info.dtype, info.shape, self._open.pop(info.name).hexdigest())

    def fingerprint(self, names: Sequence[str]) -> str | None:
        if not self.enabled or any(n not in self.done for n in names):
            return None
        return combine_digests((n, *self.done[n][:2], self.done[n][2]) for n in names)


def _as_reader(x: CheckpointReader | str | os.PathLike[str]) -> CheckpointReader:
    return x if isinstance(x, CheckpointReader) else CheckpointReader(x)


class TaskVector(DeltaSource):
    """delta = model - base, per tensor, in float32 (the model's own dtype is only the storage)."""

    kind = "model"
    complete = True

    def __init__(self, model_reader: CheckpointReader | str | os.PathLike[str], base_reader: CheckpointReader | str | os.PathLike[str], label: str | None = None):
        self.model = _as_reader(model_reader)
        self.base = _as_reader(base_reader)
        self.label = label or self.model.path.name
        self.folder = self.model.folder
        self.digests = _DigestRecorder()
        self.buffers = None

    @property
    def config(self) -> dict[str, Any]:
        return self.model.config

    def names(self) -> list[str]:
        return self.model.names()

    def info(self, name: str) -> TensorInfo:
        return self.model.info(name)

    def file_of(self, name: str) -> Path:
        return self.model.file_of(name)

    def get_delta(self, name: str, *, rows: tuple[int, int] | None = None, base=None):
        pool = self.buffers if rows is None else None
        raw = self.model.get(name, rows=rows)
        self.digests.feed(self.model.info(name), raw, rows)
        if base is None:
            base = self.base.get(name, rows=rows)
        delta = subtract_reference(raw, base, alloc=pool.empty if pool is not None else None)  # the reader hands out fresh tensors: raw may be reused
        if pool is not None and delta is not raw:
            pool.give(raw)
        return delta

    def use_buffers(self, pool) -> None:
        """Read and widen whole tensors into ``pool``'s buffers (a ``BufferPool``; None: allocate)."""
        self.buffers = pool
        self.model.use_buffers(pool)

    def weight(self, name: str, reference):
        return self.model.get(name).float()

    def record_digests(self, enabled: bool) -> None:
        self.digests.enabled = enabled

    def fingerprint(self) -> str | None:
        return self.digests.fingerprint(self.names())

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "path": str(self.folder), "fingerprint": self.fingerprint()}


class DeltaCheckpoint(DeltaSource):
    """A folder of safetensors whose tensors are deltas (model - reference), named as the model's.

    Tensors the folder does not hold are zero deltas. This is the form in which the coordinator
    spools verified contributions and ``write_delta_checkpoint`` saves any delta source.

    A compressed contribution keeps its encoded form: ``fedmerge.json`` names the spec, the seed
    and each encoded tensor (shape, value dtype), the folder holds its encoded rows, and
    ``get_delta`` decodes only the rows asked for, so a merge never holds more float32 than the
    rows it works on.
    """

    kind = DELTA_KIND
    complete = False

    def __init__(self, folder: str | os.PathLike[str], label: str | None = None):
        self.reader = CheckpointReader(folder)
        self.folder = self.reader.folder
        meta = read_metadata(self.folder)
        self.metadata = meta
        self.label = label or str(meta.get("label") or self.folder.name)
        self.digests = _DigestRecorder()
        self.codecs = folder_codecs(meta, self.reader)

    @property
    def compression(self) -> str:
        """The spec its deltas were compressed with (``none``: exact)."""
        c = self.metadata.get("compression")
        return str(c["spec"]) if isinstance(c, dict) and "spec" in c else "none"

    @property
    def config(self) -> dict[str, Any]:
        return self.reader.config

    def names(self) -> list[str]:
        return self.reader.names()

    def info(self, name: str) -> TensorInfo:
        codec = self.codecs.get(name)
        if codec is not None:
            return TensorInfo(name, codec.shape, codec.value_dtype)
        return self.reader.info(name)

    def file_of(self, name: str) -> Path:
        return self.reader.file_of(name)

    def get_delta(self, name: str, *, rows: tuple[int, int] | None = None, base=None):
        if name not in self.reader:
            return None
        raw = self.reader.get(name, rows=rows)
        self.digests.feed(self.reader.info(name), raw, rows)
        codec = self.codecs.get(name)
        if codec is not None:
            return codec.decode(raw, rows[0] if rows is not None else 0)
        return raw.float() if raw.dtype != _f32() else raw

    def record_digests(self, enabled: bool) -> None:
        self.digests.enabled = enabled

    def fingerprint(self) -> str | None:
        return self.digests.fingerprint(self.names())

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "path": str(self.folder), "fingerprint": self.fingerprint()}


def _f32():
    import torch

    return torch.float32


def read_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``fedmerge.json`` of a folder, or ``{}`` when it has none."""
    path = Path(folder) / METADATA_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def is_delta_checkpoint(folder: str | os.PathLike[str]) -> bool:
    return read_metadata(folder).get("kind") == DELTA_KIND


def open_delta_source(path: str | os.PathLike[str], base: CheckpointReader | str | os.PathLike[str] | None, kind: str = "auto", label: str | None = None):
    """Open an input folder as a delta source, telling its kind from its files when ``kind="auto"``:
    ``adapter_config.json`` -> LoRA adapter; ``fedmerge.json`` with ``"kind": "delta"`` -> deltas;
    anything else -> a full model, whose delta is taken against ``base``."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such model, adapter or delta folder")
    if kind == "auto":
        kind = "lora" if is_lora_adapter(p) else DELTA_KIND if p.is_dir() and is_delta_checkpoint(p) else "model"
    if kind == DELTA_KIND:
        return DeltaCheckpoint(p, label=label)
    if base is None:
        raise IncompatibleCheckpoint(f"{p}: a {kind} input needs a base model to take its delta against")
    if kind == "lora":
        return LoraDelta(p, _as_reader(base), label=label)
    if kind == "model":
        return TaskVector(p, base, label=label)
    raise CheckpointError(f"{p}: unknown input kind {kind!r}; expected auto, model, lora or delta")


def write_delta_checkpoint(
    source: DeltaTensors,
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
    metadata: dict[str, Any] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    skip_zero: bool = True,
    overwrite: bool = False,
) -> Path:
    """Save a delta source as a DeltaCheckpoint folder (atomically), one tensor at a time.

    ``skip_zero``: tensors whose delta is ``None`` (LoRA leaves most tensors untouched) are not
    written; readers treat them as zero.
    """
    import torch

    meta = {"kind": DELTA_KIND, "label": source.label, **(metadata or {})}
    with CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        for name in source.names():
            d = source.get_delta(name)
            if d is None:
                if skip_zero:
                    continue
                d = torch.zeros(source.info(name).shape)
            writer.add(name, d.to(getattr(torch, dtype)))
        return writer.commit(metadata=meta)
