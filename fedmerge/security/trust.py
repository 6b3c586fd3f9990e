"""The trust store: the consortium's list of who may contribute and who coordinates.

One versioned file (JSON, or YAML when the name ends in ``.yaml``/``.yml``) mapping an
institution id to its public keys, its role and its status. Revocation keeps the entry (with its
time and reason) instead of deleting it, and rotating an id's keys keeps the old ones, so a
revoked or rotated-out key can never be enrolled again, under any id.

A store is anchored by a coordinator's signature, checked against that coordinator's public key
pinned out of band (the client's ``coordinator_public_file``, the coordinator's own key, the
CLI's ``--coordinator-pub``). ``TrustStore.load`` is the only way a file becomes a store that
packages and publications are verified against:

- a signature that does not verify against the pinned key is always refused;
- a signed store with no pinned key is refused (nothing to check it with);
- an unsigned store is refused unless ``allow_unsigned`` is passed (``--allow-unsigned-trust``,
  ``allow_unsigned_trust: true``), for local experiments.

``TrustStore.open_for_editing`` reads a file without any of these checks, for the commands that
change it (``trust add|revoke|sign``) and for ``trust list``, which reports what it finds; a store
opened that way is refused by every verification (``require_verified``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from fedmerge.checkpoints.atomic import write_text_atomic
from fedmerge.security.errors import (
    DuplicateMember,
    KeyFileError,
    KeyReuse,
    RevokedSender,
    RoleNotAllowed,
    TrustStoreError,
    TrustStoreSignatureInvalid,
    TrustStoreUnverified,
    UnknownSender,
)
from fedmerge.security.files import read_capped
from fedmerge.security.keys import Identity, PublicIdentity, b64, check_name, unb64

log = logging.getLogger(__name__)

TRUST_FORMAT = "fedmerge-trust/1"
ROLES = ("institution", "coordinator")
STATUSES = ("enrolled", "revoked")
MAX_TRUST_BYTES = 16 * 1024 * 1024
PIN_HINT = "pin the coordinator's public identity: `--coordinator-pub COORDINATOR.pub.json` on the command line, `coordinator_public_file` in a client config"
UNSIGNED_HINT = "sign it with `fedmerge trust sign STORE --key COORDINATOR.key`, or, for a local experiment only, pass --allow-unsigned-trust (allow_unsigned_trust: true in a config)"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical_json(obj: object) -> bytes:
    """One byte string per value: sorted keys, no spaces, ASCII only, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


# -- parsing: a key listed twice is refused, never "the last one wins" --------------------------
class _DuplicateKey(ValueError):
    def __init__(self, key: object):
        super().__init__(f"{key!r} appears twice in one mapping")
        self.key = key


