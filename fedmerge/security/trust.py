"""The trust store: the consortium's list of who may contribute and who coordinates.

One versioned file (JSON, or YAML when the name ends in ``.yaml``/``.yml``) mapping an
institution id to its public keys, its role and its status. Revocation keeps the entry (with its
time and reason) instead of deleting it, so a revoked key can never be mistaken for an unknown
one and re-added by accident.

The store can be signed by a coordinator (``sign``); ``verify_signed_by`` checks it against a
coordinator key pinned out of band. Without a pinned key a signature proves nothing, so whoever
distributes the file must still do so over a channel the institutions trust.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from fedmerge.checkpoints.atomic import write_text_atomic
from fedmerge.security.errors import KeyFileError, RevokedSender, RoleNotAllowed, TrustStoreError, UnknownSender
from fedmerge.security.keys import Identity, PublicIdentity, b64, check_name, unb64

TRUST_FORMAT = "fedmerge-trust/1"
ROLES = ("institution", "coordinator")
STATUSES = ("enrolled", "revoked")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical_json(obj: object) -> bytes:
    """One byte string per value: sorted keys, no spaces, ASCII only, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


@dataclass(frozen=True)
class TrustEntry:
    name: str
    role: str
    public: PublicIdentity
    status: str = "enrolled"
    enrolled_at: str = ""
    revoked_at: str | None = None
    reason: str | None = None

    @property
    def enrolled(self) -> bool:
        return self.status == "enrolled"

    def to_dict(self) -> dict:
        d = {
            "role": self.role,
            "signing_key": b64(self.public.signing_key),
            "encryption_key": b64(self.public.encryption_key),
            "status": self.status,
            "enrolled_at": self.enrolled_at,
        }
        if self.revoked_at is not None:
            d["revoked_at"] = self.revoked_at
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_dict(cls, name: str, d: object, where: str) -> "TrustEntry":
        if not isinstance(d, dict):
            raise TrustStoreError(f"{where}: member {name!r} must be a mapping")
        try:
            check_name(name, f"{where}: member id")
            pub = PublicIdentity(name, unb64(d.get("signing_key"), 32, f"{where}: {name}.signing_key"), unb64(d.get("encryption_key"), 32, f"{where}: {name}.encryption_key"))
        except KeyFileError as exc:
            raise TrustStoreError(str(exc)) from None
        role, status = d.get("role"), d.get("status", "enrolled")
        if role not in ROLES:
            raise TrustStoreError(f"{where}: {name}.role is {role!r}; expected one of {', '.join(ROLES)}")
        if status not in STATUSES:
            raise TrustStoreError(f"{where}: {name}.status is {status!r}; expected one of {', '.join(STATUSES)}")
        for field in ("enrolled_at", "revoked_at", "reason"):
            if d.get(field) is not None and not isinstance(d.get(field), str):
                raise TrustStoreError(f"{where}: {name}.{field} must be a string")
        return cls(name, role, pub, status, d.get("enrolled_at") or "", d.get("revoked_at"), d.get("reason"))


