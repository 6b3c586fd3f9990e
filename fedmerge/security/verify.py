"""Verifying a delta package: nothing is parsed, opened or merged that its signature does not cover.

``verify_package`` checks, in this order, each failure a typed error naming the package file,
the sender and, where there is one, the tensor:

1. the trust store was loaded verified (``TrustStore.load``), not opened for editing;
2. ``signature.json`` (at most 4 KiB, a plain file) names an enrolled, unrevoked signer whose
   key id matches;
3. ``manifest.json`` (at most 16 MiB, a plain file) is read as raw bytes and the signature is
   checked over them BEFORE the JSON is parsed, so a forged manifest costs one read and one
   Ed25519 check, never a parse;
4. the manifest is well formed and canonical, names the signer as its sender, is sealed when
   sealing is required, is for the expected round and reference (and not a replay), and is
   compressed as expected;
5. tensors, dtypes and shapes fit the reference model (when given); the folder holds exactly the
   listed plain files with their exact sizes (no links, FIFOs or extras);
6. every chunk is read, authenticated (sealed), checked finite and hashed against the manifest,
   a bounded number of bytes in flight at once; with ``unpack_to`` the deltas are written in the
   same pass and appear only when all of it passed. A compressed tensor is checked as it was
   sent: its digest covers the encoded bytes, and its stored scales (or values) must be finite
   and stay finite once decoding multiplies them; it is unpacked encoded, never decoded here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from fedmerge.checkpoints.codecs import canonical_spec
from fedmerge.checkpoints.compat import CompatibilityCheck, Shapes
from fedmerge.checkpoints.errors import CheckpointError
from fedmerge.checkpoints.pipeline import DEFAULT_WORKERS, ByteBudget, run_ordered
from fedmerge.checkpoints.reader import open_regular
from fedmerge.security.delta_folder import DEFAULT_SHARD_BYTES, DeltaFolderWriter
from fedmerge.checkpoints.errors import UnknownCompression
from fedmerge.security.errors import (
    ChunkAuthenticationFailed,
    CompressionMismatch,
    DigestMismatch,
    ManifestInvalid,
    NonFiniteValues,
    NotAPlainFile,
    NotSealedForYou,
    OpenerRequired,
    OversizedData,
    PackageError,
    ReferenceMismatch,
    SignatureInvalid,
    StaleRound,
    TensorMismatch,
    TruncatedData,
    UnsealedPackage,
)
from fedmerge.security.files import file_kind, read_capped
from fedmerge.security.finite import has_non_finite
from fedmerge.security.hashing import HashLanes
from fedmerge.security.keys import Identity, unb64
from fedmerge.security.manifest import (
    IN_FLIGHT_BYTES,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
    DeltaManifest,
    TensorEntry,
    delta_dtype,
    parse_manifest,
    parse_signature_doc,
    signature_payload,
)
from fedmerge.security.seal import TAG_BYTES, ChunkSealer, derive_key
from fedmerge.security.trust import TrustStore

log = logging.getLogger(__name__)


def _read_package_file(path: Path, limit: int, what: str) -> bytes:
    return read_capped(
        path, limit, what=what, error=PackageError, missing=TruncatedData, not_plain=NotAPlainFile, too_large=OversizedData,
        hint=f"; a package holds {MANIFEST_NAME}, {SIGNATURE_NAME} and its data files",
    )  # fmt: skip


def read_manifest(pkg_dir: str | os.PathLike[str]) -> DeltaManifest:
    """Parse a package's manifest WITHOUT checking its signature: for display only, never to decide."""
    return parse_manifest(_read_package_file(Path(pkg_dir) / MANIFEST_NAME, MAX_MANIFEST_BYTES, "the manifest"))


def read_signed_manifest(pkg: Path, trust: TrustStore) -> tuple[DeltaManifest, bytes]:
    """The manifest and the signer's enrolled Ed25519 key, checked signature first, parse second."""
    sig_path, man_path = pkg / SIGNATURE_NAME, pkg / MANIFEST_NAME
    signer, key_id, sig = parse_signature_doc(_read_package_file(sig_path, MAX_SIGNATURE_BYTES, "the signature"), str(sig_path))
    entry = trust.require(signer)
    if key_id != entry.public.key_id:
        raise SignatureInvalid(f"{sig_path}: signed by {signer!r} with key {key_id}, but the enrolled key is {entry.public.key_id} (rotated keys? update the trust store)", sender=signer, path=sig_path)
    raw = _read_package_file(man_path, MAX_MANIFEST_BYTES, "the manifest")
    if not entry.public.verify(sig, signature_payload("delta", raw)):
        raise SignatureInvalid(f"{man_path}: package signed by {signer!r}: the signature does not match the manifest and the enrolled key (edited, or signed with another key)", sender=signer, path=man_path)
    try:
        manifest = parse_manifest(raw)
    except ManifestInvalid as exc:
        raise ManifestInvalid(f"{man_path}: {exc}", sender=signer, path=man_path) from None
    if manifest.sender != signer:
        raise SignatureInvalid(f"package from {manifest.sender!r} ({pkg}): signed by {signer!r}, not by its sender", sender=manifest.sender, path=pkg)
    return manifest, entry.public.signing_key


