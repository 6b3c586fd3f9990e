"""Delta packages: a signed, optionally sealed task vector in a directory of plain files.

Layout of a package directory::

    manifest.json    canonical JSON (see ``manifest``): sender, round, reference fingerprint,
                     nonce, time, every tensor with shape, dtype, SHA-256, file, offset, chunks
    signature.json   Ed25519 signature of the sender over the manifest bytes
    data-00000.bin   tensor bytes back to back (sealed: each chunk followed by its GCM tag)

Packing streams: the delta of one tensor is computed a few rows at a time (float32 by
default, ``model.float() - reference.float()`` exactly as the merge engine computes it), cut into
chunks of ``chunk_bytes``, checked for finiteness, hashed, sealed and written, with the stages
overlapping in a thread pipeline. Verifying streams the same way and refuses, with a typed error
naming the sender and tensor, anything the manifest does not vouch for. ``unpack`` writes the
verified deltas as a folder of safetensors (a ``DeltaCheckpoint``), atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from fedmerge.security.errors import (
    DigestMismatch,
    ManifestInvalid,
    NonFiniteValues,
    NotSealedForYou,
    OpenerRequired,
    OversizedData,
    PackageError,
    ReferenceMismatch,
    SignatureInvalid,
    StaleRound,
    TensorMismatch,
    TruncatedData,
)
from fedmerge.security.keys import Identity, PublicIdentity, b64, unb64
from fedmerge.security.manifest import (
    DELTA_DTYPES,
    FORMAT,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    DeltaManifest,
    SealInfo,
    TensorEntry,
    chunk_count,
    parse_manifest,
    parse_signature_doc,
    signature_doc,
    signature_payload,
)
from fedmerge.security.pipeline import DEFAULT_WORKERS, HashLanes, run_ordered
from fedmerge.security.seal import TAG_BYTES, ChunkSealer, derive_key, new_sender_key
from fedmerge.security.trust import TrustStore

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3
DELTA_METADATA_NAME = "fedmerge.json"
_DTYPE_ALIASES = {"float32": "F32", "f32": "F32", "fp32": "F32", "bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "f16": "F16", "fp16": "F16", "half": "F16"}


def delta_dtype(name: str) -> str:
    """Normalise a dtype spelling to the manifest's (F32, BF16, F16)."""
    key = str(name).strip()
    if key.upper() in DELTA_DTYPES:
        return key.upper()
    try:
        return _DTYPE_ALIASES[key.lower()]
    except KeyError:
        raise PackageError(f"delta dtype {name!r} is not supported; use float32 (default), bfloat16 or float16") from None


def _torch_dtype(code: str):
    import torch

    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[code]


