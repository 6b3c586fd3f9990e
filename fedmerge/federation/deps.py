"""The few calls the federation makes into the security layer and the merge engine, in one place.

The federation never reaches into those parts' internals: it packs, verifies, unpacks, signs and
merges through the functions named here, exactly as the contracts between the parts define them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_identity(path: str | os.PathLike[str], passphrase: str | None = None):
    from fedmerge.security.keys import load_identity as _load

    return _load(path, passphrase)


def load_public(path: str | os.PathLike[str]):
    from fedmerge.security.keys import PublicIdentity

    return PublicIdentity.load(path)


def load_trust(path: str | os.PathLike[str], pinned, *, allow_unsigned: bool = False):
    """The trust store, verified against the pinned coordinator public identity (see ``TrustStore.load``)."""
    from fedmerge.security.trust import TrustStore

    return TrustStore.load(path, pinned, allow_unsigned=allow_unsigned)


def pack_delta(model, reference, out_dir, identity, round_id: int, reference_fingerprint: str, seal_to=None, dtype: str = "float32") -> Path:
    from fedmerge.security.pack import pack_delta as _pack

    if not isinstance(model, (str, os.PathLike)):
        reference = None  # a delta source is already relative to its base
    return Path(_pack(model, reference, out_dir, identity, round_id, reference_fingerprint, seal_to=seal_to, dtype=dtype))


def verify_package(pkg_dir, trust, expected_round: int, expected_reference: str, opener=None, unpack_to=None, *, require_sealed: bool):
    """Check a package end to end; with ``unpack_to`` the verified deltas are written in the same pass.
    ``require_sealed`` refuses an unsealed package (``UnsealedPackage``)."""
    from fedmerge.security.verify import verify_package as _verify

    return _verify(pkg_dir, trust, expected_round=expected_round, expected_reference=expected_reference, opener=opener, unpack_to=unpack_to, require_sealed=require_sealed)


def sign_model(model_dir, identity, *, round_id: int, fingerprint: str) -> Any:
    """Sign a published model for ``round_id``; the round and fingerprint are in what is signed."""
    from fedmerge.security.model_sign import sign_model as _sign

    return _sign(model_dir, identity, round_id=round_id, fingerprint=fingerprint)


def verify_model(model_dir, trust, *, coordinator=None, expected_round: int | None = None, newer_than: int | None = None) -> Any:
    """Check a published model; returns its ``ModelPublication`` (signed round and fingerprint).
    ``coordinator``: the pinned coordinator identity; ``newer_than``: the installed round."""
    from fedmerge.security.model_sign import verify_model as _verify

    return _verify(model_dir, trust, coordinator=coordinator, expected_round=expected_round, newer_than=newer_than)


def delta_checkpoint(folder):
    from fedmerge.merging.taskvector import DeltaCheckpoint

    return DeltaCheckpoint(folder)


def merge(base_dir, delta_dirs: list[Path], out_dir, strategy: dict[str, Any], metadata: dict[str, Any] | None = None):
    """Merge the verified deltas onto ``base_dir`` with the engine, exactly as an offline merge would."""
    from fedmerge.merging.engine import MergeSpec
    from fedmerge.merging.engine import merge as _merge

    spec = MergeSpec(**strategy)
    inputs = [delta_checkpoint(d) for d in delta_dirs]
    return _merge(base_dir, inputs, out_dir, spec, progress=False, metadata=metadata)
