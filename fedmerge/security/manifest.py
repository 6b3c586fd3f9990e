"""The delta package manifest: one canonical, versioned JSON document, signed as bytes.

Canonical means one byte string per content (sorted keys, no spaces, ASCII, integers only), so
the signature covers exactly what the verifier parses and nothing can be smuggled in whitespace,
duplicate keys or number spellings. The parser is strict: it checks every field, every
offset and size against each other, and raises ``ManifestInvalid`` naming the field, so that
no later step ever reads data the manifest does not account for.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from fedmerge.checkpoints.codecs import Compression, TensorCodec, parse_compression
from fedmerge.checkpoints.dtypes import dtype_nbytes
from fedmerge.checkpoints.errors import UnknownCompression
from fedmerge.security.errors import ManifestInvalid, PackageError
from fedmerge.security.keys import NAME_RE
from fedmerge.security.seal import SCHEME, TAG_BYTES

FORMAT = "fedmerge-delta/1"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature.json"
SIGNATURE_FORMAT = "fedmerge-signature/1"
# A 70B model has about a thousand tensors, a few hundred bytes of manifest each: 16 MiB is far
# more than any real package needs, and bounds what is read before the signature is checked.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_SIGNATURE_BYTES = 4096
MAX_TENSORS = 100_000
MAX_DIMS = 8
MIN_CHUNK_BYTES = 256
# A chunk is read, opened and checked whole, a few at a time: its size bounds the verifier's memory.
MAX_CHUNK_BYTES = 64 * 1024 * 1024
# Bytes of chunks in flight at once while packing or verifying (read, sealed/opened, not yet
# hashed): with the largest chunks, four; with the default 4 MiB chunks, never the limit.
IN_FLIGHT_BYTES = 4 * MAX_CHUNK_BYTES
# The dtypes a delta may travel in (safetensors codes; sizes come from fedmerge.checkpoints.dtypes).
DELTA_DTYPES = ("F32", "BF16", "F16")
MAX_SEED = 1 << 53
DATA_FILE_RE = re.compile(r"^data-\d{5}\.bin$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
B64_32 = re.compile(r"^[A-Za-z0-9+/]{43}=$")


def delta_dtype(name: str) -> str:
    """A delta dtype spelling (``float32``, ``bf16``, ``F16``...) as the manifest writes it."""
    from fedmerge.checkpoints.dtypes import safetensors_dtype
    from fedmerge.checkpoints.errors import CheckpointError

    try:
        code = safetensors_dtype(name)
    except CheckpointError:
        code = None
    if code not in DELTA_DTYPES:
        raise PackageError(f"delta dtype {name!r} is not supported; use float32 (default), bfloat16 or float16")
    return code


def canonical_bytes(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    sha256: str
    file: str
    offset: int
    nbytes: int  # plaintext bytes as sent: the encoded bytes when the package is compressed
    stored: int  # bytes in the data file (plaintext + one tag per chunk when sealed)
    chunks: int

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "sha256": self.sha256,
            "file": self.file,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "stored": self.stored,
            "chunks": self.chunks,
        }


@dataclass(frozen=True)
class SealInfo:
    recipient: str
    recipient_key: str  # base64 X25519 public key of the coordinator it is sealed to
    ephemeral_key: str  # base64 X25519 ephemeral public key of the sender
    scheme: str = SCHEME

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "recipient": self.recipient, "recipient_key": self.recipient_key, "ephemeral_key": self.ephemeral_key}


@dataclass(frozen=True)
class CompressionInfo:
    """How the package's matrices are encoded: the canonical spec and the seed every random choice
    derives from (per tensor and stage; see ``fedmerge.checkpoints.codecs``). Signed with the
    manifest, so the mask a decoder regenerates is the one the sender used."""

    spec: str
    seed: int

    @property
    def compression(self) -> Compression:
        return parse_compression(self.spec)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "seed": self.seed}


@dataclass(frozen=True)
class DeltaManifest:
    sender: str
    round: int
    reference: str
    nonce: str
    created: str
    chunk_bytes: int
    tensors: tuple[TensorEntry, ...]
    files: tuple[tuple[str, int], ...]  # (data file name, size in bytes)
    sealed: SealInfo | None = None
    label: str = ""
    format: str = FORMAT
    compression: CompressionInfo | None = None
    _by_name: dict = field(default_factory=dict, compare=False, repr=False)

    def tensor(self, name: str) -> TensorEntry:
        if not self._by_name:
            self._by_name.update({t.name: t for t in self.tensors})
        return self._by_name[name]

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def compression_spec(self) -> str:
        return self.compression.spec if self.compression else "none"

    def codec_of(self, t: TensorEntry) -> TensorCodec | None:
        """The tensor's decoder when it travels encoded; None when its bytes are its values."""
        c = self.compression
        if c is None or not c.compression.applies_to(t.shape):
            return None
        return c.compression.for_tensor(t.name, t.shape, c.seed, t.dtype)

    def to_dict(self) -> dict:
        doc = {
            "format": self.format,
            "kind": "delta",
            "sender": self.sender,
            "round": self.round,
            "reference": self.reference,
            "nonce": self.nonce,
            "created": self.created,
            "chunk_bytes": self.chunk_bytes,
            "label": self.label,
            "sealed": self.sealed.to_dict() if self.sealed else None,
            "files": [{"name": n, "size": s} for n, s in self.files],
            "tensors": [t.to_dict() for t in self.tensors],
        }
        if self.compression is not None:  # absent when exact: such manifests read as before
            doc["compression"] = self.compression.to_dict()
        return doc

    def to_bytes(self) -> bytes:
        return canonical_bytes(self.to_dict())


