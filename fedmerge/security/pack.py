"""Packing: model - reference as a signed, optionally sealed delta package, streamed.

Layout of a package directory::

    manifest.json    canonical JSON (see ``manifest``): sender, round, reference fingerprint,
                     nonce, time, every tensor with shape, dtype, SHA-256, file, offset, chunks
    signature.json   Ed25519 signature of the sender over the manifest bytes
    data-00000.bin   tensor bytes back to back (sealed: each chunk followed by its GCM tag)

The delta of one tensor is computed a few rows at a time (float32 by default, with the one
subtraction of ``fedmerge.checkpoints.delta``, exactly as the merge engine computes it), cut into
chunks of ``chunk_bytes``, checked for finiteness, hashed, sealed and written, with the stages
overlapping in the bottom layer's bounded pipeline. The package appears only when complete.

With ``compress`` (a spec of ``fedmerge.checkpoints.codecs``: ``int8``, ``int4``,
``sparse:0.25+int4``...), every matrix is encoded row by row from its float32 delta before it is
chunked: what is hashed, sealed and sent are the encoded bytes, and the manifest signs the spec
and the seed its random choices derive from.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from fedmerge.checkpoints import CheckpointReader, dtype_nbytes, model_fingerprint, tensor_bytes, torch_dtype
from fedmerge.checkpoints.codecs import Compression, TensorCodec, parse_compression
from fedmerge.checkpoints.compat import CompatibilityCheck
from fedmerge.checkpoints.delta import subtract_reference
from fedmerge.checkpoints.finite import all_finite
from fedmerge.checkpoints.pipeline import DEFAULT_WORKERS, ByteBudget, run_ordered
from fedmerge.checkpoints.errors import UnknownCompression
from fedmerge.devices import torch_threads as torch_thread_count
from fedmerge.security.errors import NonFiniteValues, PackageError, TensorMismatch
from fedmerge.security.finite import has_non_finite
from fedmerge.security.hashing import HashLanes
from fedmerge.security.keys import Identity, PublicIdentity, b64
from fedmerge.security.manifest import (
    FORMAT,
    IN_FLIGHT_BYTES,
    MANIFEST_NAME,
    MAX_CHUNK_BYTES,
    MAX_SEED,
    MIN_CHUNK_BYTES,
    SIGNATURE_NAME,
    CompressionInfo,
    DeltaManifest,
    SealInfo,
    TensorEntry,
    chunk_count,
    delta_dtype,
    parse_manifest,
    signature_doc,
    signature_payload,
)
from fedmerge.security.seal import TAG_BYTES, ChunkSealer, new_sender_key

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3
# Float32 elements of delta a worker encodes at once: bounds what encoding holds, whatever the chunk.
ENCODE_ELEMENTS = 1 << 21


def _row_elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


def _rechunk(blocks: Iterator[memoryview], chunk_bytes: int) -> Iterator[memoryview]:
    """Re-cut a stream of byte blocks into chunks of exactly ``chunk_bytes`` (last one shorter)."""
    pending = bytearray()
    emitted = False
    for block in blocks:
        block = memoryview(block).cast("B")
        pos = 0
        if pending:
            take = min(chunk_bytes - len(pending), len(block))
            pending += block[:take]
            pos = take
            if len(pending) == chunk_bytes:
                yield memoryview(bytes(pending))
                emitted = True
                pending = bytearray()
        while len(block) - pos >= chunk_bytes:
            yield block[pos : pos + chunk_bytes]
            emitted = True
            pos += chunk_bytes
        if pos < len(block):
            pending += block[pos:]
    if pending or not emitted:
        yield memoryview(bytes(pending))


# -- what a package is made from ------------------------------------------------------------------
class FolderPairDelta:
    """model - reference, read a few rows at a time straight from two safetensors folders.

    Besides the ``DeltaSource`` methods, it can compute any element range of a tensor's delta
    (``elements``), so the packing pool computes chunks in parallel instead of one thread doing
    every subtraction.
    """

    def __init__(self, model: str | os.PathLike[str], reference: str | os.PathLike[str]):
        self.model = CheckpointReader(model)
        self.reference = CheckpointReader(reference)
        self.label = f"{Path(model).name} - {Path(reference).name}"
        found = CompatibilityCheck(self.reference).compare(self.model, complete=True)
        if found.extra:
            name = found.extra[0]
            raise PackageError(f"{self.reference.path}: has no tensor {name!r}, which {self.model.path} has; is it the right reference?", tensor=name)
        for name, theirs, ref in found.shapes:
            raise TensorMismatch(f"tensor {name!r}: shape {list(theirs)} in {self.model.path} but {list(ref)} in the reference {self.reference.path}", tensor=name)
        if found.missing:
            raise PackageError(f"{self.model.path}: lacks tensor {found.missing[0]!r} of the reference ({len(found.missing)} in all)", tensor=found.missing[0])

    def names(self) -> list[str]:
        return self.model.names()

    def info(self, name: str):
        return self.model.info(name)

    def get_delta(self, name: str, *, rows: tuple[int, int] | None = None, base=None):
        if base is None:
            base = self.reference.get(name, rows=rows)
        return subtract_reference(self.model.get(name, rows=rows), base)

    def chunkable(self, name: str, chunk_elements: int) -> bool:
        """Whether chunks of this tensor can be computed from row slices with little over-read."""
        shape = self.model.info(name).shape
        if len(shape) < 2:
            return False
        row = _row_elements(shape)
        return 0 < row and (chunk_elements % row == 0 or row * 8 <= chunk_elements)

    def elements(self, name: str, a: int, b: int, out_dtype) -> memoryview:
        """Bytes of elements a..b-1 of the flattened delta (read from the rows that hold them)."""
        row = _row_elements(self.model.info(name).shape)
        r0, r1 = a // row, -(-b // row)
        d = self.get_delta(name, rows=(r0, r1)).to(out_dtype).reshape(-1)
        return tensor_bytes(d[a - r0 * row : b - r0 * row])

    def encoded(self, codec: TensorCodec, a: int, b: int, check) -> memoryview:
        """Bytes a..b-1 of the tensor's encoded form: the rows that hold them, computed and encoded
        a bounded number of elements at a time (``check`` sees each float32 block first)."""
        import torch

        w = codec.row_bytes
        r0, r1 = a // w, -(-b // w)
        step = max(1, ENCODE_ELEMENTS // max(1, codec.n))
        parts = []
        for s in range(r0, r1, step):
            d = self.get_delta(codec.name, rows=(s, min(r1, s + step)))
            check(d)
            parts.append(codec.encode(d, s))
        enc = parts[0] if len(parts) == 1 else torch.cat(parts)
        return tensor_bytes(enc.reshape(-1)[a - r0 * w : b - r0 * w])


def _source_blocks(source: Any, name: str, out_dtype, target_bytes: int, codec: TensorCodec | None = None, check=None) -> Iterator[memoryview] | None:
    """The delta of one tensor as byte blocks of about ``target_bytes`` of float32, or None when
    the source leaves it untouched (receivers read a tensor a package lacks as a zero delta).

    A matrix is asked for a few rows at a time (``get_delta(name, rows=...)``, part of the
    ``DeltaSource`` contract), so memory never holds a whole tensor. The first block is computed
    here, eagerly, so a ``None`` delta is known before the tensor is planned into the package.
    With ``codec``, each block of rows is checked (``check``) and encoded.
    """
    shape = tuple(int(d) for d in source.info(name).shape)
    step = max(1, target_bytes // max(1, _row_elements(shape) * 4))

    def as_bytes(d, r0: int) -> memoryview:
        if codec is None:
            return tensor_bytes(d.to(out_dtype))
        check(d)
        return tensor_bytes(codec.encode(d, r0))

    if len(shape) < 2 or shape[0] <= step:
        d = source.get_delta(name)
        return None if d is None else iter([as_bytes(d, 0)])
    first = source.get_delta(name, rows=(0, step))
    if first is None:
        return None

    def rows() -> Iterator[memoryview]:
        yield as_bytes(first, 0)
        for r0 in range(step, shape[0], step):
            part = source.get_delta(name, rows=(r0, min(shape[0], r0 + step)))
            if part is None:
                raise PackageError(f"tensor {name!r}: the delta source gave rows 0:{step} but nothing for rows {r0}:{min(shape[0], r0 + step)}", tensor=name)
            yield as_bytes(part, r0)

    return rows()


def _as_source(model: Any, reference: Any) -> Any:
    from fedmerge.merging.taskvector import DeltaTensors

    if isinstance(model, (str, os.PathLike)):
        if reference is None:
            raise PackageError("a model folder needs a reference folder (base or current global model) to compute the delta")
        return FolderPairDelta(model, reference)
    if not isinstance(model, DeltaTensors):
        raise PackageError(f"{type(model).__name__} is neither a model folder nor a delta source (label, names(), info(name), get_delta(name, *, rows=None, base=None))")
    return model


# -- packing --------------------------------------------------------------------------------------
def pack_delta(
    model: Any,
    reference: Any,
    out_dir: str | os.PathLike[str],
    identity: Identity,
    round_id: int,
    reference_fingerprint: str | None = None,
    seal_to: PublicIdentity | None = None,
    *,
    dtype: str = "float32",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    label: str | None = None,
    workers: int = DEFAULT_WORKERS,
    overwrite: bool = False,
    progress: bool = False,
    torch_threads: int | None = 1,
    compress: str | Compression = "none",
    compress_seed: int | None = None,
) -> Path:
    """Compute, sign and (optionally) seal a delta package; returns the package directory.

    ``model`` and ``reference`` are model folders, or ``model`` is a ``DeltaSource`` (see
    ``fedmerge.merging.taskvector``) and ``reference`` is None. ``reference_fingerprint`` names
    the reference weights the deltas are relative to; computed from a reference folder when None.
    ``chunk_bytes``: a multiple of 8 from 256 bytes to 64 MiB. The directory appears only when
    complete (written in a temporary folder, then renamed). ``torch_threads``: torch's intra-op
    threads while packing (restored after). One is fastest: the other cores hash and seal.
    ``compress``: a codec spec (``none``, ``int8``, ``int4``, ``sparse:0.25+int4``...) applied to
    every matrix; ``compress_seed`` (default: drawn at random) is the seed its random choices
    derive from, signed in the manifest.
    """
    with torch_thread_count(torch_threads):
        source = _as_source(model, reference)
        if reference_fingerprint is None:
            if not isinstance(reference, (str, os.PathLike)):
                raise PackageError("give reference_fingerprint when the delta source is not a pair of folders")
            reference_fingerprint = model_fingerprint(CheckpointReader(reference), progress=True)
        job = PackJob(source, Path(out_dir), identity, round_id, reference_fingerprint, seal_to, dtype, chunk_bytes, max_file_bytes, workers,
                      compression=_compression(compress), seed=compress_seed)  # fmt: skip
        return job.run(label=label, overwrite=overwrite, progress=progress)


def _compression(compress: str | Compression) -> Compression:
    if isinstance(compress, Compression):
        return compress
    try:
        return parse_compression(compress)
    except UnknownCompression as exc:
        raise PackageError(str(exc)) from None


class _Elements:
    """A raw chunk's recipe: elements a..b-1 of a tensor's delta, computed in the pool."""

    def __init__(self, name: str, a: int, b: int, elsize: int):
        self.name, self.a, self.b = name, a, b
        self.nbytes = (b - a) * elsize

    def compute(self, job: "PackJob") -> memoryview:
        return job.source.elements(self.name, self.a, self.b, job.tdtype)


class _EncodedBytes:
    """An encoded chunk's recipe: bytes a..b-1 of a tensor's encoded form, computed in the pool."""

    def __init__(self, codec: TensorCodec, a: int, b: int):
        self.codec, self.a, self.b = codec, a, b
        self.nbytes = b - a

    def compute(self, job: "PackJob") -> memoryview:
        return job.source.encoded(self.codec, self.a, self.b, job.finite_check(self.codec.name))


class PackJob:
    """One package being made: plan the chunks, compute and seal them, write and hash them, sign.

    Stages run in ``fedmerge.checkpoints.pipeline.run_ordered``: ``_plan`` (caller's thread)
    decides where every tensor goes and yields its chunks, ``_compute`` (pool) makes the bytes,
    checks them and seals them, ``_store`` (consumer thread) writes them in order and hands them
    to the hash lanes; ``_finish`` writes and signs the manifest.
    """

    def __init__(self, source: Any, out: Path, identity: Identity, round_id: int, reference_fingerprint: str, seal_to: PublicIdentity | None, dtype: str, chunk_bytes: int, max_file_bytes: int, workers: int,
                 *, compression: Compression | None = None, seed: int | None = None):  # fmt: skip
        if type(round_id) is not int or round_id < 0:
            raise PackageError(f"round {round_id!r} must be a non-negative integer")
        if type(chunk_bytes) is not int or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES or chunk_bytes % 8:
            raise PackageError(f"chunk_bytes {chunk_bytes} must be a multiple of 8 between {MIN_CHUNK_BYTES} and {MAX_CHUNK_BYTES} (64 MiB)")
        self.source = source
        self.out = out
        self.identity = identity
        self.round_id = round_id
        self.reference_fingerprint = reference_fingerprint
        self.seal_to = seal_to
        self.code = delta_dtype(dtype)
        self.tdtype = torch_dtype(self.code)
        self.elsize = dtype_nbytes(self.code)
        self.chunk_bytes = chunk_bytes
        self.max_file_bytes = max_file_bytes
        self.workers = workers
        self.compression = compression or parse_compression("none")
        if seed is not None and (type(seed) is not int or not 0 <= seed <= MAX_SEED):
            raise PackageError(f"compression seed {seed!r} must be an integer from 0 to 2^53")
        self.seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        self.compression_info = None if self.compression.is_none else CompressionInfo(self.compression.spec, self.seed)
        self.nonce = secrets.token_hex(16)
        self.sealer: ChunkSealer | None = None
        self.seal_info: SealInfo | None = None
        if seal_to is not None:
            sender = identity.name
            key, eph = new_sender_key(seal_to.x25519(), seal_to.encryption_key, FORMAT, sender, identity.public.signing_key, round_id, self.nonce)
            self.sealer = ChunkSealer(key, FORMAT, sender, round_id, self.nonce)
            self.seal_info = SealInfo(seal_to.name, b64(seal_to.encryption_key), b64(eph))
        self.tag = TAG_BYTES if self.sealer else 0
        self.entries: list[dict] = []
        self.files: list[list] = []  # [name, size]
        self.budget = ByteBudget(IN_FLIGHT_BYTES)
        self.lanes: HashLanes | None = None
        self._fh = None
        self._tmp: Path | None = None
        self._bar = None

    def run(self, *, label: str | None, overwrite: bool, progress: bool) -> Path:
        from tqdm import tqdm

        out = self.out
        if out.exists() and not overwrite:
            raise PackageError(f"{out}: already exists; choose another package folder", path=out)
        names = list(self.source.names())
        if not names:
            raise PackageError("the delta source has no tensors")
        started = time.perf_counter()
        total = sum(self.compression.nbytes(tuple(self.source.info(n).shape), self.code) for n in names)
        self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"pack {out.name}", disable=not progress, leave=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            with HashLanes(self.workers) as self.lanes:  # every digest is in its entry after this block
                run_ordered(self._plan(names), self._compute, self._store, workers=self.workers, budget=self.budget, cost=self._cost)
            if not self.entries:
                raise PackageError("every delta of the source is zero (None); there is nothing to send")
            manifest = self._finish(label if label is not None else str(self.source.label))
            if out.exists():
                shutil.rmtree(out)
            self._tmp.rename(out)
        except BaseException:
            self._close_file()
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        finally:
            self._bar.close()
        log.info(
            "packed %s: %d tensors, %.1f MB %s%s, round %d, in %.1fs", out, len(self.entries), manifest.total_bytes / 1e6,
            self.code if self.compression.is_none else f"{self.compression.spec} (values {self.code})",
            f", sealed to {self.seal_to.name}" if self.seal_to else "", self.round_id, time.perf_counter() - started,
        )  # fmt: skip
        return out

    # -- stages ------------------------------------------------------------------------------------
    def _plan(self, names: list[str]) -> Iterator[tuple]:
        """Where every tensor goes, and its chunks: bytes, or from folders a recipe (an element or
        encoded byte range) that the pool computes in parallel."""
        source, cb, elsize = self.source, self.chunk_bytes, self.elsize
        ti = -1
        for name in names:
            shape = tuple(int(d) for d in source.info(name).shape)
            codec = self._codec(name, shape)
            folders = isinstance(source, FolderPairDelta)
            if codec is not None:
                direct = folders and codec.row_bytes * 8 <= cb
                blocks = None if direct else _source_blocks(source, name, self.tdtype, cb, codec, self.finite_check(name))
            else:
                direct = folders and source.chunkable(name, cb // elsize)
                blocks = None if direct else _source_blocks(source, name, self.tdtype, cb)
            if blocks is None and not direct:
                continue
            ti += 1
            nbytes = codec.nbytes if codec is not None else math.prod(shape) * elsize
            n = chunk_count(nbytes, cb)
            if not self.files or (self.files[-1][1] and self.files[-1][1] + nbytes + n * self.tag > self.max_file_bytes):
                self.files.append([f"data-{len(self.files):05d}.bin", 0])
            entry = {"name": name, "shape": list(shape), "dtype": self.code, "file": self.files[-1][0], "offset": self.files[-1][1], "nbytes": nbytes, "stored": nbytes + n * self.tag, "chunks": n}
            self.files[-1][1] += entry["stored"]
            self.entries.append(entry)
            if direct:
                for ci in range(n):
                    if codec is not None:
                        recipe: Any = _EncodedBytes(codec, ci * cb, min(nbytes, (ci + 1) * cb))
                    else:
                        per = cb // elsize
                        recipe = _Elements(name, ci * per, min(math.prod(shape), (ci + 1) * per), elsize)
                    yield (ti, name, ci, n, recipe, entry)
                continue
            got = 0
            for ci, chunk in enumerate(_rechunk(blocks, cb)):
                got += len(chunk)
                yield (ti, name, ci, n, chunk, entry)
            if got != nbytes:
                raise TensorMismatch(f"tensor {name!r}: the delta source gave {got} bytes, its shape {list(shape)} in {self.code} needs {nbytes}", sender=self.identity.name, tensor=name)

    def _codec(self, name: str, shape: tuple[int, ...]) -> TensorCodec | None:
        if not self.compression.applies_to(shape):
            return None
        return self.compression.for_tensor(name, shape, self.seed, self.code)

    def finite_check(self, name: str):
        """Refuse a float32 delta block holding NaN or infinity (checked before it is encoded)."""

        def check(d) -> None:
            if not all_finite(d):
                raise NonFiniteValues(f"tensor {name!r}: the delta holds NaN or infinite values; check the fine-tuned weights", sender=self.identity.name, tensor=name)

        return check

    def _cost(self, item: tuple) -> int:
        chunk = item[4]
        nbytes = len(chunk) if isinstance(chunk, memoryview) else chunk.nbytes
        extra = ENCODE_ELEMENTS * 8 if isinstance(chunk, _EncodedBytes) else 0  # float32 rows and their encoding
        return nbytes * (2 if self.sealer else 1) + extra

    def _compute(self, item: tuple):
        ti, name, ci, n, chunk, entry = item
        if not isinstance(chunk, memoryview):
            encoded = isinstance(chunk, _EncodedBytes)
            chunk = chunk.compute(self)
        else:
            encoded = self.compression.applies_to(tuple(entry["shape"]))
        if not encoded and has_non_finite(chunk, self.code):
            raise NonFiniteValues(f"tensor {name!r}: the delta holds NaN or infinite values (chunk {ci + 1}/{n}); check the fine-tuned weights", sender=self.identity.name, tensor=name)
        return chunk, (self.sealer.seal(ti, name, ci, n, chunk) if self.sealer else chunk)

    def _store(self, item: tuple, result) -> None:
        ti, name, ci, n, _, entry = item
        chunk, stored = result
        assert self._tmp is not None and self.lanes is not None
        path = self._tmp / entry["file"]
        if ci == 0 and (self._fh is None or self._fh.name != str(path)):
            self._close_file()
            self._fh = open(path, "wb")
        self._fh.write(stored)
        cost = self._cost(item)
        self.lanes.update(ti, chunk, after=lambda: self.budget.release(cost))
        if ci == n - 1:
            self.lanes.finish(ti, lambda digest, e=entry: e.__setitem__("sha256", digest))
            self._bar.update(entry["nbytes"])

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _finish(self, label: str) -> DeltaManifest:
        assert self._tmp is not None
        self._close_file()
        for fname, _ in self.files:
            with open(self._tmp / fname, "rb") as fh:
                os.fsync(fh.fileno())
        e = self.entries
        manifest = DeltaManifest(
            sender=self.identity.name,
            round=self.round_id,
            reference=self.reference_fingerprint,
            nonce=self.nonce,
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            chunk_bytes=self.chunk_bytes,
            tensors=tuple(TensorEntry(t["name"], tuple(t["shape"]), t["dtype"], t["sha256"], t["file"], t["offset"], t["nbytes"], t["stored"], t["chunks"]) for t in e),
            files=tuple((f, s) for f, s in self.files),
            sealed=self.seal_info,
            label=label,
            compression=self.compression_info,
        )
        raw = manifest.to_bytes()
        parse_manifest(raw)  # never send what the receiver would refuse
        (self._tmp / MANIFEST_NAME).write_bytes(raw)
        sig = self.identity.sign(signature_payload("delta", raw))
        (self._tmp / SIGNATURE_NAME).write_bytes(signature_doc(self.identity.name, self.identity.public.key_id, sig))
        return manifest
