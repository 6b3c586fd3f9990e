"""Signed model publication: the coordinator vouches for every file of a model folder it pushes.

``sign_model`` hashes every file of the folder (weights, index, config, tokenizer, metadata),
records the round and the content fingerprint of the weights, and writes ``publication.json``
(canonical JSON) plus ``publication.sig.json`` (Ed25519 by an enrolled coordinator) into the
folder. ``verify_model`` refuses a folder with a missing, extra, resized or altered file, an
unknown, revoked or non-coordinator signer, or a bad signature: a client installs nothing that
fails it. Files are hashed in parallel, each streamed in blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fedmerge.security.errors import ManifestInvalid, ModelVerificationFailed, SecurityError
from fedmerge.security.keys import Identity
from fedmerge.security.manifest import HEX64, canonical_bytes, parse_signature_doc, signature_doc, signature_payload
from fedmerge.security.trust import TrustStore

MODEL_FORMAT = "fedmerge-model/1"
PUBLICATION_NAME = "publication.json"
PUBLICATION_SIG_NAME = "publication.sig.json"
_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ModelPublication:
    signer: str
    round: int | None
    fingerprint: str | None
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


def sign_model(model_dir: str | os.PathLike[str], identity: Identity, round_id: int | None = None, fingerprint: str | None = None, trust: TrustStore | None = None, workers: int = 4) -> Path:
    """Write the signed publication manifest into ``model_dir``; returns its path.

    ``fingerprint`` (the weights' ``model_fingerprint``, which clients use as the next round's
    reference) is computed when not given. With ``trust``, refuses unless ``identity`` is an
    enrolled coordinator there, so a mis-configured coordinator fails here, not at every client.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise SecurityError(f"{folder}: not a model folder", path=folder)
    if trust is not None:
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
    (folder / PUBLICATION_NAME).write_bytes(raw)
    (folder / PUBLICATION_SIG_NAME).write_bytes(signature_doc(identity.name, identity.public.key_id, identity.sign(signature_payload("model", raw))))
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
        if d["round"] is not None and type(d["round"]) is not int:
            raise ValueError("round must be an integer or null")
        if d["fingerprint"] is not None and not isinstance(d["fingerprint"], str):
            raise ValueError("fingerprint must be a string or null")
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
        raise ManifestInvalid(f"{where}: not a valid publication manifest ({str(exc)[:160]})") from None


def verify_model(model_dir: str | os.PathLike[str], trust: TrustStore, expected_round: int | None = None, expected_fingerprint: str | None = None, check_fingerprint: bool = False, workers: int = 4) -> ModelPublication:
    """Check a model folder against its signed publication; return it or raise the reason.

    ``check_fingerprint`` also recomputes the weights' fingerprint (a second full read); the file
    digests already pin every byte, so this only matters to cross-check the signer's claim.
    """
    folder = Path(model_dir)
    pub_path, sig_path = folder / PUBLICATION_NAME, folder / PUBLICATION_SIG_NAME
    for p in (pub_path, sig_path):
        if not p.is_file():
            raise ModelVerificationFailed(f"{folder}: no {p.name}; this folder was not published by a coordinator, refusing it", path=folder)
    raw = pub_path.read_bytes()
    if len(raw) > 16 * 1024 * 1024:
        raise ManifestInvalid(f"{pub_path}: too large", path=pub_path)
    doc = _parse_publication(raw, str(pub_path))
    signer, key_id, sig = parse_signature_doc(sig_path.read_bytes()[:8192], str(sig_path))
    if signer != doc["signer"]:
        from fedmerge.security.errors import SignatureInvalid

        raise SignatureInvalid(f"{folder}: publication names {doc['signer']!r} but is signed by {signer!r}", sender=signer, path=folder)
    entry = trust.require(signer, role="coordinator")
    if key_id != entry.public.key_id or not entry.public.verify(sig, signature_payload("model", raw)):
        from fedmerge.security.errors import SignatureInvalid

        raise SignatureInvalid(f"{folder}: the coordinator signature of {signer!r} does not match the publication (edited, or signed with another key)", sender=signer, path=folder)
    if expected_round is not None and doc["round"] != expected_round:
        raise ModelVerificationFailed(f"{folder}: published for round {doc['round']}, expected round {expected_round}", sender=signer, path=folder)
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
    if check_fingerprint and doc["fingerprint"] is not None:
        from fedmerge.checkpoints import CheckpointReader, model_fingerprint

        actual = model_fingerprint(CheckpointReader(folder))
        if actual != doc["fingerprint"]:
            raise ModelVerificationFailed(f"{folder}: weights fingerprint {actual} is not the published {doc['fingerprint']}", sender=signer, path=folder)
    return ModelPublication(signer, doc["round"], doc["fingerprint"], doc["created"], listed, folder)