def chunk_count(nbytes: int, chunk_bytes: int) -> int:
    """Chunks of a tensor: at least one, so even an empty tensor carries an authenticated chunk."""
    return max(1, -(-nbytes // chunk_bytes))


# -- parsing ------------------------------------------------------------------------------------
def _bad(msg: str) -> ManifestInvalid:
    return ManifestInvalid(f"manifest: {msg}")


def _no_dupes(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _bad(f"key {k!r} appears twice")
        out[k] = v
    return out


def _reject_constant(name: str):
    raise _bad(f"{name} is not a number JSON allows")


def _float_refused(text: str):
    raise _bad(f"non-integer number {text[:20]!r}; every number in a manifest is an integer")


def _int(d: dict, key: str, where: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(f"{where}{key} must be an integer in [{lo}, {hi}], got {v!r}"[:300])
    return v


def _str(d: dict, key: str, where: str, pattern: re.Pattern | None = None, maxlen: int = 256) -> str:
    v = d.get(key)
    if not isinstance(v, str) or len(v) > maxlen or (pattern is not None and not pattern.match(v)):
        raise _bad(f"{where}{key} is missing or not allowed: {v!r}"[:300])
    return v


def _keys(d: object, allowed: set[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise _bad(f"{where or 'top level'} must be a JSON object")
    extra = sorted(set(d) - allowed)
    if extra:
        raise _bad(f"{where}unknown field {extra[0]!r}")
    return d


def parse_manifest(raw: bytes, require_canonical: bool = True) -> DeltaManifest:
    """Parse and fully check manifest bytes; raises only ``ManifestInvalid``."""
    if not isinstance(raw, (bytes, bytearray)):
        raise _bad("expected bytes")
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _bad(f"{len(raw)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    try:
        text = bytes(raw).decode("ascii")
        data = json.loads(text, object_pairs_hook=_no_dupes, parse_constant=_reject_constant, parse_float=_float_refused)
    except ManifestInvalid:
        raise
    except (ValueError, RecursionError) as exc:
        raise _bad(f"not valid ASCII JSON ({str(exc)[:120]})") from None
    top = {"format", "kind", "sender", "round", "reference", "nonce", "created", "chunk_bytes", "label", "sealed", "files", "tensors", "compression"}
    d = _keys(data, top, "")
    if d.get("format") != FORMAT:
        raise _bad(f"format is {d.get('format')!r}"[:200] + f"; this fedmerge reads {FORMAT!r}")
    if d.get("kind") != "delta":
        raise _bad(f"kind is {d.get('kind')!r}, expected 'delta'"[:200])
    sender = _str(d, "sender", "", NAME_RE, 64)
    round_id = _int(d, "round", "", 0, 1 << 53)
    reference = _str(d, "reference", "", maxlen=200)
    nonce = _str(d, "nonce", "", NONCE_RE)
    created = _str(d, "created", "", maxlen=64)
    chunk_bytes = _int(d, "chunk_bytes", "", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
    if chunk_bytes % 8:
        raise _bad(f"chunk_bytes {chunk_bytes} must be a multiple of 8")
    label = _str(d, "label", "", maxlen=1024)

    sealed = None
    if d.get("sealed") is not None:
        s = _keys(d["sealed"], {"scheme", "recipient", "recipient_key", "ephemeral_key"}, "sealed.")
        if s.get("scheme") != SCHEME:
            raise _bad(f"sealed.scheme is {s.get('scheme')!r}"[:200] + f", expected {SCHEME!r}")
        sealed = SealInfo(_str(s, "recipient", "sealed.", NAME_RE, 64), _str(s, "recipient_key", "sealed.", B64_32), _str(s, "ephemeral_key", "sealed.", B64_32))
    elif "sealed" not in d:
        raise _bad("field 'sealed' is missing (null when not sealed)")

    compression = _parse_compression(d["compression"]) if "compression" in d else None
    comp = compression.compression if compression else None

    files_raw = d.get("files")
    if not isinstance(files_raw, list) or not files_raw or len(files_raw) > 100_000:
        raise _bad("files must be a non-empty list")
    files: list[tuple[str, int]] = []
    for i, f in enumerate(files_raw):
        f = _keys(f, {"name", "size"}, f"files[{i}].")
        files.append((_str(f, "name", f"files[{i}].", DATA_FILE_RE), _int(f, "size", f"files[{i}].")))
    file_names = [n for n, _ in files]
    if file_names != sorted(set(file_names)):
        raise _bad("files must be sorted and unique")

    tensors_raw = d.get("tensors")
    if not isinstance(tensors_raw, list) or not tensors_raw or len(tensors_raw) > MAX_TENSORS:
        raise _bad("tensors must be a non-empty list")
    tag = TAG_BYTES if sealed else 0
    tensors: list[TensorEntry] = []
    seen: set[str] = set()
    cursor = {n: 0 for n in file_names}
    tkeys = {"name", "shape", "dtype", "sha256", "file", "offset", "nbytes", "stored", "chunks"}
    for i, t in enumerate(tensors_raw):
        t = _keys(t, tkeys, f"tensors[{i}].")
        name = t.get("name")
        if not isinstance(name, str) or not name or len(name) > 1024 or any(ord(c) < 32 for c in name):
            raise _bad(f"tensors[{i}].name is missing or not allowed")
        where = f"tensor {name!r}: "
        if name in seen:
            raise _bad(f"{where}listed twice")
        seen.add(name)
        shape = t.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or any(type(x) is not int or not 0 <= x <= 1 << 40 for x in shape):
            raise _bad(f"{where}shape must be a list of at most {MAX_DIMS} non-negative integers")
        dtype = t.get("dtype")
        if not isinstance(dtype, str) or dtype not in DELTA_DTYPES:
            raise _bad(f"{where}dtype {dtype!r} is not one of {', '.join(DELTA_DTYPES)}"[:300])
        nbytes = _int(t, "nbytes", where)
        expected = comp.nbytes(tuple(shape), dtype) if comp is not None else math.prod(shape) * dtype_nbytes(dtype)
        if nbytes != expected:
            how = f" encoded as {comp.spec}" if comp is not None and comp.applies_to(tuple(shape)) else ""
            raise _bad(f"{where}nbytes {nbytes} does not match shape {shape} in {dtype}{how} ({expected})")
        chunks = _int(t, "chunks", where, 1, 1 << 40)
        if chunks != chunk_count(nbytes, chunk_bytes):
            raise _bad(f"{where}chunks {chunks} does not match {nbytes} bytes in chunks of {chunk_bytes}")
        stored = _int(t, "stored", where)
        if stored != nbytes + tag * chunks:
            raise _bad(f"{where}stored {stored} does not match {nbytes} bytes {'sealed ' if sealed else ''}in {chunks} chunks")
        fname = _str(t, "file", where, DATA_FILE_RE)
        if fname not in cursor:
            raise _bad(f"{where}file {fname!r} is not listed in files")
        offset = _int(t, "offset", where)
        if offset != cursor[fname]:
            raise _bad(f"{where}offset {offset} in {fname} leaves a gap or overlaps (expected {cursor[fname]})")
        cursor[fname] += stored
        sha = _str(t, "sha256", where, HEX64)
        tensors.append(TensorEntry(name, tuple(shape), dtype, sha, fname, offset, nbytes, stored, chunks))
    for fname, size in files:
        if cursor[fname] != size:
            raise _bad(f"files: {fname} size {size} does not match the {cursor[fname]} bytes of its tensors")
    m = DeltaManifest(sender, round_id, reference, nonce, created, chunk_bytes, tuple(tensors), tuple(files), sealed, label, compression=compression)
    if require_canonical and m.to_bytes() != bytes(raw):
        raise _bad("not in canonical form (sorted keys, no spaces); it was edited or written by another tool")
    return m


def _parse_compression(raw: object) -> CompressionInfo:
    c = _keys(raw, {"spec", "seed"}, "compression.")
    spec = _str(c, "spec", "compression.", maxlen=200)
    seed = _int(c, "seed", "compression.", 0, MAX_SEED)
    try:
        parsed = parse_compression(spec)
    except UnknownCompression as exc:
        raise _bad(f"compression.spec: {exc}"[:400]) from None
    if parsed.is_none or parsed.spec != spec:
        raise _bad(f"compression.spec {spec!r} is not a canonical compressed spec (write {parsed.spec!r}, or leave compression out)")
    return CompressionInfo(spec, seed)


def signature_payload(kind: str, manifest_bytes: bytes) -> bytes:
    """What is signed: a domain tag (so a model signature is never valid for a package) + bytes."""
    return f"{SIGNATURE_FORMAT}\n{kind}\n".encode("ascii") + manifest_bytes


def signature_doc(signer: str, key_id: str, signature: bytes) -> bytes:
    from fedmerge.security.keys import b64

    return canonical_bytes({"format": SIGNATURE_FORMAT, "signer": signer, "key_id": key_id, "ed25519": b64(signature)})


def parse_signature_doc(raw: bytes, where: str) -> tuple[str, str, bytes]:
    """(signer, key id, 64 signature bytes) from a signature file; ``SignatureInvalid`` when
    malformed. Canonical bytes only, like the manifest: a package has one spelling."""
    import base64

    from fedmerge.security.errors import SignatureInvalid

    try:
        d = json.loads(raw.decode("ascii"))
        if not isinstance(d, dict) or d.get("format") != SIGNATURE_FORMAT:
            raise ValueError(f"format is not {SIGNATURE_FORMAT!r}")
        if set(d) != {"format", "signer", "key_id", "ed25519"}:
            raise ValueError("expected exactly format, signer, key_id, ed25519")
        signer, key_id, sig_text = d["signer"], d["key_id"], d["ed25519"]
        if not isinstance(signer, str) or not isinstance(sig_text, str) or not isinstance(key_id, str):
            raise ValueError("signer, key_id and ed25519 must be strings")
        if canonical_bytes(d) != raw:
            raise ValueError("not in canonical form")
        sig = base64.b64decode(sig_text.encode("ascii"), validate=True)
        if len(sig) != 64:
            raise ValueError("an Ed25519 signature has 64 bytes")
    except (ValueError, KeyError, UnicodeError, RecursionError) as exc:
        raise SignatureInvalid(f"{where}: not a valid signature file ({str(exc)[:120]})") from None
    return signer, key_id, sig