def sealer_for(manifest: DeltaManifest, opener: Identity, sender_key: bytes) -> ChunkSealer:
    """The AEAD that opens a sealed package's chunks, keyed for its sender (id and signing key)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    s = manifest.sealed
    assert s is not None
    eph = unb64(s.ephemeral_key, 32, "sealed.ephemeral_key")
    try:
        shared = opener.exchange(X25519PublicKey.from_public_bytes(eph))
    except ValueError:
        raise ChunkAuthenticationFailed(f"package from {manifest.sender!r}: its ephemeral key is not usable", sender=manifest.sender) from None
    key = derive_key(shared, manifest.format, manifest.sender, sender_key, manifest.round, manifest.nonce, eph, opener.public.encryption_key)
    return ChunkSealer(key, manifest.format, manifest.sender, manifest.round, manifest.nonce)


@dataclass
class VerifiedPackage:
    """A package whose manifest, signature, sender and round were checked (and data, unless told)."""

    path: Path
    manifest: DeltaManifest
    sender: str
    data_checked: bool
    opener: Identity | None = None
    expected_dtype: str | None = None
    sender_key: bytes = b""

    @property
    def compression(self) -> str:
        """The package's compression spec (``none`` when its deltas travel exactly)."""
        return self.manifest.compression_spec

    @property
    def round(self) -> int:
        return self.manifest.round

    @property
    def sealed(self) -> bool:
        return self.manifest.sealed is not None

    @property
    def package_id(self) -> str:
        """SHA-256 of the signed manifest: names this contribution in the round record."""
        return "sha256:" + hashlib.sha256(self.manifest.to_bytes()).hexdigest()

    def unpack(self, out_dir: str | os.PathLike[str], max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, workers: int = DEFAULT_WORKERS) -> Path:
        """Write the deltas as a folder of safetensors, checking every byte again on the way.

        The files may have changed since ``verify_package`` ran, so nothing read here is trusted
        until its digest matches; the folder appears only when complete.
        """
        sealer = _sealer_or_refuse(self.path, self.manifest, self.opener, self.sender_key)
        writer = DeltaFolderWriter(Path(out_dir), self.manifest, max_shard_bytes, overwrite)
        try:
            DataCheck(self.path, self.manifest, sealer, writer, workers).run()
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
    require_sealed: bool = True,
    expected_tensors: Shapes | None = None,
    expected_dtype: str | None = None,
    expected_compression: str | None = None,
    check_data: bool = True,
    unpack_to: str | os.PathLike[str] | None = None,
    workers: int = DEFAULT_WORKERS,
) -> VerifiedPackage:
    """Check a package end to end (see the module docstring); return it verified or raise the reason.

    ``require_sealed`` (the default) refuses an unsealed package with ``UnsealedPackage``; pass
    False only where plaintext contributions are acceptable. ``expected_tensors`` (name -> shape,
    or a ``CheckpointReader``) makes a tensor or shape that differs from the reference model a
    ``TensorMismatch``. ``check_data=False`` stops after the manifest-level checks: the data is
    NOT checked (``data_checked`` is False) and such a package is not unpacked. The replay guard
    records the package only once all of it passed. ``expected_compression`` (a codec spec, or
    ``none``) makes a package compressed otherwise a ``CompressionMismatch``.
    """
    pkg = Path(pkg_dir)
    if not pkg.is_dir():
        raise PackageError(f"{pkg}: not a package directory", path=pkg)
    trust.require_verified()
    manifest, sender_key = read_signed_manifest(pkg, trust)
    sender = manifest.sender
    if require_sealed and manifest.sealed is None:
        raise UnsealedPackage(f"package from {sender!r} ({pkg}) is not sealed, and sealed contributions are required; the sender must seal it to the coordinator (seal: true, or --seal-to)", sender=sender, path=pkg)
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
    if expected_compression is not None:
        _check_compression(manifest, expected_compression)
    if expected_tensors is not None:
        _check_expected(manifest, expected_tensors)
    _check_files(pkg, manifest)
    if manifest.sealed is not None and opener is not None:
        if unb64(manifest.sealed.recipient_key, 32, "sealed.recipient_key") != opener.public.encryption_key:
            raise NotSealedForYou(f"package from {sender!r} is sealed to {manifest.sealed.recipient!r} (another key than {opener.name!r}'s); only that coordinator can open it", sender=sender, path=pkg)
    data_checked = False
    if check_data or unpack_to is not None:
        sealer = _sealer_or_refuse(pkg, manifest, opener, sender_key)
        writer = DeltaFolderWriter(Path(unpack_to), manifest) if unpack_to is not None else None
        try:
            DataCheck(pkg, manifest, sealer, writer, workers).run()
            if writer is not None:
                writer.commit()
        finally:
            if writer is not None:
                writer.abort()
        data_checked = True
    if replay_guard is not None and data_checked:
        replay_guard.record(sender, manifest.round, manifest.nonce)
    log.info("verified package %s from %s, round %d%s%s", pkg, sender, manifest.round, ", sealed" if manifest.sealed else "", "" if data_checked else " (data NOT checked)")
    return VerifiedPackage(pkg, manifest, sender, data_checked, opener, expected_dtype, sender_key)


