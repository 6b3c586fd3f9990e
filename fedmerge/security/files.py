"""Reading the small files security decisions rest on (manifests, signatures, trust stores), safely.

Each is read whole, but never more than a cap, never through a symbolic link, and never from a
FIFO, device or folder: ``open_regular`` opens without blocking and refuses anything that is not
a plain file, so a FIFO planted under a package's ``manifest.json`` is refused at once instead of
hanging the verifier.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fedmerge.checkpoints.errors import CheckpointError
from fedmerge.checkpoints.reader import open_regular
from fedmerge.security.errors import SecurityError


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (for refusals)."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a plain file"


def read_capped(
    path: str | os.PathLike[str],
    limit: int,
    *,
    what: str,
    error: type[SecurityError],
    missing: type[SecurityError] | None = None,
    not_plain: type[SecurityError] | None = None,
    too_large: type[SecurityError] | None = None,
    hint: str = "",
) -> bytes:
    """The bytes of ``path`` (at most ``limit``), or a typed refusal naming the file.

    ``error`` is raised for every problem unless a more precise class is given for it:
    ``missing`` (no such file), ``not_plain`` (a link, FIFO, device or folder), ``too_large``.
    """
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise (missing or error)(f"{p}: missing; {what} is needed{hint}", path=p) from None
    except OSError as exc:
        raise error(f"{p}: cannot read {what} ({exc.strerror})", path=p) from None
    if not stat.S_ISREG(st.st_mode):
        raise (not_plain or error)(f"{p}: {what} is {file_kind(st.st_mode)}; only a plain file is read", path=p)
    if st.st_size > limit:
        raise (too_large or error)(f"{p}: {what} has {st.st_size} bytes, more than the {limit} allowed", path=p)
    try:
        fd = open_regular(p, follow_symlinks=False)
    except CheckpointError as exc:  # replaced between the lstat and the open
        raise (not_plain or error)(f"{p}: {what} cannot be opened as a plain file ({exc})", path=p) from None
    try:
        with os.fdopen(fd, "rb", closefd=True) as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"{p}: cannot read {what} ({exc.strerror})", path=p) from None
    if len(raw) > limit:
        raise (too_large or error)(f"{p}: {what} is larger than the {limit} bytes allowed", path=p)
    return raw
