"""Reading Hugging Face model folders, one tensor at a time, never through a memory map.

A folder with ``model.safetensors`` or sharded ``*.safetensors`` plus
``model.safetensors.index.json``. Each shard's header is checked against the whole safetensors
format before any tensor is read (``read_safetensors_header``); a file that breaks a rule is
refused with ``MalformedSafetensors`` naming the file and, where there is one, the tensor.
Tensors are read with positioned reads into freshly allocated memory: a mapped file counts towards
the process's resident memory for as long as it stays mapped, which would make a streaming merge
look (and, under pressure, be) as large as its inputs. Pickled weights (``.bin``, ``.pt``,
``.pth``, ``.ckpt``) are refused, never unpickled.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fedmerge.checkpoints.dtypes import SAFETENSORS_DTYPES, torch_dtype
from fedmerge.checkpoints.errors import CheckpointError, MalformedSafetensors, MissingTensor, PickledWeightsRefused
from fedmerge.checkpoints.layout import INDEX_NAME, PICKLE_SUFFIXES, SINGLE_NAME, TensorInfo

# A header larger than this is not a model header but a corrupt length field (safetensors' own limit).
MAX_HEADER_BYTES = 100 * 1024**2
# Linux returns at most ~2 GiB from one read call; larger tensors are read in pieces.
_READ_PIECE = 1 << 30


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickledWeightsRefused(
            f"{folder}: only pickled weights found ({', '.join(pickles[:3])}); fedmerge never unpickles. "
            "Convert them once in a trusted environment, e.g. "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)`."
        )
    raise CheckpointError(f"{folder}: no model.safetensors, no {INDEX_NAME} and no *.safetensors file")


def require_safetensors_weights(folder: str | os.PathLike[str]) -> None:
    """Refuse a model folder whose weights are not safetensors, before anything loads it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder")
    if (folder / INDEX_NAME).exists() or (folder / SINGLE_NAME).exists():
        return
    if not any(p.suffix == ".safetensors" and not p.name.startswith("adapter_") for p in folder.iterdir()):
        _refuse_pickles(folder)


