"""A file written once, front to back, that bypasses the page cache where the filesystem allows.

A merged model is written once and read later, if at all, by another process. Through the page
cache every byte is first copied into freshly allocated cache pages: on a virtual machine whose
host reclaims free guest memory, each such page costs a host fault on first touch: writing and
fsyncing 2.1 GiB took 3.6-6.9 s wall and 3.0-6.2 CPU s here, against 1.6-2.0 s and 0.4-0.6 CPU s
with ``O_DIRECT`` (``benchmarks/write_path.py``). On bare metal the copy still costs CPU that the
merge could use, and the cache pages evict the inputs the merge is reading. A file that is read
again at once (a package, a spool, a model about to be verified) belongs in the page cache
instead: ``CheckpointWriter`` writes around it only when asked (``direct=True``).

``SequentialFile`` gathers the bytes in one page-aligned buffer and hands it to the device in
whole blocks; the last block is padded and the file cut back to its true length before it is
fsynced. Where ``O_DIRECT`` is not offered (tmpfs, other systems) or refuses a write, the same
object writes through the page cache instead: the bytes on disk are the same either way.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

BLOCK = 4096  # alignment that every block device's logical sector divides
BUFFER = 8 * 1024 * 1024


class SequentialFile:
    """Write-only file handle: ``write`` appends, ``close(durable)`` finishes (and fsyncs)."""

    def __init__(self, path: str | os.PathLike[str], direct: bool = True):
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._fd = -1
        self._direct = False
        o_direct = getattr(os, "O_DIRECT", 0)
        if direct and o_direct:
            try:
                self._fd = os.open(self.path, flags | o_direct, 0o666)
                self._direct = True
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        if self._fd < 0:
            self._fd = os.open(self.path, flags, 0o666)
        self._buf = mmap.mmap(-1, BUFFER) if self._direct else None
        self._fill = 0
        self._size = 0
        self.closed = False

    @property
    def direct(self) -> bool:
        """Whether the bytes are going around the page cache (so far)."""
        return self._direct

    def fileno(self) -> int:
        return self._fd

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        if not self._direct:
            self._write_all(mv)
        else:
            while mv:
                take = min(len(mv), BUFFER - self._fill)
                self._buf[self._fill : self._fill + take] = mv[:take]
                self._fill += take
                mv = mv[take:]
                if self._fill == BUFFER:
                    self._drain(BUFFER)
        self._size += n
        return n

    def close(self, durable: bool = True) -> None:
        if self.closed:
            return
        try:
            if self._direct and self._fill:
                tail = self._fill
                padded = -(-tail // BLOCK) * BLOCK
                self._buf[tail:padded] = bytes(padded - tail)
                self._drain(padded)
                os.ftruncate(self._fd, self._size)
            elif self._fill:  # bytes staged before O_DIRECT was given up
                self._write_all(memoryview(self._buf)[: self._fill])
                self._fill = 0
            if durable:
                os.fsync(self._fd)
        finally:
            self.discard()

    def discard(self) -> None:
        """Close without finishing (a failed write: the caller removes the file)."""
        if self.closed:
            return
        self.closed = True
        try:
            os.close(self._fd)
        finally:
            if self._buf is not None:
                self._buf.close()
                self._buf = None

    def _drain(self, nbytes: int) -> None:
        view = memoryview(self._buf)[:nbytes]
        try:
            done = 0
            while done < nbytes:
                done += os.write(self._fd, view[done:])
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._give_up_direct(view[done:])
            return
        finally:
            view.release()
        self._fill = 0

    def _give_up_direct(self, rest: memoryview) -> None:
        """The filesystem took the file but not an aligned write: go on through the page cache."""
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False
        self._write_all(rest)
        self._fill = 0

    def _write_all(self, mv: memoryview) -> None:
        while mv:
            mv = mv[os.write(self._fd, mv) :]
