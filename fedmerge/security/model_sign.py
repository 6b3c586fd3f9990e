"""Signed model publication: the coordinator vouches for every file of a model folder it pushes.

``sign_model`` hashes every file of the folder (weights, index, config, tokenizer, metadata),
records the round and the content fingerprint of the weights, and writes ``publication.json``
(canonical JSON) plus ``publication.sig.json`` (Ed25519 by an enrolled coordinator) into the
folder. The round and the fingerprint are inside the signed document, so a publication cannot be
replayed as another round's, and a client records the fingerprint the coordinator vouched for.

``verify_model`` refuses a folder with a missing, extra, resized or altered file, an unknown,
revoked or non-coordinator signer, a bad signature, a signer other than the pinned coordinator
(``coordinator=``), and a round other than the expected one (``expected_round=``) or not newer
than the installed one (``newer_than=``); it returns the signed round and fingerprint. Files are
hashed in parallel, each streamed in blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fedmerge.checkpoints.atomic import write_bytes_atomic
from fedmerge.security.errors import (
    ManifestInvalid,
    ModelVerificationFailed,
    SecurityError,
    SignatureInvalid,
    StalePublication,
    WrongPublisher,
)
from fedmerge.security.files import read_capped
from fedmerge.security.keys import Identity, PublicIdentity
from fedmerge.security.manifest import HEX64, MAX_SIGNATURE_BYTES, canonical_bytes, parse_signature_doc, signature_doc, signature_payload
from fedmerge.security.trust import TrustStore

MODEL_FORMAT = "fedmerge-model/1"
PUBLICATION_NAME = "publication.json"
PUBLICATION_SIG_NAME = "publication.sig.json"
MAX_PUBLICATION_BYTES = 16 * 1024 * 1024
_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ModelPublication:
    """What the coordinator signed: its id, the round, the weights' fingerprint, every file."""

    signer: str
    round: int
    fingerprint: str
    created: str
    files: dict[str, tuple[int, str]]  # name -> (size, sha256)
    folder: Path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _model_files(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.iterdir()):
        if p.name in (PUBLICATION_NAME, PUBLICATION_SIG_NAME):
            continue
        if not p.is_file() or p.is_symlink():
            raise ModelVerificationFailed(f"{folder}: {p.name!r} is not a plain file; a published model folder holds only files", path=p)
        files.append(p)
    if not files:
        raise ModelVerificationFailed(f"{folder}: no files to publish", path=folder)
    return files


def _hash_all(paths: list[Path], workers: int) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(file_sha256, paths))