class TrustStore:
    """Institution id -> public keys, role, status. Load, change, save atomically."""

    def __init__(self, members: dict[str, TrustEntry] | None = None, path: str | os.PathLike[str] | None = None, consortium: str | None = None):
        self._members: dict[str, TrustEntry] = dict(members or {})
        self.path = Path(path) if path is not None else None
        self.consortium = consortium
        self.signature: dict | None = None

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str], create: bool = False) -> "TrustStore":
        """Read a store; with ``create`` a missing file gives an empty store that ``save`` creates."""
        p = Path(path)
        if not p.exists():
            if create:
                return cls(path=p)
            raise TrustStoreError(f"{p}: no such trust store; create one with `fedmerge trust add {p} PUBLIC.json`", path=p)
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise TrustStoreError(f"{p}: cannot read the trust store ({exc})", path=p) from None
        return cls.from_text(text, p)

    @classmethod
    def from_text(cls, text: str, path: Path | None = None) -> "TrustStore":
        where = str(path) if path else "trust store"
        try:
            if path is not None and path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # json and yaml raise different types for the same mistake
            raise TrustStoreError(f"{where}: not valid {'YAML' if path and path.suffix in ('.yaml', '.yml') else 'JSON'} ({exc})") from None
        if not isinstance(data, dict):
            raise TrustStoreError(f"{where}: expected a mapping with 'format' and 'members'")
        if data.get("format") != TRUST_FORMAT:
            raise TrustStoreError(f"{where}: format is {data.get('format')!r}; this fedmerge reads {TRUST_FORMAT!r}")
        members = data.get("members") or {}
        if not isinstance(members, dict):
            raise TrustStoreError(f"{where}: 'members' must be a mapping of id -> entry")
        store = cls({str(k): TrustEntry.from_dict(str(k), v, where) for k, v in members.items()}, path, data.get("consortium"))
        sig = data.get("signature")
        if sig is not None and not isinstance(sig, dict):
            raise TrustStoreError(f"{where}: 'signature' must be a mapping")
        store.signature = sig
        return store

    def to_dict(self, with_signature: bool = True) -> dict:
        d: dict = {"format": TRUST_FORMAT, "members": {n: e.to_dict() for n, e in sorted(self._members.items())}}
        if self.consortium:
            d["consortium"] = self.consortium
        if with_signature and self.signature is not None:
            d["signature"] = self.signature
        return d

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        p = Path(path) if path is not None else self.path
        if p is None:
            raise TrustStoreError("no path to save the trust store to")
        data = self.to_dict()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(data, sort_keys=True)
        else:
            text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        write_text_atomic(p, text)
        self.path = p
        return p

    # -- changes -----------------------------------------------------------------------------
    def add(self, public: PublicIdentity, role: str = "institution", name: str | None = None, replace: bool = False) -> TrustEntry:
        """Enrol a public identity (under its own name unless ``name`` is given)."""
        name = check_name(name or public.name, "member id")
        if role not in ROLES:
            raise TrustStoreError(f"role {role!r} is not one of {', '.join(ROLES)}")
        old = self._members.get(name)
        if old is not None and not replace:
            if old.status == "revoked":
                raise TrustStoreError(f"{name!r} was revoked at {old.revoked_at}; a revoked id is never re-enrolled, enrol a new id")
            if old.public.signing_key == public.signing_key and old.public.encryption_key == public.encryption_key and old.role == role:
                return old
            raise TrustStoreError(f"{name!r} is already enrolled with other keys or role; pass replace to rotate its keys")
        entry = TrustEntry(name, role, PublicIdentity(name, public.signing_key, public.encryption_key), "enrolled", utc_now())
        self._members[name] = entry
        self.signature = None  # any change invalidates an earlier signature
        return entry

    def revoke(self, name: str, reason: str | None = None, at: str | None = None) -> TrustEntry:
        old = self._members.get(name)
        if old is None:
            raise UnknownSender(f"{name!r} is not in the trust store{f' {self.path}' if self.path else ''}; nothing to revoke", sender=name)
        if old.status == "revoked":
            return old
        entry = TrustEntry(name, old.role, old.public, "revoked", old.enrolled_at, at or utc_now(), reason)
        self._members[name] = entry
        self.signature = None
        return entry

    # -- queries -----------------------------------------------------------------------------
    def get(self, name: str) -> TrustEntry | None:
        """The entry for ``name`` (enrolled or revoked), or None when unknown."""
        return self._members.get(name)

    def require(self, name: str, role: str | None = None) -> TrustEntry:
        """The entry for an enrolled member, or the typed refusal (unknown / revoked / wrong role)."""
        where = f" {self.path}" if self.path else ""
        entry = self._members.get(name)
        if entry is None:
            raise UnknownSender(f"sender {name!r} is not in the trust store{where}; enrol it with `fedmerge trust add`", sender=name)
        if entry.status != "enrolled":
            raise RevokedSender(f"sender {name!r} was revoked at {entry.revoked_at}{f' ({entry.reason})' if entry.reason else ''}; its packages and signatures are refused", sender=name)
        if role is not None and entry.role != role:
            raise RoleNotAllowed(f"{name!r} is enrolled as {entry.role}, but this needs a {role}", sender=name)
        return entry

    def entries(self) -> list[TrustEntry]:
        return [self._members[n] for n in sorted(self._members)]

    def coordinators(self) -> list[TrustEntry]:
        return [e for e in self.entries() if e.role == "coordinator" and e.enrolled]

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self) -> Iterator[TrustEntry]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self._members)

    # -- optional signature by a coordinator ---------------------------------------------------
    def sign(self, identity: Identity) -> None:
        """Sign the members with an enrolled coordinator's key (stored in the file)."""
        self.require(identity.name, role="coordinator")
        body = canonical_json(self.to_dict(with_signature=False))
        self.signature = {"signer": identity.name, "ed25519": b64(identity.sign(body))}

    def verify_signed_by(self, pinned: PublicIdentity) -> None:
        """Refuse unless the store carries a valid signature by the pinned coordinator key."""
        from fedmerge.security.errors import SignatureInvalid

        where = str(self.path) if self.path else "trust store"
        sig = self.signature
        if not sig or sig.get("signer") != pinned.name:
            raise SignatureInvalid(f"{where}: not signed by {pinned.name!r}; get the store from the consortium again", sender=pinned.name)
        try:
            raw = unb64(sig.get("ed25519"), 64, f"{where}: signature")
        except KeyFileError as exc:
            raise SignatureInvalid(str(exc), sender=pinned.name) from None
        if not pinned.verify(raw, canonical_json(self.to_dict(with_signature=False))):
            raise SignatureInvalid(f"{where}: the signature by {pinned.name!r} does not match its members (edited after signing?)", sender=pinned.name)
