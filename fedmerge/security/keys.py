"""Institution and coordinator identities: an Ed25519 signing key and an X25519 encryption key.

A private identity is one JSON file (``NAME.key``, mode 0600) holding both private keys as
PKCS#8 PEM, encrypted with the passphrase when one is given. The public half (``NAME.pub.json``)
is what the consortium puts in its trust store. Keys are separate on purpose: the signing key
proves who sent something, the encryption key lets only its owner open what is sealed to it, and
neither is ever used for the other job.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedmerge.checkpoints.atomic import write_private_atomic
from fedmerge.security.errors import KeyFileError, PassphraseError

KEY_FORMAT = "fedmerge-identity/1"
PUBLIC_FORMAT = "fedmerge-public-identity/1"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: object, what: str = "identity name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise KeyFileError(
            f"{what} {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, length: int, what: str) -> bytes:
    if not isinstance(text, str):
        raise KeyFileError(f"{what}: expected a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise KeyFileError(f"{what}: not valid base64 ({exc})") from None
    if len(raw) != length:
        raise KeyFileError(f"{what}: expected {length} bytes, got {len(raw)}")
    return raw


def _raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class PublicIdentity:
    """The public half of an identity: what others need to check signatures and seal to it."""

    name: str
    signing_key: bytes  # Ed25519, 32 raw bytes
    encryption_key: bytes  # X25519, 32 raw bytes

    @property
    def key_id(self) -> str:
        """Short, stable id of both keys (shown in listings, recorded in sealed manifests)."""
        return hashlib.sha256(self.signing_key + self.encryption_key).hexdigest()[:16]

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.signing_key).verify(signature, data)
            return True
        except (InvalidSignature, ValueError):
            return False

    def x25519(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.encryption_key)

    def to_dict(self) -> dict:
        return {
            "format": PUBLIC_FORMAT,
            "name": self.name,
            "signing_key": b64(self.signing_key),
            "encryption_key": b64(self.encryption_key),
            "key_id": self.key_id,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: object, where: str = "public identity") -> "PublicIdentity":
        if not isinstance(data, dict):
            raise KeyFileError(f"{where}: expected a JSON object")
        if data.get("format", PUBLIC_FORMAT) != PUBLIC_FORMAT:
            raise KeyFileError(f"{where}: format {data.get('format')!r} is not {PUBLIC_FORMAT!r}")
        ident = cls(
            name=check_name(data.get("name"), f"{where}: name"),
            signing_key=unb64(data.get("signing_key"), 32, f"{where}: signing_key"),
            encryption_key=unb64(data.get("encryption_key"), 32, f"{where}: encryption_key"),
        )
        if "key_id" in data and data["key_id"] != ident.key_id:
            raise KeyFileError(f"{where}: key_id {data['key_id']!r} does not match the keys ({ident.key_id})")
        return ident

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PublicIdentity":
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text()), str(p))
        except OSError as exc:
            raise KeyFileError(f"{p}: cannot read public identity ({exc.strerror})", path=p) from None
        except ValueError as exc:
            raise KeyFileError(f"{p}: not valid JSON ({exc})", path=p) from None


class Identity:
    """A private identity: signs with Ed25519, opens sealed packages with X25519."""

    def __init__(self, name: str, signing: Ed25519PrivateKey, encryption: X25519PrivateKey, key_file: Path | None = None):
        self.name = check_name(name)
        self._signing = signing
        self._encryption = encryption
        self.key_file = key_file
        self.public = PublicIdentity(name, _raw_public(signing.public_key()), _raw_public(encryption.public_key()))

    def sign(self, data: bytes) -> bytes:
        return self._signing.sign(data)

    def exchange(self, peer: X25519PublicKey) -> bytes:
        """X25519 shared secret with a peer key (used to open packages sealed to us)."""
        return self._encryption.exchange(peer)

    def __fspath__(self) -> str:
        # Lets an Identity returned by generate_identity be passed wherever a key path is expected.
        if self.key_file is None:
            raise TypeError("this identity was not loaded from a file")
        return str(self.key_file)

    def __repr__(self) -> str:
        return f"Identity({self.name!r}, key_id={self.public.key_id})"


def _pem(key, passphrase: bytes | None) -> str:
    enc = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc).decode("ascii")


def _as_bytes(passphrase: str | bytes | None) -> bytes | None:
    if passphrase is None:
        return None
    data = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    return data or None


def key_paths(name: str, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"{name}.key", out / f"{name}.pub.json"


def generate_identity(name: str, out_dir: str | os.PathLike[str], passphrase: str | bytes | None = None, overwrite: bool = False) -> Identity:
    """Create ``NAME.key`` (0600, private) and ``NAME.pub.json`` (public) in ``out_dir``.

    Returns the new identity; it is path-like (its key file), so ``load_identity(result)`` works.
    """
    check_name(name)
    key_file, pub_file = key_paths(name, out_dir)
    if not overwrite and (key_file.exists() or pub_file.exists()):
        raise KeyFileError(f"{key_file}: an identity named {name!r} already exists there; choose another name or folder", path=key_file)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    signing, encryption = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    pw = _as_bytes(passphrase)
    body = {
        "format": KEY_FORMAT,
        "name": name,
        "encrypted": pw is not None,
        "signing_key": _pem(signing, pw),
        "encryption_key": _pem(encryption, pw),
    }
    write_private_atomic(key_file, json.dumps(body, indent=2, sort_keys=True) + "\n")
    ident = Identity(name, signing, encryption, key_file)
    pub_file.write_text(ident.public.to_json())
    return ident


def _load_pem(text: object, pw: bytes | None, where: str, encrypted: bool):
    if not isinstance(text, str):
        raise KeyFileError(f"{where}: expected a PEM string")
    if encrypted and pw is None:
        raise PassphraseError(f"{where}: the key is encrypted; give its passphrase (--passphrase-file)")
    try:
        return serialization.load_pem_private_key(text.encode("ascii"), password=pw if encrypted else None)
    except TypeError as exc:
        raise PassphraseError(f"{where}: {exc}") from None
    except ValueError as exc:
        if encrypted:
            raise PassphraseError(f"{where}: wrong passphrase (or a damaged key)") from None
        raise KeyFileError(f"{where}: not a valid private key ({exc})") from None
    except UnicodeEncodeError:
        raise KeyFileError(f"{where}: not a valid PEM key") from None


def load_identity(path: str | os.PathLike[str], passphrase: str | bytes | None = None, check_mode: bool = True) -> Identity:
    """Load a private identity from its ``.key`` file (or a folder holding exactly one)."""
    p = Path(path)
    if p.is_dir():
        keys = sorted(p.glob("*.key"))
        if len(keys) != 1:
            raise KeyFileError(f"{p}: expected exactly one *.key file, found {len(keys)}; give the file itself", path=p)
        p = keys[0]
    try:
        st = p.stat()
        text = p.read_text()
    except OSError as exc:
        raise KeyFileError(f"{p}: cannot read key file ({exc.strerror})", path=p) from None
    if check_mode and os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{p}: private key is readable by others (mode {stat.S_IMODE(st.st_mode):o}); run `chmod 600 {p}`", path=p)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise KeyFileError(f"{p}: not a fedmerge key file ({exc})", path=p) from None
    if not isinstance(data, dict) or data.get("format") != KEY_FORMAT:
        raise KeyFileError(f"{p}: not a fedmerge key file (format {KEY_FORMAT!r} expected)", path=p)
    name = check_name(data.get("name"), f"{p}: name")
    encrypted = bool(data.get("encrypted"))
    pw = _as_bytes(passphrase)
    signing = _load_pem(data.get("signing_key"), pw, f"{p}: signing_key", encrypted)
    encryption = _load_pem(data.get("encryption_key"), pw, f"{p}: encryption_key", encrypted)
    if not isinstance(signing, Ed25519PrivateKey) or not isinstance(encryption, X25519PrivateKey):
        raise KeyFileError(f"{p}: expected an Ed25519 signing key and an X25519 encryption key", path=p)
    return Identity(name, signing, encryption, p)


def read_passphrase_file(path: str | os.PathLike[str] | None) -> bytes | None:
    """The passphrase in a file, without its trailing newline (None when no file is given)."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read passphrase file ({exc.strerror})", path=path) from None
    data = data.rstrip(b"\r\n")
    if not data:
        raise PassphraseError(f"{path}: the passphrase file is empty")
    return data