def _no_duplicates(pairs: list[tuple[Any, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _yaml_loader():
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """PyYAML's safe loader, except that a mapping naming one key twice is an error."""

    def construct_mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        pairs = [(loader.construct_object(k, deep=deep), loader.construct_object(v, deep=deep)) for k, v in node.value]
        return _no_duplicates(pairs)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictLoader


def _is_yaml(path: Path | None) -> bool:
    return path is not None and path.suffix in (".yaml", ".yml")


def _parse_document(text: str, path: Path | None) -> Any:
    where = str(path) if path else "trust store"
    try:
        if _is_yaml(path):
            import yaml

            return yaml.load(text, Loader=_yaml_loader())  # noqa: S506  (a SafeLoader subclass)
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise DuplicateMember(
            f"{where}: {exc.key!r} appears twice in one mapping (a member listed twice?); each member id and field may appear once",
            sender=str(exc.key),
            path=path,
        ) from None
    except Exception as exc:  # json and yaml raise different types for the same mistake
        raise TrustStoreError(f"{where}: not valid {'YAML' if _is_yaml(path) else 'JSON'} ({str(exc)[:200]})", path=path) from None


# -- entries --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetiredKey:
    """A key an id used before ``replace`` rotated it out; never enrolled again."""

    kind: str  # signing | encryption
    key: bytes
    replaced_at: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "key": b64(self.key), "replaced_at": self.replaced_at}


@dataclass(frozen=True)
class TrustEntry:
    name: str
    role: str
    public: PublicIdentity
    status: str = "enrolled"
    enrolled_at: str = ""
    revoked_at: str | None = None
    reason: str | None = None
    previous_keys: tuple[RetiredKey, ...] = ()

    @property
    def enrolled(self) -> bool:
        return self.status == "enrolled"

    def retired(self) -> set[bytes]:
        """Keys this entry held before a rotation."""
        return {k.key for k in self.previous_keys}

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
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
        if self.previous_keys:
            d["previous_keys"] = [k.to_dict() for k in self.previous_keys]
        return d

    @classmethod
    def from_dict(cls, name: str, d: object, where: str) -> "TrustEntry":
        if not isinstance(d, dict):
            raise TrustStoreError(f"{where}: member {name!r} must be a mapping", sender=name)
        try:
            check_name(name, f"{where}: member id")
            pub = PublicIdentity(name, unb64(d.get("signing_key"), 32, f"{where}: {name}.signing_key"), unb64(d.get("encryption_key"), 32, f"{where}: {name}.encryption_key"))
            previous = d.get("previous_keys") or []
            if not isinstance(previous, list):
                raise KeyFileError(f"{where}: {name}.previous_keys must be a list")
            retired = []
            for i, k in enumerate(previous):
                at = f"{where}: {name}.previous_keys[{i}]"
                if not isinstance(k, dict) or k.get("kind") not in ("signing", "encryption") or not isinstance(k.get("replaced_at", ""), str):
                    raise KeyFileError(f"{at} must be a mapping with kind (signing or encryption), key and replaced_at")
                retired.append(RetiredKey(k["kind"], unb64(k.get("key"), 32, f"{at}.key"), k.get("replaced_at", "")))
        except KeyFileError as exc:
            raise TrustStoreError(str(exc), sender=name) from None
        role, status = d.get("role"), d.get("status", "enrolled")
        if role not in ROLES:
            raise TrustStoreError(f"{where}: {name}.role is {role!r}; expected one of {', '.join(ROLES)}", sender=name)
        if status not in STATUSES:
            raise TrustStoreError(f"{where}: {name}.status is {status!r}; expected one of {', '.join(STATUSES)}", sender=name)
        for field in ("enrolled_at", "revoked_at", "reason"):
            if d.get(field) is not None and not isinstance(d.get(field), str):
                raise TrustStoreError(f"{where}: {name}.{field} must be a string", sender=name)
        return cls(name, role, pub, status, d.get("enrolled_at") or "", d.get("revoked_at"), d.get("reason"), tuple(retired))


@dataclass(frozen=True)
class TrustStatus:
    """How far a store was checked: what ``trust list`` prints and logs record."""

    state: str  # verified | unsigned | in-memory | editing | unpinned | invalid
    detail: str
    signer: str | None = None
    pinned_key_id: str | None = None

    @property
    def usable(self) -> bool:
        """Whether packages and publications may be verified against the store."""
        return self.state in ("verified", "unsigned", "in-memory")


_IN_MEMORY = TrustStatus("in-memory", "built in memory by the calling program")
_EDITING = TrustStatus("editing", "opened for editing; its signature was not checked")


class TrustStore:
    """Institution id -> public keys, role, status. Load (verified), change, save atomically.

    A store built in memory (``TrustStore(members)``) is trusted as the program that built it;
    a store read from a file is trusted only through ``load``.
    """

    def __init__(self, members: dict[str, TrustEntry] | None = None, path: str | os.PathLike[str] | None = None, consortium: str | None = None):
        self._members: dict[str, TrustEntry] = {}
        self.path = Path(path) if path is not None else None
        self.consortium = consortium
        self.signature: dict | None = None
        self.status: TrustStatus = _IN_MEMORY
        for name, entry in (members or {}).items():
            self._check_keys_unique(entry, self._members.values())
            self._members[name] = entry

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str], pinned: PublicIdentity | None, *, allow_unsigned: bool = False) -> "TrustStore":
        """Read a store and check it against the pinned coordinator key; the only way a file
        becomes a store that packages and published models are verified against.

        Refuses (typed, naming the file): a signature that does not verify against ``pinned``
        (``TrustStoreSignatureInvalid``, always); a signed store without ``pinned``, and an
        unsigned store without ``allow_unsigned`` (``TrustStoreUnverified``).
        """
        store = cls._read(Path(path))
        where = store.path
        if store.signature is None:
            if not allow_unsigned:
                raise TrustStoreUnverified(f"{where}: the trust store is not signed, so nothing proves who enrolled its members; {UNSIGNED_HINT}", path=where)
            log.warning("%s: unsigned trust store accepted (allow_unsigned_trust); use a signed store outside local experiments", where)
            store.status = TrustStatus("unsigned", "unsigned, accepted with --allow-unsigned-trust")
            return store
        if pinned is None:
            raise TrustStoreUnverified(f"{where}: the trust store is signed, but no coordinator key was pinned to check that signature; {PIN_HINT}", path=where)
        store.verify_signed_by(pinned)
        store.status = TrustStatus("verified", f"signature verified against the pinned key of {pinned.name!r} ({pinned.key_id})", pinned.name, pinned.key_id)
        log.info("%s: trust store verified against the pinned coordinator key %s (%s)", where, pinned.name, pinned.key_id)
        return store

    @classmethod
    def open_for_editing(cls, path: str | os.PathLike[str], *, create: bool = False) -> "TrustStore":
        """Read a store WITHOUT checking its signature, to change it (``trust add|revoke|sign``) or
        show it (``trust list``). A store opened this way is refused by every verification; with
        ``create`` a missing file gives an empty store that ``save`` creates."""
        p = Path(path)
        if create and not os.path.lexists(p):
            store = cls(path=p)
        else:
            store = cls._read(p)
        store.status = _EDITING
        return store

    @classmethod
    def _read(cls, p: Path) -> "TrustStore":
        if not os.path.lexists(p):
            raise TrustStoreError(f"{p}: no such trust store; create one with `fedmerge trust add {p} PUBLIC.json`", path=p)
        raw = read_capped(p, MAX_TRUST_BYTES, what="the trust store", error=TrustStoreError)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TrustStoreError(f"{p}: the trust store is not UTF-8 text ({exc})", path=p) from None
        return cls.from_text(text, p)

    @classmethod
    def from_text(cls, text: str, path: Path | None = None) -> "TrustStore":
        """Parse a store's text (no signature check: see ``load``)."""
        where = str(path) if path else "trust store"
        data = _parse_document(text, path)
        if not isinstance(data, dict):
            raise TrustStoreError(f"{where}: expected a mapping with 'format' and 'members'", path=path)
        if data.get("format") != TRUST_FORMAT:
            raise TrustStoreError(f"{where}: format is {data.get('format')!r}; this fedmerge reads {TRUST_FORMAT!r}", path=path)
        members = data.get("members") or {}
        if not isinstance(members, dict):
            raise TrustStoreError(f"{where}: 'members' must be a mapping of id -> entry", path=path)
        entries: dict[str, TrustEntry] = {}
        for k, v in members.items():
            if not isinstance(k, str):  # YAML allows non-string keys; 1 and "1" must not be two ids
                raise TrustStoreError(f"{where}: member id {k!r} must be a string", path=path)
            entries[k] = TrustEntry.from_dict(k, v, where)
        try:
            store = cls(entries, path, data.get("consortium"))
        except KeyReuse as exc:
            raise KeyReuse(f"{where}: {exc}", sender=exc.sender, path=path) from None
        sig = data.get("signature")
        if sig is not None and not isinstance(sig, dict):
            raise TrustStoreError(f"{where}: 'signature' must be a mapping", path=path)
        store.signature = sig
        store.status = _EDITING
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
        if _is_yaml(p):
            import yaml

            text = yaml.safe_dump(data, sort_keys=True)
        else:
            text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        write_text_atomic(p, text)
        self.path = p
        return p

    # -- changes -----------------------------------------------------------------------------
    @staticmethod
    def _check_keys_unique(entry: TrustEntry, others) -> None:
        """One key, one id; a revoked or rotated-out key is never enrolled again."""
        for kind, key in (("signing", entry.public.signing_key), ("encryption", entry.public.encryption_key)):
            if key in entry.retired():
                raise KeyReuse(f"the {kind} key of {entry.name!r} was rotated out of it before; a retired key is never enrolled again", sender=entry.name)
            for other in others:
                if other.name == entry.name:
                    continue
                if key in (other.public.signing_key, other.public.encryption_key):
                    if other.status == "revoked":
                        raise KeyReuse(f"the {kind} key of {entry.name!r} belongs to {other.name!r}, which was revoked at {other.revoked_at}; a revoked key is never enrolled again, under any id", sender=entry.name)
                    raise KeyReuse(f"the {kind} key of {entry.name!r} is already enrolled as {other.name!r}'s; one key, one id", sender=entry.name)
                if key in other.retired():
                    raise KeyReuse(f"the {kind} key of {entry.name!r} was rotated out of {other.name!r}; a retired key is never enrolled again, under any id", sender=entry.name)

    def add(self, public: PublicIdentity, role: str = "institution", name: str | None = None, replace: bool = False) -> TrustEntry:
        """Enrol a public identity (under its own name unless ``name`` is given).

        ``replace`` rotates an enrolled id's keys; the old keys are kept as retired. Refused: a
        revoked id (with or without ``replace``), a key enrolled under another id, and any key
        that was ever revoked or rotated out, under any id.
        """
        name = check_name(name or public.name, "member id")
        if role not in ROLES:
            raise TrustStoreError(f"role {role!r} is not one of {', '.join(ROLES)}")
        old = self._members.get(name)
        if old is not None and old.status == "revoked":
            raise TrustStoreError(f"{name!r} was revoked at {old.revoked_at}; a revoked id is never re-enrolled (not even with replace), enrol a new id", sender=name)
        if old is not None and old.public.signing_key == public.signing_key and old.public.encryption_key == public.encryption_key and old.role == role:
            return old
        if old is not None and not replace:
            raise TrustStoreError(f"{name!r} is already enrolled with other keys or role; pass replace to rotate its keys", sender=name)
        previous: tuple[RetiredKey, ...] = ()
        if old is not None:
            now = utc_now()
            previous = old.previous_keys + tuple(
                RetiredKey(kind, key, now)
                for kind, key, new in (("signing", old.public.signing_key, public.signing_key), ("encryption", old.public.encryption_key, public.encryption_key))
                if key != new
            )
        entry = TrustEntry(name, role, PublicIdentity(name, public.signing_key, public.encryption_key), "enrolled", utc_now(), previous_keys=previous)
        self._check_keys_unique(entry, self._members.values())
        self._members[name] = entry
        self.signature = None  # any change invalidates an earlier signature
        return entry

    def revoke(self, name: str, reason: str | None = None, at: str | None = None) -> TrustEntry:
        old = self._members.get(name)
        if old is None:
            raise UnknownSender(f"{name!r} is not in the trust store{f' {self.path}' if self.path else ''}; nothing to revoke", sender=name)
        if old.status == "revoked":
            return old
        entry = TrustEntry(name, old.role, old.public, "revoked", old.enrolled_at, at or utc_now(), reason, old.previous_keys)
        self._members[name] = entry
        self.signature = None
        return entry

    # -- queries -----------------------------------------------------------------------------
    def require_verified(self) -> None:
        """Refuse a store that was opened for editing (``open_for_editing``), not loaded verified."""
        if not self.status.usable:
            raise TrustStoreUnverified(
                f"{self.path or 'trust store'}: {self.status.detail}; load it with TrustStore.load(path, pinned) before verifying anything against it",
                path=self.path,
            )

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

    # -- the coordinator's signature -----------------------------------------------------------
    def _body(self) -> bytes:
        return canonical_json(self.to_dict(with_signature=False))

    def sign(self, identity: Identity) -> None:
        """Sign the members with an enrolled coordinator's key (stored in the file)."""
        entry = self.require(identity.name, role="coordinator")
        if entry.public.signing_key != identity.public.signing_key:
            raise TrustStoreError(f"{identity.name!r} is enrolled with another signing key than {identity.key_file or 'the one given'}; sign with the enrolled key", sender=identity.name)
        self.signature = {"signer": identity.name, "key_id": identity.public.key_id, "ed25519": b64(identity.sign(self._body()))}

    def verify_signed_by(self, pinned: PublicIdentity) -> None:
        """Refuse (``TrustStoreSignatureInvalid``) unless the store carries a valid signature by
        the pinned coordinator key and enrols that key as an enrolled coordinator."""
        where = str(self.path) if self.path else "trust store"
        sig = self.signature
        pin = f"the pinned coordinator {pinned.name!r} (key id {pinned.key_id})"
        if not sig:
            raise TrustStoreSignatureInvalid(f"{where}: not signed by {pin}; get the store from the consortium again", sender=pinned.name, path=self.path)
        claimed = sig.get("signer")
        if claimed != pinned.name or sig.get("key_id", pinned.key_id) != pinned.key_id:
            raise TrustStoreSignatureInvalid(f"{where}: not signed by {pin} (the signature names {claimed!r}, key id {sig.get('key_id')}); get the store from the consortium again", sender=pinned.name, path=self.path)
        try:
            raw = unb64(sig.get("ed25519"), 64, f"{where}: signature")
        except KeyFileError as exc:
            raise TrustStoreSignatureInvalid(str(exc), sender=pinned.name, path=self.path) from None
        if not pinned.verify(raw, self._body()):
            raise TrustStoreSignatureInvalid(f"{where}: the signature by {pin} does not match its members (edited after signing?)", sender=pinned.name, path=self.path)
        entry = self._members.get(pinned.name)
        if entry is None or entry.role != "coordinator" or entry.public.signing_key != pinned.signing_key:
            raise TrustStoreSignatureInvalid(f"{where}: signed by {pin}, but the store does not enrol that key as coordinator {pinned.name!r}", sender=pinned.name, path=self.path)

    def check_signature(self, pinned: PublicIdentity | None) -> TrustStatus:
        """What ``load`` would conclude, as a status instead of an exception (for ``trust list``).
        A signature that does not verify is reported as INVALID, never with the name it claims."""
        if self.signature is None:
            return TrustStatus("unsigned", "UNSIGNED: no coordinator signature; refused unless --allow-unsigned-trust is given")
        if pinned is None:
            return TrustStatus("unpinned", f"carries a signature, NOT verified: no pinned coordinator key; {PIN_HINT}")
        try:
            self.verify_signed_by(pinned)
        except TrustStoreSignatureInvalid:
            return TrustStatus(
                "invalid",
                f"INVALID: the signature does not verify against the pinned key of {pinned.name!r} ({pinned.key_id}); every verification refuses this store",
                None,
                pinned.key_id,
            )
        return TrustStatus("verified", f"signature verified against the pinned key of {pinned.name!r} ({pinned.key_id})", pinned.name, pinned.key_id)
