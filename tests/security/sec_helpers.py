"""Helpers shared by the security tests (a module, so test files can import it)."""

from __future__ import annotations

import json
from pathlib import Path

from fedmerge.security.manifest import MANIFEST_NAME, SIGNATURE_NAME, canonical_bytes, signature_doc, signature_payload


def load_manifest_dict(pkg: Path) -> dict:
    return json.loads((pkg / MANIFEST_NAME).read_bytes())


def resign(pkg: Path, doc: dict, identity) -> None:
    """Rewrite the manifest as its (enrolled) sender would: canonical and freshly signed.

    Stands for a buggy or malicious but enrolled sender, whose signature is valid: only the
    later checks (data, AEAD, shapes) can stop it.
    """
    sign_raw(pkg, canonical_bytes(doc), identity)


def sign_raw(pkg: Path, raw: bytes, identity) -> None:
    """Write ``raw`` as the manifest and sign exactly those bytes (canonical or not)."""
    (pkg / MANIFEST_NAME).write_bytes(raw)
    (pkg / SIGNATURE_NAME).write_bytes(signature_doc(identity.name, identity.public.key_id, identity.sign(signature_payload("delta", raw))))