def open_regular(file: str | os.PathLike[str], *, follow_symlinks: bool = True) -> int:
    """Open ``file`` read-only, refusing FIFOs, devices and folders (opening a FIFO would block);
    with ``follow_symlinks=False`` a symbolic link is refused too, whatever it points at."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(file, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise CheckpointError(f"{file}: is a symbolic link, not a regular file") from None
        raise CheckpointError(f"{file}: cannot be opened ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{file}: not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    file: Path
    offset: int  # absolute position of the first byte in the file


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors_header(file: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and validate one safetensors header; returns (entries by name, metadata).

    The rules are the format's: an 8-byte little-endian length, a UTF-8 JSON object of that many
    bytes with unique keys, an optional ``__metadata__`` of strings, and for each tensor a known
    dtype, a shape of non-negative integers and ``data_offsets`` [begin, end) whose length is the
    shape's byte size. Sorted by offset, the tensors must tile the data section exactly: the first
    starts at 0, each starts where the previous ended, the last ends at the end of the file. So
    no two tensors share bytes and no byte is unaccounted for.
    """
    fd = open_regular(file)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise MalformedSafetensors(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise MalformedSafetensors(f"{file}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file)")
        raw = os.pread(fd, n, 8)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise MalformedSafetensors(f"{file}: corrupt safetensors header (JSON nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedSafetensors(f"{file}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise MalformedSafetensors(f"{file}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    data_size = size - data_start
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MalformedSafetensors(f"{file}: __metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, _Entry] = {}
    for name, e in header.items():
        where = f"{file}: tensor {name!r}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise MalformedSafetensors(f"{where}: header entry must have dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise MalformedSafetensors(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise MalformedSafetensors(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) for x in offsets):
            raise MalformedSafetensors(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        info = TensorInfo(name, tuple(shape), dtype)
        if end - begin != info.nbytes or begin < 0 or end > data_size:
            raise MalformedSafetensors(
                f"{where} declares bytes [{begin}, {end}) for shape {list(shape)} {dtype} "
                f"in a data section of {data_size} bytes; the file is truncated or corrupt"
            )
        spans.append((begin, end, name))
        entries[name] = _Entry(info, file, data_start + begin)
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else f"leaves bytes [{pos}, {begin}) unaccounted for"
            raise MalformedSafetensors(f"{file}: tensor {name!r} at [{begin}, {end}) {what}")
        pos = end
    if pos != data_size:
        raise MalformedSafetensors(f"{file}: tensors end at byte {pos} of a {data_size}-byte data section; the file has trailing bytes")
    return entries, {str(k): v for k, v in meta.items()}


class CheckpointReader:
    """Lazy, read-only view of the tensors of one model folder (or one .safetensors file)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fds: dict[Path, int] = {}
        self._entries: dict[str, _Entry] = {}
        self._buffers = None
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such model folder or file")
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                if self.path.suffix in PICKLE_SUFFIXES:
                    _refuse_pickles(self.path.parent)
                raise CheckpointError(f"{self.path}: not a .safetensors file")
            self.folder = self.path.parent
            self._load_files([self.path])
        else:
            self.folder = self.path
            index = self.path / INDEX_NAME
            if index.exists():
                self._load_index(index)
            elif (self.path / SINGLE_NAME).exists():
                self._load_files([self.path / SINGLE_NAME])
            else:
                files = sorted(p for p in self.path.glob("*.safetensors") if not p.name.startswith("adapter_"))
                if not files:
                    _refuse_pickles(self.path)
                self._load_files(files)
        if not self._entries:
            raise CheckpointError(f"{self.path}: the checkpoint holds no tensors")

    def _load_files(self, files: Sequence[Path]) -> None:
        for f in files:
            entries, _ = read_safetensors_header(f)
            for name, e in entries.items():
                if name in self._entries:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {self._entries[name].file.name}; a checkpoint holds each tensor once")
                self._entries[name] = e

    def _load_index(self, index: Path) -> None:
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of file names")
        except RecursionError:
            raise CheckpointError(f"{index}: not a valid safetensors index (JSON nested too deeply)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        for shard in set(weight_map.values()):
            if Path(shard).name != shard:
                raise CheckpointError(f"{index}: names shard {shard!r}, which is not a file name inside the folder")
        files = sorted({self.path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing from {self.path}")
        self._load_files(files)
        for name, shard in weight_map.items():
            e = self._entries.get(name)
            if e is None:
                raise MissingTensor(f"{index}: lists tensor {name!r} in {shard}, which does not hold it (nor does any shard the index names)")
            if e.file.name != shard:
                raise CheckpointError(f"{index}: lists tensor {name!r} in {shard}, but it is stored in {e.file.name}")
        extra = [n for n in self._entries if n not in weight_map]
        if extra:
            raise CheckpointError(f"{index}: does not list tensor {extra[0]!r} stored in {self._entries[extra[0]].file.name} ({len(extra)} unlisted)")
        # Follow the index's order so iteration is stable however the shards were named.
        self._entries = {n: self._entries[n] for n in weight_map}

    # -- queries ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in stored order (shard by shard, or the index's order)."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise MissingTensor(f"{self.path}: no tensor named {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        return self._entry(name).info

    def infos(self) -> list[TensorInfo]:
        return [e.info for e in self._entries.values()]

    def file_of(self, name: str) -> Path:
        return self._entry(name).file

    def get(self, name: str, rows: tuple[int, int] | None = None):
        """Load one tensor (on the CPU, in its stored dtype); ``rows=(a, b)`` loads rows a..b-1 only.

        A whole tensor is read into a buffer of the pool set by ``use_buffers``, if any."""
        import torch

        e = self._entry(name)
        shape = list(e.info.shape)
        offset = e.offset
        if rows is not None:
            if not shape:
                raise CheckpointError(f"{e.file}: tensor {name!r} is a scalar; it has no rows")
            a, b = rows
            if not 0 <= a <= b <= shape[0]:
                raise CheckpointError(f"{e.file}: rows {a}:{b} out of range for tensor {name!r} of shape {shape}")
            row_bytes = (e.info.nbytes // shape[0]) if shape[0] else 0
            offset += a * row_bytes
            shape[0] = b - a
        pool = self._buffers if rows is None else None
        out = (pool.empty if pool is not None else torch.empty)(shape, dtype=torch_dtype(e.info.dtype))
        nbytes = out.numel() * out.element_size()
        if nbytes:
            buf = memoryview(out.view(-1).view(torch.uint8).numpy())
            fd = self._fd(e.file)
            done = 0
            while done < nbytes:
                try:
                    got = os.preadv(fd, [buf[done : min(nbytes, done + _READ_PIECE)]], offset + done)
                except OSError as exc:
                    raise CheckpointError(f"{e.file}: tensor {name!r} cannot be read ({exc})") from exc
                if got <= 0:
                    raise CheckpointError(f"{e.file}: tensor {name!r} is truncated (file ends before its last byte)")
                done += got
        return out

    def use_buffers(self, pool) -> None:
        """Read whole tensors into ``pool``'s reusable buffers (a ``BufferPool``; None: allocate
        each). Whoever gets such a tensor may give it back to the pool once done with it."""
        self._buffers = pool

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = open_regular(file)
        return fd

    def files(self) -> list[Path]:
        return sorted({e.file for e in self._entries.values()})

    def total_bytes(self) -> int:
        return sum(e.info.nbytes for e in self._entries.values())

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.folder / "config.json"
        if not cfg.exists():
            return {}
        try:
            return json.loads(cfg.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{cfg}: not valid JSON ({exc})") from exc

    def close(self) -> None:
        fds = getattr(self, "_fds", None)  # absent when __init__ failed before opening anything
        if not fds:
            return
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        fds.clear()

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
