"""Counter-based pseudo-random numbers for the seeded codecs, defined here bit for bit.

A sparse mask must be regenerated exactly by whoever decodes it (the coordinator, an auditor),
possibly with another torch version: so no library generator is used, only this integer hash of
(key, counter), computed with int64 tensor arithmetic that never overflows (every value stays
below 2^32 and every multiplier below 2^27). Any element's draw can be made without the others',
so a row range decodes on its own.
"""

from __future__ import annotations

import hashlib

M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (package seed, tensor name, stage index, purpose)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _mix(x):
    x = x ^ (x >> 16)
    x = (x * _MUL) & M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & M32
    return x ^ (x >> 16)


def hash32(counter, key: int):
    """32-bit hashes (int64 tensor in [0, 2^32)) of non-negative int64 ``counter`` values under ``key``."""
    x = _mix((counter & M32) ^ (key & M32))
    return _mix(x ^ ((counter >> 32) & M32) ^ ((key >> 32) & M32))
