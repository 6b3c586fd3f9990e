"""Sealing: AES-256-GCM per chunk under a key agreed by X25519 and stretched by HKDF-SHA256.

The sender draws a fresh ephemeral X25519 key for every package, so every package has its own
AES key and the nonce only has to be unique inside one package: it is the tensor's index and the
chunk's index, which never repeat. The key derivation binds the scheme, the format version, the
sender's id AND its enrolled Ed25519 signing key, the round, the package nonce and both X25519
keys; the associated data of each chunk names the format version, the sender, the round, the
package nonce, the tensor, the chunk index, the chunk count and whether it is the last one. So a
chunk moved to another place, another tensor, another package or round, a package cut short, or
a package re-signed by another institution as its own (the coordinator then derives the key for
that institution, not for the one that sealed it) fails authentication.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmerge.security.errors import ChunkAuthenticationFailed

# Version 2 binds the sender's signing key into the key derivation (version 1 bound only its id).
SCHEME = "x25519-hkdf-sha256-aes256gcm/2"
TAG_BYTES = 16


def _info(format_version: str, sender: str, sender_key: bytes, round_id: int, package_nonce: str, ephemeral: bytes, recipient: bytes) -> bytes:
    # Length-prefixed fields: no two different contexts can spell the same info bytes.
    fields = [SCHEME.encode(), format_version.encode(), sender.encode("utf-8"), sender_key, str(round_id).encode(), package_nonce.encode(), ephemeral, recipient]
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def derive_key(shared: bytes, format_version: str, sender: str, sender_key: bytes, round_id: int, package_nonce: str, ephemeral: bytes, recipient: bytes) -> bytes:
    """The package's AES-256 key; ``sender_key`` is the sender's Ed25519 public key (32 bytes)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_info(format_version, sender, sender_key, round_id, package_nonce, ephemeral, recipient))
    return hkdf.derive(shared)


def new_sender_key(recipient: X25519PublicKey, recipient_raw: bytes, format_version: str, sender: str, sender_key: bytes, round_id: int, package_nonce: str) -> tuple[bytes, bytes]:
    """(AES key, ephemeral public key bytes) for sealing one package to ``recipient``."""
    from cryptography.hazmat.primitives import serialization

    eph = X25519PrivateKey.generate()
    eph_raw = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = derive_key(eph.exchange(recipient), format_version, sender, sender_key, round_id, package_nonce, eph_raw, recipient_raw)
    return key, eph_raw


def chunk_nonce(tensor_index: int, chunk_index: int) -> bytes:
    return struct.pack(">IQ", tensor_index, chunk_index)


def chunk_aad(format_version: str, sender: str, round_id: int, package_nonce: str, tensor: str, chunk_index: int, chunk_count: int) -> bytes:
    final = chunk_index == chunk_count - 1
    return "\x00".join([format_version, sender, str(round_id), package_nonce, tensor, str(chunk_index), str(chunk_count), "final" if final else "more"]).encode("utf-8")


class ChunkSealer:
    """Seals and opens the chunks of one package (thread-safe: AESGCM keeps no per-call state)."""

    def __init__(self, key: bytes, format_version: str, sender: str, round_id: int, package_nonce: str):
        self._aead = AESGCM(key)
        self._ctx = (format_version, sender, round_id, package_nonce)

    def seal(self, tensor_index: int, tensor: str, chunk_index: int, chunk_count: int, plaintext) -> bytes:
        return self._aead.encrypt(chunk_nonce(tensor_index, chunk_index), plaintext, chunk_aad(*self._ctx, tensor, chunk_index, chunk_count))

    def open(self, tensor_index: int, tensor: str, chunk_index: int, chunk_count: int, ciphertext) -> bytes:
        try:
            return self._aead.decrypt(chunk_nonce(tensor_index, chunk_index), ciphertext, chunk_aad(*self._ctx, tensor, chunk_index, chunk_count))
        except InvalidTag:
            sender = self._ctx[1]
            raise ChunkAuthenticationFailed(
                f"package from {sender!r}: tensor {tensor!r} chunk {chunk_index + 1}/{chunk_count} fails authentication "
                "(altered, swapped, reordered, cut short, or sealed for another package); ask the sender to send it again",
                sender=sender,
                tensor=tensor,
            ) from None