def _bytes_of(t) -> memoryview:
    import torch

    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _first_non_finite(buf, dtype: str) -> bool:
    """True when the little-endian values in ``buf`` include a NaN or an infinity."""
    import numpy as np

    if not len(buf):
        return False
    if dtype == "F32":
        a = np.frombuffer(buf, dtype="<f4")
        # Fast path: a finite float32 sum means every value is finite (NaN and inf propagate);
        # only a non-finite sum (or an overflow of huge values) needs the exact, slower check.
        if np.isfinite(np.add.reduce(a, dtype=np.float32)):
            return False
        return not bool(np.isfinite(a).all())
    if dtype == "F16":
        return not bool(np.isfinite(np.frombuffer(buf, dtype="<f2")).all())
    # bfloat16: exponent bits all ones means inf or NaN.
    return bool(((np.frombuffer(buf, dtype="<u2") & 0x7F80) == 0x7F80).any())


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
class _FolderDelta:
    """model - reference, read a few rows at a time straight from the safetensors files."""

    def __init__(self, model: str | os.PathLike[str], reference: str | os.PathLike[str]):
        from fedmerge.checkpoints import CheckpointReader

        self.model = CheckpointReader(model)
        self.reference = CheckpointReader(reference)
        self.label = f"{Path(model).name} - {Path(reference).name}"
        for name in self.model.names():
            mi = self.model.info(name)
            if name not in self.reference:
                raise PackageError(f"{self.reference.path}: has no tensor {name!r}, which {self.model.path} has; is it the right reference?", tensor=name)
            ri = self.reference.info(name)
            if mi.shape != ri.shape:
                raise TensorMismatch(f"tensor {name!r}: shape {list(mi.shape)} in {self.model.path} but {list(ri.shape)} in the reference {self.reference.path}", tensor=name)
        extra = sorted(set(self.reference.names()) - set(self.model.names()))
        if extra:
            raise PackageError(f"{self.model.path}: lacks tensor {extra[0]!r} of the reference ({len(extra)} in all)", tensor=extra[0])

    def names(self) -> list[str]:
        return self.model.names()

    def info(self, name: str):
        return self.model.info(name)

    def blocks(self, name: str, out_dtype, target_bytes: int) -> Iterator[memoryview]:
        shape = self.model.info(name).shape
        if len(shape) < 2:
            yield _bytes_of(_sub(self.model.get(name), self.reference.get(name)).to(out_dtype))
            return
        row = 1
        for d in shape[1:]:
            row *= d
        rows = max(1, target_bytes // max(1, row * 4))
        for r0 in range(0, shape[0], rows):
            r = (r0, min(shape[0], r0 + rows))
            yield _bytes_of(_sub(self.model.get(name, rows=r), self.reference.get(name, rows=r)).to(out_dtype))

    def chunkable(self, name: str, chunk_elements: int) -> bool:
        """Whether chunks of this tensor can be computed from row slices with little over-read."""
        shape = self.model.info(name).shape
        if len(shape) < 2:
            return False
        row = 1
        for d in shape[1:]:
            row *= d
        return 0 < row and (chunk_elements % row == 0 or row * 8 <= chunk_elements)

    def elements(self, name: str, a: int, b: int, out_dtype) -> memoryview:
        """Bytes of elements a..b-1 of the flattened delta (read from the rows that hold them)."""
        shape = self.model.info(name).shape
        row = 1
        for d in shape[1:]:
            row *= d
        r0, r1 = a // row, -(-b // row)
        d = _sub(self.model.get(name, rows=(r0, r1)), self.reference.get(name, rows=(r0, r1))).to(out_dtype).reshape(-1)
        return _bytes_of(d[a - r0 * row : b - r0 * row])

    def get_delta(self, name: str):
        return _sub(self.model.get(name), self.reference.get(name))


def _sub(model_t, reference_t):
    """``model.float() - reference.float()``, bit for bit, with one float32 buffer instead of three
    (widening bf16/fp16 to float32 is exact, and the subtraction runs in float32 either way)."""
    import torch

    d = model_t.to(torch.float32, copy=True)
    return d.sub_(reference_t if reference_t.dtype in (torch.float32, torch.bfloat16, torch.float16) else reference_t.float())


def _source_blocks(source: Any, name: str, out_dtype, target_bytes: int) -> Iterator[memoryview] | None:
    """The delta of one tensor as byte blocks, or None when the source leaves it untouched.

    The first block is computed here, eagerly, so a ``None`` delta is known before the tensor
    is planned into the package (receivers treat a tensor a package lacks as a zero delta, as
    ``DeltaCheckpoint`` does).
    """
    if isinstance(source, _FolderDelta):
        return source.blocks(name, out_dtype, target_bytes)
    shape = tuple(int(d) for d in source.info(name).shape)
    row = 1
    for d in shape[1:]:
        row *= d
    step = max(1, target_bytes // max(1, row * 4))
    if len(shape) >= 2 and shape[0] > step:
        # Sources of the merge engine take ``rows=``: read a few rows at a time, not the tensor.
        try:
            first = source.get_delta(name, rows=(0, step))
        except TypeError:
            first = None
            step = 0
        if step:
            if first is None:
                return None

            def rows() -> Iterator[memoryview]:
                yield _bytes_of(first.detach().cpu().to(out_dtype))
                for r0 in range(step, shape[0], step):
                    yield _bytes_of(source.get_delta(name, rows=(r0, min(shape[0], r0 + step))).detach().cpu().to(out_dtype))

            return rows()
    d = source.get_delta(name)
    if d is None:
        return None
    return iter([_bytes_of(d.detach().cpu().to(out_dtype))])


def _fingerprint_of(reference: Any) -> str:
    from fedmerge.checkpoints import CheckpointReader, model_fingerprint

    return model_fingerprint(CheckpointReader(reference), progress=True)


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
) -> Path:
    """Compute, sign and (optionally) seal a delta package; returns the package directory.

    ``model`` and ``reference`` are model folders, or ``model`` is a delta source (``names``,
    ``info``, ``get_delta``) and ``reference`` is None. ``reference_fingerprint`` names the
    reference weights the deltas are relative to; computed from a reference folder when None.
    The directory appears only when complete (written in a temporary folder, then renamed).
    ``torch_threads``: torch's intra-op threads while packing (restored after). One is fastest:
    the other cores hash and seal, and a second torch thread only contends with them.
    """
    import torch

    saved_threads = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        return _pack(model, reference, out_dir, identity, round_id, reference_fingerprint, seal_to, dtype, chunk_bytes, max_file_bytes, label, workers, overwrite, progress)
    finally:
        torch.set_num_threads(saved_threads)


def _pack(model, reference, out_dir, identity, round_id, reference_fingerprint, seal_to, dtype, chunk_bytes, max_file_bytes, label, workers, overwrite, progress) -> Path:
    if isinstance(model, (str, os.PathLike)):
        if reference is None:
            raise PackageError("a model folder needs a reference folder (base or current global model) to compute the delta")
        source: Any = _FolderDelta(model, reference)
    else:
        source = model
    if reference_fingerprint is None:
        if not isinstance(reference, (str, os.PathLike)):
            raise PackageError("give reference_fingerprint when the delta source is not a pair of folders")
        reference_fingerprint = _fingerprint_of(reference)
    if type(round_id) is not int or round_id < 0:
        raise PackageError(f"round {round_id!r} must be a non-negative integer")
    if chunk_bytes < 256 or chunk_bytes % 8 or chunk_bytes > 1 << 30:
        raise PackageError(f"chunk_bytes {chunk_bytes} must be a multiple of 8 between 256 and 1 GiB")
    code = delta_dtype(dtype)
    tdtype = _torch_dtype(code)
    elsize = DELTA_DTYPES[code]
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise PackageError(f"{out}: already exists; choose another package folder", path=out)
    sender = identity.name
    nonce = secrets.token_hex(16)
    sealer: ChunkSealer | None = None
    seal_info: SealInfo | None = None
    if seal_to is not None:
        key, eph = new_sender_key(seal_to.x25519(), seal_to.encryption_key, FORMAT, sender, round_id, nonce)
        sealer = ChunkSealer(key, FORMAT, sender, round_id, nonce)
        seal_info = SealInfo(seal_to.name, b64(seal_to.encryption_key), b64(eph))
    tag = TAG_BYTES if sealer else 0

    names = list(source.names())
    if not names:
        raise PackageError("the delta source has no tensors")
    entries: list[dict] = []
    files: list[list] = []  # [name, size]
    state: dict[str, Any] = {"fh": None}
    started = time.perf_counter()

    def plan() -> Iterator[tuple]:
        # Runs in the caller's thread: decides where every tensor goes, yields its chunks. From
        # model folders a chunk is yielded as a recipe (rows to read and subtract), computed by
        # the pool in parallel; from other sources the bytes are computed here.
        ti = -1
        for name in names:
            direct = isinstance(source, _FolderDelta) and source.chunkable(name, chunk_bytes // elsize)
            blocks = None if direct else _source_blocks(source, name, tdtype, chunk_bytes)
            if blocks is None and not direct:
                continue
            ti += 1
            info = source.info(name)
            shape = tuple(int(d) for d in info.shape)
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * elsize
            n = chunk_count(nbytes, chunk_bytes)
            if not files or (files[-1][1] and files[-1][1] + nbytes + n * tag > max_file_bytes):
                files.append([f"data-{len(files):05d}.bin", 0])
            entry = {"name": name, "shape": list(shape), "dtype": code, "file": files[-1][0], "offset": files[-1][1], "nbytes": nbytes, "stored": nbytes + n * tag, "chunks": n}
            files[-1][1] += entry["stored"]
            entries.append(entry)
            if direct:
                per = chunk_bytes // elsize
                for ci in range(n):
                    yield (ti, name, ci, n, (name, ci * per, min(numel, (ci + 1) * per)), entry)
                continue
            got = 0
            for ci, chunk in enumerate(_rechunk(blocks, chunk_bytes)):
                got += len(chunk)
                yield (ti, name, ci, n, chunk, entry)
            if got != nbytes:
                raise TensorMismatch(f"tensor {name!r}: the delta source gave {got} bytes, its shape {list(shape)} in {code} needs {nbytes}", sender=sender, tensor=name)

    def work(item: tuple):
        ti, name, ci, n, chunk, _ = item
        if isinstance(chunk, tuple):
            chunk = source.elements(*chunk, tdtype)
        if _first_non_finite(chunk, code):
            raise NonFiniteValues(f"tensor {name!r}: the delta holds NaN or infinite values (chunk {ci + 1}/{n}); check the fine-tuned weights", sender=sender, tensor=name)
        return chunk, (sealer.seal(ti, name, ci, n, chunk) if sealer else chunk)

    lanes = HashLanes(workers)

    def sink(item: tuple, result) -> None:
        ti, name, ci, n, _, entry = item
        chunk, stored = result
        if ci == 0 and (state["fh"] is None or state["fh"].name != str(tmp / entry["file"])):
            if state["fh"] is not None:
                state["fh"].close()
            state["fh"] = open(tmp / entry["file"], "wb")
        lanes.update(ti, chunk)
        state["fh"].write(stored)
        if ci == n - 1:
            lanes.finish(ti, lambda digest, e=entry: e.__setitem__("sha256", digest))
            bar.update(entry["nbytes"])

    from tqdm import tqdm

    total = sum(math.prod(source.info(n).shape) for n in names) * elsize
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"pack {out.name}", disable=not progress, leave=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with lanes:  # every digest is in its entry after this block
            run_ordered(plan(), work, sink, workers=workers)
        if not entries:
            raise PackageError("every delta of the source is zero (None); there is nothing to send")
        if state["fh"] is not None:
            state["fh"].close()
        for fname, _ in files:
            with open(tmp / fname, "rb") as fh:
                os.fsync(fh.fileno())
        manifest = DeltaManifest(
            sender=sender,
            round=round_id,
            reference=reference_fingerprint,
            nonce=nonce,
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            chunk_bytes=chunk_bytes,
            tensors=tuple(TensorEntry(e["name"], tuple(e["shape"]), e["dtype"], e["sha256"], e["file"], e["offset"], e["nbytes"], e["stored"], e["chunks"]) for e in entries),
            files=tuple((f, s) for f, s in files),
            sealed=seal_info,
            label=label if label is not None else str(getattr(source, "label", "")),
        )
        raw = manifest.to_bytes()
        parse_manifest(raw)  # never send what the receiver would refuse
        (tmp / MANIFEST_NAME).write_bytes(raw)
        (tmp / SIGNATURE_NAME).write_bytes(signature_doc(sender, identity.public.key_id, identity.sign(signature_payload("delta", raw))))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        if state["fh"] is not None:
            state["fh"].close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    secs = time.perf_counter() - started
    total = manifest.total_bytes
    log.info("packed %s: %d tensors, %.1f MB %s%s, round %d, in %.1fs", out, len(entries), total / 1e6, code, f", sealed to {seal_to.name}" if seal_to else "", round_id, secs)
    return out


# -- verifying ------------------------------------------------------------------------------------
def read_manifest(pkg_dir: str | os.PathLike[str]) -> DeltaManifest:
    """Parse a package's manifest without checking its signature (for display only)."""
    return parse_manifest(_read_limited(Path(pkg_dir) / MANIFEST_NAME, MAX_MANIFEST_BYTES))


def _read_limited(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except FileNotFoundError:
        raise TruncatedData(f"{path}: missing; a package needs {MANIFEST_NAME}, {SIGNATURE_NAME} and its data files", path=path) from None
    except OSError as exc:
        raise PackageError(f"{path}: cannot read ({exc.strerror})", path=path) from None
    if len(raw) > limit:
        raise OversizedData(f"{path}: larger than the {limit} bytes allowed", path=path)
    return raw


@dataclass
class VerifiedPackage:
    """A package whose manifest, signature, sender and round were checked (and data, unless told)."""

    path: Path
    manifest: DeltaManifest
    sender: str
    data_checked: bool
    opener: Identity | None = None
    expected_dtype: str | None = None

    @property
    def round(self) -> int:
        return self.manifest.round

    @property
    def sealed(self) -> bool:
        return self.manifest.sealed is not None

    @property
    def package_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest.to_bytes()).hexdigest()

    def unpack(self, out_dir: str | os.PathLike[str], max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False, workers: int = DEFAULT_WORKERS) -> Path:
        """Write the deltas as a folder of safetensors, checking every byte again on the way.

        The files may have changed since ``verify_package`` ran, so nothing read here is trusted
        until its digest matches; the folder appears only when complete.
        """
        writer = _DeltaFolderWriter(Path(out_dir), self.manifest, max_shard_bytes, overwrite)
        try:
            _stream_data(self.path, self.manifest, self.opener, writer, workers)
            return writer.commit()
        finally:
            writer.abort()


def verify_package(
    pkg_dir: str | os.PathLike[str],
    trust: TrustStore,
    expected_round: int | None = None,
    expected_reference: str | None = None,
    opener: Identity | None = None,
    replay_guard: Any = None,
    *,
    expected_tensors: Mapping[str, Any] | Any = None,
    expected_dtype: str | None = None,
    check_data: bool = True,
    unpack_to: str | os.PathLike[str] | None = None,
    workers: int = DEFAULT_WORKERS,
) -> VerifiedPackage:
    """Check a package end to end; return it verified or raise the typed reason.

    Order: manifest well-formed -> sender enrolled -> signature -> round and reference ->
    replay -> file sizes -> (sealed: ours?) -> every chunk authenticated, hashed, finite. With
    ``unpack_to`` the deltas are written in the same pass. The replay guard records the package
    only once all of it passed. ``expected_tensors`` (name -> shape, or a ``CheckpointReader``)
    makes a tensor list or shape that differs from the reference model a ``TensorMismatch``.
    ``check_data=False`` skips the data (a sealed package without ``opener`` can be checked no
    further); such a package cannot be unpacked without an opener.
    """
    pkg = Path(pkg_dir)
    if not pkg.is_dir():
        raise PackageError(f"{pkg}: not a package directory", path=pkg)
    raw = _read_limited(pkg / MANIFEST_NAME, MAX_MANIFEST_BYTES)
    try:
        manifest = parse_manifest(raw)
    except ManifestInvalid as exc:
        raise ManifestInvalid(f"{pkg / MANIFEST_NAME}: {exc}", path=pkg) from None
    sender = manifest.sender
    entry = trust.require(sender)
    signer, key_id, sig = parse_signature_doc(_read_limited(pkg / SIGNATURE_NAME, 4096), str(pkg / SIGNATURE_NAME))
    if signer != sender:
        raise SignatureInvalid(f"package from {sender!r}: signed by {signer!r}, not by its sender", sender=sender, path=pkg)
    if key_id != entry.public.key_id:
        raise SignatureInvalid(f"package from {sender!r}: signed with key {key_id}, but the enrolled key is {entry.public.key_id} (rotated keys? update the trust store)", sender=sender, path=pkg)
    if not entry.public.verify(sig, signature_payload("delta", raw)):
        raise SignatureInvalid(f"package from {sender!r}: the signature does not match the manifest and the enrolled key (edited, or signed with another key)", sender=sender, path=pkg)
    if expected_round is not None and manifest.round != expected_round:
        raise StaleRound(f"package from {sender!r} is for round {manifest.round}, expected round {expected_round}", sender=sender, path=pkg)
    if expected_reference is not None and manifest.reference != expected_reference:
        raise ReferenceMismatch(f"package from {sender!r} is relative to reference {manifest.reference}, expected {expected_reference}; the sender must recompute against the current model", sender=sender, path=pkg)
    if replay_guard is not None:
        replay_guard.check(sender, manifest.round, manifest.nonce)
    if expected_dtype is not None:
        want = delta_dtype(expected_dtype)
        for t in manifest.tensors:
            if t.dtype != want:
                raise TensorMismatch(f"package from {sender!r}: tensor {t.name!r} is {t.dtype}, expected {want}", sender=sender, tensor=t.name)
    if expected_tensors is not None:
        _check_expected(manifest, expected_tensors)
    _check_files(pkg, manifest)
    if manifest.sealed is not None and opener is not None:
        if unb64(manifest.sealed.recipient_key, 32, "sealed.recipient_key") != opener.public.encryption_key:
            raise NotSealedForYou(
                f"package from {sender!r} is sealed to {manifest.sealed.recipient!r} (another key than {opener.name!r}'s); only that coordinator can open it",
                sender=sender,
                path=pkg,
            )
    data_checked = False
    if check_data or unpack_to is not None:
        if manifest.sealed is not None and opener is None:
            raise OpenerRequired(f"package from {sender!r} is sealed to {manifest.sealed.recipient!r}; give that coordinator's identity to check its data", sender=sender, path=pkg)
        writer = _DeltaFolderWriter(Path(unpack_to), manifest) if unpack_to is not None else None
        try:
            _stream_data(pkg, manifest, opener, writer, workers)
            if writer is not None:
                writer.commit()
        finally:
            if writer is not None:
                writer.abort()
        data_checked = True
    if replay_guard is not None and data_checked:
        replay_guard.record(sender, manifest.round, manifest.nonce)
    log.info("verified package %s from %s, round %d%s%s", pkg, sender, manifest.round, ", sealed" if manifest.sealed else "", "" if data_checked else " (data not checked)")
    return VerifiedPackage(pkg, manifest, sender, data_checked, opener, expected_dtype)


def _check_expected(manifest: DeltaManifest, expected: Any) -> None:
    if hasattr(expected, "names") and hasattr(expected, "info"):
        shapes = {n: tuple(expected.info(n).shape) for n in expected.names()}
    else:
        shapes = {n: tuple(s) for n, s in dict(expected).items()}
    sender = manifest.sender
    for name in manifest.names():
        if name not in shapes:
            raise TensorMismatch(f"package from {sender!r}: tensor {name!r} is not in the reference model (renamed?)", sender=sender, tensor=name)
        if manifest.tensor(name).shape != shapes[name]:
            raise TensorMismatch(f"package from {sender!r}: tensor {name!r} has shape {list(manifest.tensor(name).shape)}, the reference has {list(shapes[name])}", sender=sender, tensor=name)
    # Tensors of the reference that the package lacks are zero deltas (e.g. from a LoRA adapter).


def _check_files(pkg: Path, manifest: DeltaManifest) -> None:
    sender = manifest.sender
    listed = {name: size for name, size in manifest.files}
    for p in pkg.iterdir():
        if p.is_symlink():
            raise PackageError(f"package from {sender!r}: {p.name} is a symbolic link; a package holds only plain files", sender=sender, path=p)
        if p.name not in listed and p.name not in (MANIFEST_NAME, SIGNATURE_NAME):
            raise OversizedData(f"package from {sender!r}: unlisted file {p.name!r} in {pkg}", sender=sender, path=p)
    for name, size in manifest.files:
        p = pkg / name
        if not p.is_file():
            raise TruncatedData(f"package from {sender!r}: data file {name} is missing", sender=sender, path=p)
        actual = p.stat().st_size
        if actual != size:
            first = next((t.name for t in manifest.tensors if t.file == name and t.offset + t.stored >= min(actual, size)), None)
            cls = TruncatedData if actual < size else OversizedData
            raise cls(f"package from {sender!r}: {name} has {actual} bytes, the manifest says {size}" + (f" (from tensor {first!r} on)" if first else ""), sender=sender, tensor=first, path=p)


def _sealer_for(manifest: DeltaManifest, opener: Identity) -> ChunkSealer:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    s = manifest.sealed
    assert s is not None
    eph = unb64(s.ephemeral_key, 32, "sealed.ephemeral_key")
    try:
        shared = opener.exchange(X25519PublicKey.from_public_bytes(eph))
    except ValueError:
        from fedmerge.security.errors import ChunkAuthenticationFailed

        raise ChunkAuthenticationFailed(f"package from {manifest.sender!r}: its ephemeral key is not usable", sender=manifest.sender) from None
    key = derive_key(shared, manifest.format, manifest.sender, manifest.round, manifest.nonce, eph, opener.public.encryption_key)
    return ChunkSealer(key, manifest.format, manifest.sender, manifest.round, manifest.nonce)


def _stream_data(pkg: Path, manifest: DeltaManifest, opener: Identity | None, writer: "_DeltaFolderWriter | None", workers: int) -> None:
    """Read every chunk, open it (sealed), check finiteness, hash per tensor, optionally write."""
    sender = manifest.sender
    if manifest.sealed is not None and opener is None:
        raise OpenerRequired(f"package from {sender!r} is sealed; give the coordinator identity to open it", sender=sender)
    sealer = _sealer_for(manifest, opener) if manifest.sealed is not None else None
    tag = TAG_BYTES if sealer else 0
    cb = manifest.chunk_bytes
    handles: dict[str, Any] = {}
    def chunks() -> Iterator[tuple]:
        for ti, t in enumerate(manifest.tensors):
            fh = handles.get(t.file)
            if fh is None:
                fh = handles[t.file] = open(pkg / t.file, "rb", buffering=0)
            pos = t.offset
            for ci in range(t.chunks):
                want = min(cb, t.nbytes - ci * cb) + tag
                yield (ti, t, ci, fh.fileno(), pos, want)
                pos += want

    def work(item: tuple):
        # Reading happens here too, so reads, AES-GCM and finiteness checks of several chunks
        # run in parallel; only hashing (per tensor, in order) is left to the consumer.
        ti, t, ci, fd, pos, want = item
        buf = os.pread(fd, want, pos) if want else b""  # one copy, no zero-filled buffer first
        if len(buf) != want:
            raise TruncatedData(f"package from {sender!r}: tensor {t.name!r} is cut short in {t.file} (chunk {ci + 1}/{t.chunks})", sender=sender, tensor=t.name)
        plain = sealer.open(ti, t.name, ci, t.chunks, buf) if sealer else buf
        if _first_non_finite(plain, t.dtype):
            raise NonFiniteValues(f"package from {sender!r}: tensor {t.name!r} holds NaN or infinite values (chunk {ci + 1}/{t.chunks})", sender=sender, tensor=t.name)
        return plain

    def compare(t: TensorEntry) -> Callable[[str], None]:
        def check(digest: str) -> None:
            if digest != t.sha256:
                raise DigestMismatch(f"package from {sender!r}: tensor {t.name!r} does not match its SHA-256 in the signed manifest (altered or damaged)", sender=sender, tensor=t.name)

        return check

    lanes = HashLanes(workers)

    def sink(item: tuple, plain) -> None:
        ti, t, ci = item[:3]
        lanes.update(ti, plain)
        if writer is not None:
            writer.write(t, plain)
        if ci == t.chunks - 1:
            lanes.finish(ti, compare(t))

    try:
        with lanes:  # raises the first DigestMismatch on leaving
            run_ordered(chunks(), work, sink, workers=workers)
    finally:
        for fh in handles.values():
            fh.close()


# -- unpacking ------------------------------------------------------------------------------------
class _DeltaFolderWriter:
    """Streams verified tensors into safetensors shards whose headers are known in advance."""

    def __init__(self, out: Path, manifest: DeltaManifest, max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False):
        if out.exists() and not overwrite:
            raise PackageError(f"{out}: already exists; choose another folder to unpack into", path=out)
        self.out = out
        self.manifest = manifest
        self.overwrite = overwrite
        shards: list[list[TensorEntry]] = [[]]
        size = 0
        for t in manifest.tensors:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.shard_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_of = {t.name: i for i, s in enumerate(shards) for t in s}
        self.shards = shards
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        self._fh = None
        self._cur = -1
        self._done = False

    def _open_shard(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for t in self.shards[i]:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
        hb += b" " * (-len(hb) % 8)
        self._fh = open(self.tmp / self.shard_names[i], "wb")
        self._fh.write(len(hb).to_bytes(8, "little") + hb)
        self._cur = i

    def write(self, t: TensorEntry, data) -> None:
        i = self.shard_of[t.name]
        if i != self._cur:
            self._open_shard(i)
        self._fh.write(data)

    def commit(self) -> Path:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        m = self.manifest
        if len(self.shard_names) > 1:
            index = {"metadata": {"total_size": m.total_bytes}, "weight_map": {t.name: self.shard_names[self.shard_of[t.name]] for t in sorted(m.tensors, key=lambda x: x.name)}}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        meta = {"kind": "delta", "sender": m.sender, "round": m.round, "reference": m.reference, "nonce": m.nonce, "created": m.created, "label": m.label, "package_format": m.format, "sealed": m.sealed is not None}
        (self.tmp / DELTA_METADATA_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in self.tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.out)
        self._done = True
        log.info("unpacked %d tensors from %s (round %d) into %s", len(m.tensors), m.sender, m.round, self.out)
        return self.out

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if not self._done:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._done = True
