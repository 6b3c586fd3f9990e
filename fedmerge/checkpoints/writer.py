"""Writing Hugging Face model folders atomically, tensor by tensor, in shards of bounded size.

``CheckpointWriter`` produces shards in a hidden temporary folder next to the destination and
renames it into place only when every shard, the index, the config and tokenizer files and the
metadata are written. A write that fails leaves nothing that looks like a model. When the names,
shapes and dtypes are known up front (``plan``), each shard's header is written first and every
tensor's bytes are appended as they arrive, so no shard is ever held in memory; without a plan,
bytes are spooled to a side file and the header is put in front when the shard closes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Sequence

from fedmerge.checkpoints.direct_file import SequentialFile
from fedmerge.checkpoints.dtypes import safetensors_dtype
from fedmerge.checkpoints.errors import CheckpointError
from fedmerge.checkpoints.fingerprint import tensor_bytes
from fedmerge.checkpoints.layout import INDEX_NAME, METADATA_NAME, SIDECAR_FILES, TensorInfo, shard_name

log = logging.getLogger(__name__)


def _header_bytes(entries: Sequence[tuple[str, str, Sequence[int], int, int]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class _Shard:
    """One output file being filled in order: header first, then each tensor's bytes."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, str, tuple[int, ...]]], direct: bool = True):
        self.path = path
        self.order = [n for n, _, _ in entries]
        self.expect = {n: (d, s) for n, d, s in entries}
        layout = []
        pos = 0
        for n, d, s in entries:
            size = TensorInfo(n, s, d).nbytes
            layout.append((n, d, s, pos, pos + size))
            pos += size
        self.nbytes = pos
        self.next = 0
        self.fh = SequentialFile(path, direct=direct)
        self.fh.write(_header_bytes(layout))

    def write(self, data: memoryview) -> None:
        self.fh.write(data)
        self.next += 1

    @property
    def complete(self) -> bool:
        return self.next == len(self.order)

    def close(self, durable: bool = True) -> None:
        self.fh.close(durable)


def _partial_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.partial-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary folders that writers of ``out_dir`` left behind when their process
    died (``.NAME.partial-PID-*`` whose PID is not running); a live process's folder is kept."""
    out_dir = Path(out_dir)
    prefix = _partial_prefix(out_dir)
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for p in out_dir.parent.iterdir():
        if not p.name.startswith(prefix) or not p.is_dir():
            continue
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, left by process %s that is no longer running", p, pid)
            removed.append(p)
    return removed