def _sealer_or_refuse(pkg: Path, manifest: DeltaManifest, opener: Identity | None, sender_key: bytes) -> ChunkSealer | None:
    if manifest.sealed is None:
        return None
    if opener is None:
        raise OpenerRequired(f"package from {manifest.sender!r} ({pkg}) is sealed to {manifest.sealed.recipient!r}; give that coordinator's identity to check its data", sender=manifest.sender, path=pkg)
    return sealer_for(manifest, opener, sender_key)


def _check_compression(manifest: DeltaManifest, expected: str) -> None:
    try:
        want = canonical_spec(expected)
    except UnknownCompression as exc:
        raise PackageError(f"expected compression: {exc}") from None
    if manifest.compression_spec != want:
        raise CompressionMismatch(
            f"package from {manifest.sender!r} is compressed as {manifest.compression_spec}, the coordinator asked for {want}",
            sender=manifest.sender,
        )


def _check_expected(manifest: DeltaManifest, expected: Shapes) -> None:
    # Tensors of the reference that the package lacks are zero deltas (e.g. from a LoRA adapter).
    found = CompatibilityCheck(expected).compare({t.name: t.shape for t in manifest.tensors}, complete=False)
    sender = manifest.sender
    if found.extra:
        name = found.extra[0]
        raise TensorMismatch(f"package from {sender!r}: tensor {name!r} is not in the reference model (renamed?)", sender=sender, tensor=name)
    for name, theirs, ref in found.shapes:
        raise TensorMismatch(f"package from {sender!r}: tensor {name!r} has shape {list(theirs)}, the reference has {list(ref)}", sender=sender, tensor=name)


def _check_files(pkg: Path, manifest: DeltaManifest) -> None:
    """Exactly the listed data files, plain, with their exact sizes (nothing is opened here)."""
    sender = manifest.sender
    listed = dict(manifest.files)
    for p in pkg.iterdir():
        mode = os.lstat(p).st_mode
        if not stat.S_ISREG(mode):
            raise NotAPlainFile(f"package from {sender!r}: {p} is {file_kind(mode)}; a package holds only plain files", sender=sender, path=p)
        if p.name not in listed and p.name not in (MANIFEST_NAME, SIGNATURE_NAME):
            raise OversizedData(f"package from {sender!r}: unlisted file {p.name!r} in {pkg}", sender=sender, path=p)
    for name, size in manifest.files:
        p = pkg / name
        if not os.path.lexists(p):
            raise TruncatedData(f"package from {sender!r}: data file {p} is missing", sender=sender, path=p)
        actual = os.lstat(p).st_size
        if actual != size:
            first = next((t.name for t in manifest.tensors if t.file == name and t.offset + t.stored >= min(actual, size)), None)
            cls = TruncatedData if actual < size else OversizedData
            raise cls(f"package from {sender!r}: {p} has {actual} bytes, the manifest says {size}" + (f" (from tensor {first!r} on)" if first else ""), sender=sender, tensor=first, path=p)