def sign_model(
    model_dir: str | os.PathLike[str],
    identity: Identity,
    *,
    round_id: int,
    fingerprint: str | None = None,
    trust: TrustStore | None = None,
    workers: int = 4,
) -> Path:
    """Write the signed publication of ``model_dir`` for round ``round_id``; returns its path.

    ``fingerprint`` (the weights' ``model_fingerprint``, which clients use as the next round's
    reference) is computed from the folder when not given. With ``trust``, refuses unless
    ``identity`` is an enrolled coordinator there, so a mis-configured coordinator fails here,
    not at every client.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise SecurityError(f"{folder}: not a model folder", path=folder)
    if type(round_id) is not int or round_id < 0:
        raise SecurityError(f"{folder}: a publication names its round; round {round_id!r} must be a non-negative integer", path=folder)
    if trust is not None:
        trust.require_verified()
        trust.require(identity.name, role="coordinator")
    if fingerprint is None:
        from fedmerge.checkpoints import CheckpointReader, model_fingerprint

        fingerprint = model_fingerprint(CheckpointReader(folder))
    paths = _model_files(folder)
    digests = _hash_all(paths, workers)
    doc = {
        "format": MODEL_FORMAT,
        "kind": "model",
        "signer": identity.name,
        "round": round_id,
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "files": [{"name": p.name, "size": p.stat().st_size, "sha256": d} for p, d in zip(paths, digests)],
    }
    raw = canonical_bytes(doc)
    _parse_publication(raw, str(folder / PUBLICATION_NAME))  # never publish what clients would refuse
    write_bytes_atomic(folder / PUBLICATION_NAME, raw)
    write_bytes_atomic(folder / PUBLICATION_SIG_NAME, signature_doc(identity.name, identity.public.key_id, identity.sign(signature_payload("model", raw))))
    return folder / PUBLICATION_NAME


def _parse_publication(raw: bytes, where: str) -> dict:
    try:
        d = json.loads(raw.decode("ascii"))
        if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT or d.get("kind") != "model":
            raise ValueError(f"format is not {MODEL_FORMAT!r}")
        if set(d) != {"format", "kind", "signer", "round", "fingerprint", "created", "files"}:
            raise ValueError("unexpected or missing fields")
        if not isinstance(d["signer"], str) or not isinstance(d["created"], str):
            raise ValueError("signer and created must be strings")
        if type(d["round"]) is not int or d["round"] < 0:
            raise ValueError(f"round must be a non-negative integer, got {d['round']!r}"[:120])
        if not isinstance(d["fingerprint"], str) or not d["fingerprint"] or len(d["fingerprint"]) > 200:
            raise ValueError("fingerprint must be a non-empty string")
        files = d["files"]
        if not isinstance(files, list) or not files:
            raise ValueError("files must be a non-empty list")
        seen = set()
        for f in files:
            if not isinstance(f, dict) or set(f) != {"name", "size", "sha256"}:
                raise ValueError("each file needs name, size, sha256")
            name = f["name"]
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or name in seen:
                raise ValueError(f"file name {name!r} is not allowed")
            if type(f["size"]) is not int or f["size"] < 0 or not isinstance(f["sha256"], str) or not HEX64.match(f["sha256"]):
                raise ValueError(f"file {name!r}: bad size or sha256")
            seen.add(name)
        if canonical_bytes(d) != raw:
            raise ValueError("not in canonical form")
        return d
    except (ValueError, UnicodeError, RecursionError, TypeError) as exc:
        raise ManifestInvalid(f"{where}: not a valid publication manifest ({str(exc)[:160]})", path=where) from None


def verify_model(
    model_dir: str | os.PathLike[str],
    trust: TrustStore,
    *,
    coordinator: PublicIdentity | None = None,
    expected_round: int | None = None,
    newer_than: int | None = None,
    expected_fingerprint: str | None = None,
    check_fingerprint: bool = False,
    workers: int = 4,
) -> ModelPublication:
    """Check a model folder against its signed publication; return it or raise the reason.

    ``coordinator``: the pinned coordinator key; a publication signed by any other (even an
    enrolled coordinator) is refused with ``WrongPublisher``. ``expected_round``: exactly that
    round; ``newer_than``: a round strictly greater (a client passes its installed round), else
    ``StalePublication``. The returned ``ModelPublication`` carries the round and fingerprint
    from the signed document. ``check_fingerprint`` also recomputes the weights' fingerprint (a
    second full read); the file digests already pin every byte, so this only matters to
    cross-check the signer's claim.
    """
    folder = Path(model_dir)
    trust.require_verified()
    pub_path, sig_path = folder / PUBLICATION_NAME, folder / PUBLICATION_SIG_NAME
    for p in (pub_path, sig_path):
        if not os.path.lexists(p):
            raise ModelVerificationFailed(f"{folder}: no {p.name}; this folder was not published by a coordinator, refusing it", path=folder)
    sig_raw = read_capped(sig_path, MAX_SIGNATURE_BYTES, what="the publication signature", error=ModelVerificationFailed)
    raw = read_capped(pub_path, MAX_PUBLICATION_BYTES, what="the publication manifest", error=ModelVerificationFailed, too_large=ManifestInvalid)
    signer, key_id, sig = parse_signature_doc(sig_raw, str(sig_path))
    entry = trust.require(signer, role="coordinator")
    if coordinator is not None and (signer != coordinator.name or entry.public.signing_key != coordinator.signing_key):
        raise WrongPublisher(f"{folder}: published by {signer!r} (key id {entry.public.key_id}), not by the pinned coordinator {coordinator.name!r} (key id {coordinator.key_id})", sender=signer, path=folder)
    if key_id != entry.public.key_id or not entry.public.verify(sig, signature_payload("model", raw)):
        raise SignatureInvalid(f"{folder}: the coordinator signature of {signer!r} does not match the publication (edited, or signed with another key)", sender=signer, path=folder)
    doc = _parse_publication(raw, str(pub_path))
    if signer != doc["signer"]:
        raise SignatureInvalid(f"{folder}: publication names {doc['signer']!r} but is signed by {signer!r}", sender=signer, path=folder)
    if expected_round is not None and doc["round"] != expected_round:
        raise StalePublication(f"{folder}: published for round {doc['round']}, expected round {expected_round}", sender=signer, path=folder)
    if newer_than is not None and doc["round"] <= newer_than:
        raise StalePublication(f"{folder}: published for round {doc['round']}, not newer than the installed round {newer_than}; an older model is never installed over a newer one", sender=signer, path=folder)
    if expected_fingerprint is not None and doc["fingerprint"] != expected_fingerprint:
        raise ModelVerificationFailed(f"{folder}: fingerprint {doc['fingerprint']} is not the expected {expected_fingerprint}", sender=signer, path=folder)
    listed = {f["name"]: (f["size"], f["sha256"]) for f in doc["files"]}
    present = _model_files(folder)
    names = {p.name for p in present}
    extra = sorted(names - set(listed))
    if extra:
        raise ModelVerificationFailed(f"{folder}: file {extra[0]!r} is not in the signed publication (added after signing?)", sender=signer, path=folder / extra[0])
    missing = sorted(set(listed) - names)
    if missing:
        raise ModelVerificationFailed(f"{folder}: file {missing[0]!r} of the signed publication is missing", sender=signer, path=folder / missing[0])
    for p in present:
        if p.stat().st_size != listed[p.name][0]:
            raise ModelVerificationFailed(f"{folder}: {p.name} has {p.stat().st_size} bytes, the publication says {listed[p.name][0]}", sender=signer, path=p)
    for p, d in zip(present, _hash_all(present, workers)):
        if d != listed[p.name][1]:
            raise ModelVerificationFailed(f"{folder}: {p.name} does not match its SHA-256 in the signed publication (altered or damaged)", sender=signer, path=p)
    if check_fingerprint:
        from fedmerge.checkpoints import CheckpointReader, model_fingerprint

        actual = model_fingerprint(CheckpointReader(folder))
        if actual != doc["fingerprint"]:
            raise ModelVerificationFailed(f"{folder}: weights fingerprint {actual} is not the published {doc['fingerprint']}", sender=signer, path=folder)
    return ModelPublication(signer, doc["round"], doc["fingerprint"], doc["created"], listed, folder)