class CheckpointWriter:
    """Writes a complete HF folder atomically: shards + index + sidecar files + metadata.

    Use as a context manager; ``add`` tensors, then ``commit``. On an exception, or without
    ``commit``, the temporary folder is removed and the destination is untouched.

    With ``plan(entries)`` called first, tensors must be added in the planned order (a tensor
    that arrives early waits in memory for its turn) and are streamed straight into their final
    shard. Without a plan, tensors may come in any order; each shard's bytes go to a side file
    and are copied behind the header when the shard is full.

    ``durable=False`` is for scratch folders that are made again, never recovered, after a crash
    (a merge that is encoded and rebuilt at once): the folder still appears whole, by a rename,
    but nothing is fsynced, so its bytes need never reach the disk.

    ``direct=True`` (durable folders only) writes planned shards around the page cache (see
    ``SequentialFile``): for a model that is the end product, not read again at once. A folder
    that is read back right away (a package, a spool, a model about to be verified) stays in the
    page cache, where reading it back costs no disk read.
    """

    def __init__(self, out_dir: str | os.PathLike[str], max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False, durable: bool = True, direct: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise CheckpointError(f"{self.out_dir}: already exists; choose another output folder or pass overwrite")
        if max_shard_bytes <= 0:
            raise CheckpointError("max_shard_bytes must be positive")
        self.max_shard_bytes = int(max_shard_bytes)
        self.overwrite = overwrite
        self.durable = durable
        self.direct = direct and durable
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.out_dir)
        # The owner's pid is part of the name, so a later run can tell a dead writer's leftovers
        # from a folder another process is still filling.
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(self.out_dir)}{os.getpid()}-", dir=self.out_dir.parent))
        self._names: set[str] = set()
        self._total = 0
        self._done = False
        self._weight_map: dict[str, str] = {}
        # planned mode
        self._planned: list[_Shard] | None = None
        self._plan_specs: list[list[tuple[str, str, tuple[int, ...]]]] = []
        self._shard_of: dict[str, int] = {}
        self._early: dict[str, Any] = {}
        self._cursor = 0
        self._part_bytes = 0  # bytes of the tensor being written in parts so far
        # unplanned mode
        self._spool = None
        self._spool_entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
        self._spool_bytes = 0
        self._spooled: list[tuple[Path, list[str]]] = []

    # -- planned streaming -----------------------------------------------------------------------
    def plan(self, entries: Sequence[TensorInfo | tuple[str, Sequence[int], str]]) -> int:
        """Fix the output's tensors (name, shape, safetensors dtype) in write order; returns the shard count."""
        if self._names or self._planned is not None:
            raise CheckpointError(f"{self.out_dir}: plan() must be called once, before any tensor is added")
        shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for e in entries:
            name, shape, dtype = (e.name, e.shape, e.dtype) if isinstance(e, TensorInfo) else e
            nbytes = TensorInfo(name, tuple(shape), dtype).nbytes
            if name in self._shard_of:
                raise CheckpointError(f"tensor {name!r} planned twice")
            if shards[-1] and size + nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(int(d) for d in shape)))
            self._shard_of[name] = len(shards) - 1
            size += nbytes
        if not shards[0]:
            raise CheckpointError(f"{self.out_dir}: nothing to write, the plan is empty")
        n = len(shards)
        self._plan_specs = shards
        self._planned = []
        for i, spec in enumerate(shards):
            fname = shard_name(i, n)
            self._weight_map.update({name: fname for name, _, _ in spec})
        self._order = [name for spec in shards for name, _, _ in spec]
        self._planned_info = {name: (dtype, shape) for spec in shards for name, dtype, shape in spec}
        return n

    def _write_planned(self, name: str, t) -> None:
        if name not in self._planned_info:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} is not in the planned output")
        dtype, shape = self._planned_info[name]
        if safetensors_dtype(t.dtype) != dtype or tuple(t.shape) != shape:
            raise CheckpointError(
                f"{self.out_dir}: tensor {name!r} is {list(t.shape)} {safetensors_dtype(t.dtype)}, planned {list(shape)} {dtype}"
            )
        self._early[name] = t
        while self._cursor < len(self._order) and self._order[self._cursor] in self._early:
            nm = self._order[self._cursor]
            si = self._shard_of[nm]
            self._open_shard(si)
            tensor = self._early.pop(nm)
            self._planned[si].write(tensor_bytes(tensor))
            self._cursor += 1

    def holds(self, name: str) -> bool:
        """True while a tensor added ahead of the planned order waits here to be written: the
        writer still reads it, so its memory must not be reused yet."""
        return name in self._early

    def add_part(self, name: str, part, final: bool) -> None:
        """Append the next rows of a planned tensor (the one the writer is waiting for), so a large
        tensor can be written as it is computed, chunk by chunk, without ever being whole in memory."""
        self._check_next_part(name)
        t = part.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        dtype, shape = self._planned_info[name]
        if safetensors_dtype(t.dtype) != dtype or tuple(t.shape[1:]) != shape[1:]:
            raise CheckpointError(f"{self.out_dir}: part of tensor {name!r} is {list(t.shape)} {safetensors_dtype(t.dtype)}, planned {list(shape)} {dtype}")
        self._append_part(name, tensor_bytes(t), final)

    def add_bytes(self, name: str, data, final: bool) -> None:
        """Append raw little-endian bytes of the planned tensor the writer is waiting for.

        For bytes that were checked elsewhere before they arrive here (a delta package's chunks,
        whose digests the manifest signs): the pieces need not end on row boundaries, only add up
        to the planned size by the ``final`` piece.
        """
        self._check_next_part(name)
        self._append_part(name, memoryview(data).cast("B"), final)

    def _check_next_part(self, name: str) -> None:
        if self._planned is None:
            raise CheckpointError(f"{self.out_dir}: writing a tensor in parts needs a plan")
        if self._done:
            raise CheckpointError(f"{self.out_dir}: writer already committed or aborted")
        if self._cursor >= len(self._order) or self._order[self._cursor] != name or self._early:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} written in parts out of the planned order")

    def _append_part(self, name: str, raw: memoryview, final: bool) -> None:
        dtype, shape = self._planned_info[name]
        expect = TensorInfo(name, shape, dtype).nbytes
        if self._part_bytes + len(raw) > expect:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} was given more than its planned {expect} bytes")
        si = self._shard_of[name]
        self._open_shard(si)
        shard = self._planned[si]
        shard.fh.write(raw)
        self._part_bytes += len(raw)
        self._total += len(raw)
        if final:
            if self._part_bytes != expect:
                raise CheckpointError(f"{self.out_dir}: tensor {name!r} was written with {self._part_bytes} bytes, planned {expect}")
            self._part_bytes = 0
            self._names.add(name)
            shard.next += 1
            self._cursor += 1

    def _open_shard(self, si: int) -> None:
        while len(self._planned) <= si:
            if self._planned:
                self._planned[-1].close(self.durable)
            i = len(self._planned)
            self._planned.append(_Shard(self.tmp / self._weight_map[self._plan_specs[i][0][0]], self._plan_specs[i], direct=self.direct))

    # -- unplanned spooling ----------------------------------------------------------------------
    def _write_spooled(self, name: str, t) -> None:
        nbytes = t.numel() * t.element_size()
        if self._spool is not None and self._spool_bytes + nbytes > self.max_shard_bytes:
            self._close_spool()
        if self._spool is None:
            self._spool = open(self.tmp / f"spool-{len(self._spooled):05d}.data", "w+b")
        self._spool_entries.append((name, safetensors_dtype(t.dtype), tuple(t.shape), self._spool_bytes, self._spool_bytes + nbytes))
        self._spool.write(tensor_bytes(t))
        self._spool_bytes += nbytes

    def _close_spool(self) -> None:
        if self._spool is None:
            return
        path = self.tmp / f"shard-{len(self._spooled):05d}.safetensors"
        with open(path, "wb") as out:
            out.write(_header_bytes(self._spool_entries))
            self._spool.seek(0)
            shutil.copyfileobj(self._spool, out, 16 * 1024**2)
        self._spool.close()
        os.unlink(self._spool.name)
        self._spooled.append((path, [e[0] for e in self._spool_entries]))
        self._spool = None
        self._spool_entries = []
        self._spool_bytes = 0

    # -- common ----------------------------------------------------------------------------------
    def add(self, name: str, tensor) -> None:
        if self._done:
            raise CheckpointError(f"{self.out_dir}: writer already committed or aborted")
        if name in self._names:
            raise CheckpointError(f"tensor {name!r} written twice")
        self._names.add(name)
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        self._total += t.numel() * t.element_size()
        if self._planned is not None:
            self._write_planned(name, t)
        else:
            self._write_spooled(name, t)

    def commit(self, sidecars_from: str | os.PathLike[str] | None = None, metadata: dict[str, Any] | None = None) -> Path:
        """Finish the folder and move it into place; returns the destination."""
        if self._planned is not None:
            missing = [n for n in self._order if n not in self._names]
            if missing or self._early:
                raise CheckpointError(f"{self.out_dir}: planned tensor {missing[0] if missing else next(iter(self._early))!r} was never written")
            for s in self._planned:
                s.close(self.durable)
            n = len(self._planned)
        else:
            self._close_spool()
            if not self._spooled:
                raise CheckpointError(f"{self.out_dir}: nothing to write, no tensor was added")
            n = len(self._spooled)
            for i, (path, names) in enumerate(self._spooled):
                final = shard_name(i, n)
                path.rename(self.tmp / final)
                self._weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(self._weight_map.items()))}
            (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        if sidecars_from is not None:
            src = Path(sidecars_from)
            src = src if src.is_dir() else src.parent
            for fname in SIDECAR_FILES:
                if (src / fname).exists():
                    shutil.copy2(src / fname, self.tmp / fname)
        if metadata is not None:
            (self.tmp / METADATA_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
        for f in self.tmp.iterdir() if self.durable else ():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        # mkdtemp makes the folder 0700; the published model gets the mode any new folder would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        if self.out_dir.exists():
            # Swap in two renames so a reader sees either the old folder or the new one.
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            self.out_dir.rename(old)
            self.tmp.rename(self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.out_dir)
        self._done = True
        log.debug("wrote %s (%d shard%s, %.1f MB)", self.out_dir, n, "" if n == 1 else "s", self._total / 1e6)
        return self.out_dir

    @property
    def bytes_written(self) -> int:
        return self._total

    def abort(self) -> None:
        if not self._done:
            for s in self._planned or []:
                try:
                    s.fh.discard()
                except OSError:
                    pass
            if self._spool is not None:
                self._spool.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._done = True

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()
