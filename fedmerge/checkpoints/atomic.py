"""Files that are either whole or absent: write to a temporary name beside the target, fsync, rename.

Every durable write in fedmerge (JSON records, keys, trust stores, task files) goes through
here, so a crash at any instant leaves the previous version or the new one, never a torn file.
Private files (keys) are created 0600 from their first byte: they are never readable by others,
not even for the instant between creating and renaming.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and folder under ``root`` (before the tree is renamed into place)."""
    root = Path(root)
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [root, *[p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()]]:
        fsync_dir(d)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` atomically and durably; the file gets ``mode`` from its creation."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; widen (or keep) to the requested mode before any byte is written.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), mode)


def write_private_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """A secret (private key, passphrase): mode 0600, atomic, durable."""
    return write_bytes_atomic(path, data.encode("utf-8") if isinstance(data, str) else data, 0o600)


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True, default=str))