class DataCheck:
    """Every chunk of a package read, opened (sealed), checked finite and hashed, optionally written.

    Stages in ``run_ordered``: ``_chunks`` (caller's thread) lists the chunks, ``_open`` (pool)
    reads, authenticates and checks one, ``_consume`` (consumer thread) writes it and hands it to
    the hash lanes, which compare each tensor's digest with the manifest. At most
    ``IN_FLIGHT_BYTES`` of chunks are held at once, whatever the chunk size.
    """

    def __init__(self, pkg: Path, manifest: DeltaManifest, sealer: ChunkSealer | None, writer: DeltaFolderWriter | None, workers: int, in_flight_bytes: int = IN_FLIGHT_BYTES):
        self.pkg = pkg
        self.manifest = manifest
        self.sealer = sealer
        self.writer = writer
        self.workers = workers
        self.tag = TAG_BYTES if sealer else 0
        self.budget = ByteBudget(in_flight_bytes)
        self._fds: dict[str, int] = {}
        self._lanes: HashLanes | None = None
        self._codecs = [manifest.codec_of(t) for t in manifest.tensors]

    def run(self) -> None:
        try:
            with HashLanes(self.workers) as self._lanes:  # raises the first DigestMismatch on leaving
                run_ordered(self._chunks(), self._open, self._consume, workers=self.workers, budget=self.budget, cost=self._cost)
        finally:
            for fd in self._fds.values():
                os.close(fd)

    def _fd(self, t: TensorEntry) -> int:
        fd = self._fds.get(t.file)
        if fd is None:
            path = self.pkg / t.file
            try:
                fd = self._fds[t.file] = open_regular(path, follow_symlinks=False)
            except CheckpointError as exc:  # replaced by a link or a FIFO since the folder was checked
                raise NotAPlainFile(f"package from {self.manifest.sender!r}: {exc}", sender=self.manifest.sender, path=path) from None
        return fd

    def _chunks(self) -> Iterator[tuple]:
        cb = self.manifest.chunk_bytes
        for ti, t in enumerate(self.manifest.tensors):
            fd = self._fd(t)
            pos = t.offset
            for ci in range(t.chunks):
                want = min(cb, t.nbytes - ci * cb) + self.tag
                yield (ti, t, ci, fd, pos, want)
                pos += want

    def _cost(self, item: tuple) -> int:
        return item[5] * (2 if self.sealer else 1)  # the bytes read, and (sealed) what opening them makes

    def _open(self, item: tuple):
        # Reading happens here too, so reads, AES-GCM and finiteness checks of several chunks
        # run in parallel; only hashing (per tensor, in order) is left to the consumer.
        ti, t, ci, fd, pos, want = item
        sender = self.manifest.sender
        buf = os.pread(fd, want, pos) if want else b""  # one copy, no zero-filled buffer first
        if len(buf) != want:
            raise TruncatedData(f"package from {sender!r}: tensor {t.name!r} is cut short in {self.pkg / t.file} (chunk {ci + 1}/{t.chunks})", sender=sender, tensor=t.name)
        plain = self.sealer.open(ti, t.name, ci, t.chunks, buf) if self.sealer else buf
        codec = self._codecs[ti]
        if codec is not None:
            if not codec.finite(plain, ci * self.manifest.chunk_bytes):
                raise NonFiniteValues(
                    f"package from {sender!r}: tensor {t.name!r} ({codec.spec}) stores NaN, infinite, or overflowing scales or values (chunk {ci + 1}/{t.chunks})",
                    sender=sender, tensor=t.name,
                )  # fmt: skip
        elif has_non_finite(plain, t.dtype):
            raise NonFiniteValues(f"package from {sender!r}: tensor {t.name!r} holds NaN or infinite values (chunk {ci + 1}/{t.chunks})", sender=sender, tensor=t.name)
        return plain

    def _consume(self, item: tuple, plain) -> None:
        ti, t, ci = item[:3]
        assert self._lanes is not None
        final = ci == t.chunks - 1
        if self.writer is not None:
            self.writer.write(t, plain, final)
        cost = self._cost(item)
        self._lanes.update(ti, plain, after=lambda: self.budget.release(cost))
        if final:
            self._lanes.finish(ti, self._compare(t))

    def _compare(self, t: TensorEntry):
        sender = self.manifest.sender

        def check(digest: str) -> None:
            if digest != t.sha256:
                raise DigestMismatch(f"package from {sender!r}: tensor {t.name!r} does not match its SHA-256 in the signed manifest (altered or damaged)", sender=sender, tensor=t.name)

        return check

