"""Hugging Face model folders in and out, one tensor at a time.

Reading: a folder with ``model.safetensors`` or sharded ``*.safetensors`` plus
``model.safetensors.index.json``. Each shard's header is parsed and checked here (offsets,
dtypes, sizes) and tensors are read with positioned reads into freshly allocated memory, never
through a memory map: a mapped file counts towards the process's resident memory for as long
as it stays mapped, which would make a streaming merge look (and, under pressure, be) as large
as its inputs. Pickled weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused, never
unpickled.

Writing: ``CheckpointWriter`` produces shards of a bounded size in a hidden temporary folder
next to the destination and renames it into place only when every shard, the index, the config
and tokenizer files and the metadata are written. A merge that fails leaves nothing that looks
like a model. When the names, shapes and dtypes are known up front (``plan``), each shard's
header is written first and every tensor's bytes are appended as they arrive, so no shard is
ever held in memory; without a plan, bytes are spooled to a side file and the header is put in
front when the shard closes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from fedmerge.errors import FedmergeError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
METADATA_NAME = "fedmerge.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Everything a loader needs beside the weights; copied from the base into every merged folder.
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# A header larger than this is not a model header but a corrupt length field.
_MAX_HEADER_BYTES = 100 * 1024**2
# Linux returns at most ~2 GiB from one read call; larger tensors are read in pieces.
_READ_PIECE = 1 << 30


class CheckpointError(FedmergeError):
    """A model folder cannot be read or written as asked."""


class PickledWeightsRefused(CheckpointError):
    """The folder holds only pickled weights, which fedmerge never loads."""


class MissingTensor(CheckpointError):
    """A tensor named by the index or asked for by a merge is not in the checkpoint."""


class IncompatibleCheckpoint(CheckpointError):
    """Two checkpoints cannot be merged: architecture, names, shapes or vocabulary differ."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: F32, BF16, F16, ...

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_nbytes(self.dtype)


_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2"})


def dtype_nbytes(dtype: str) -> int:
    try:
        return _SAFETENSORS_DTYPE_BYTES[dtype]
    except KeyError:
        raise CheckpointError(f"unknown safetensors dtype {dtype!r}") from None


def torch_dtype(dtype: str):
    """torch dtype for a safetensors dtype string."""
    import torch

    return getattr(torch, _TORCH_NAMES[dtype])


def safetensors_dtype(torch_dtype_or_name) -> str:
    """Safetensors dtype string for a torch dtype (or a name such as ``"bfloat16"``)."""
    name = str(torch_dtype_or_name).removeprefix("torch.")
    aliases = {"float": "float32", "half": "float16", "double": "float64", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    name = aliases.get(name, name)
    for st, tn in _TORCH_NAMES.items():
        if tn == name:
            return st
    raise CheckpointError(f"dtype {torch_dtype_or_name!r} cannot be stored in safetensors")


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickledWeightsRefused(
            f"{folder}: only pickled weights found ({', '.join(pickles[:3])}); fedmerge never unpickles. "
            "Convert them once in a trusted environment, e.g. "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)`."
        )
    raise CheckpointError(f"{folder}: no model.safetensors, no {INDEX_NAME} and no *.safetensors file")


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    file: Path
    offset: int  # absolute position of the first byte in the file


def read_safetensors_header(file: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and validate one safetensors header; returns (entries by name, metadata)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{file}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file)")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header ({exc})") from None
    data_start = 8 + n
    data_size = size - data_start
    meta = header.pop("__metadata__", None) or {}
    entries: dict[str, _Entry] = {}
    for name, e in header.items():
        try:
            dtype = str(e["dtype"])
            shape = tuple(int(d) for d in e["shape"])
            begin, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in _SAFETENSORS_DTYPE_BYTES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype!r}")
        info = TensorInfo(name, shape, dtype)
        if end - begin != info.nbytes or begin < 0 or end > data_size or any(d < 0 for d in shape):
            raise CheckpointError(
                f"{file}: tensor {name!r} declares bytes [{begin}, {end}) for shape {list(shape)} {dtype} "
                f"in a data section of {data_size} bytes; the file is truncated or corrupt"
            )
        entries[name] = _Entry(info, file, data_start + begin)
    return entries, {str(k): str(v) for k, v in meta.items()}


class CheckpointReader:
    """Lazy, read-only view of the tensors of one model folder (or one .safetensors file)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such model folder or file")
        self._fds: dict[Path, int] = {}
        self._entries: dict[str, _Entry] = {}
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
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = sorted({self.path / str(f) for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing from {self.path}")
        self._load_files(files)
        for name, shard in weight_map.items():
            e = self._entries.get(name)
            if e is None:
                raise MissingTensor(f"{index}: lists tensor {name!r} in {shard}, which does not hold it (nor does any shard the index names)")
            if e.file.name != Path(shard).name:
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

    def file_of(self, name: str) -> Path:
        return self._entry(name).file

    def get(self, name: str, rows: tuple[int, int] | None = None):
        """Load one tensor (on the CPU, in its stored dtype); ``rows=(a, b)`` loads rows a..b-1 only."""
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
        out = torch.empty(shape, dtype=torch_dtype(e.info.dtype))
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

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{file}: cannot be opened ({exc})") from exc
            self._fds[file] = fd
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
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensor_digest(tensor) -> str:
    """SHA-256 of a tensor's raw bytes (contiguous, as stored)."""
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


def tensor_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy where possible."""
    import torch

    t = tensor.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def combine_digests(entries: Iterable[tuple[str, str, Sequence[int], str]]) -> str:
    """Fingerprint from per-tensor (name, dtype, shape, sha256 hex), in any order."""
    outer = hashlib.sha256()
    for name, dtype, shape, digest in sorted(entries):
        outer.update(json.dumps([name, dtype, list(shape), digest]).encode())
    return "sha256:" + outer.hexdigest()


def model_fingerprint(reader: CheckpointReader, progress: bool = False) -> str:
    """Content fingerprint of a checkpoint: independent of sharding and file names.

    SHA-256 over the sorted (name, dtype, shape, SHA-256 of bytes) of every tensor. Two folders
    holding the same weights have the same fingerprint however they were sharded.
    """
    names = sorted(reader.names())
    it: Iterable[str] = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc=f"fingerprint {reader.path.name}", unit="tensor", leave=False)
    rows = []
    for name in it:
        info = reader.info(name)
        rows.append((name, info.dtype, tuple(info.shape), tensor_digest(reader.get(name))))
    return combine_digests(rows)


def _header_bytes(entries: Sequence[tuple[str, str, Sequence[int], int, int]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class _Shard:
    """One output file being filled in order: header first, then each tensor's bytes."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, str, tuple[int, ...]]]):
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
        self.fh = open(path, "wb")
        self.fh.write(_header_bytes(layout))

    def write(self, data: memoryview) -> None:
        self.fh.write(data)
        self.next += 1

    @property
    def complete(self) -> bool:
        return self.next == len(self.order)

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()


class CheckpointWriter:
    """Writes a complete HF folder atomically: shards + index + sidecar files + metadata.

    Use as a context manager; ``add`` tensors, then ``commit``. On an exception, or without
    ``commit``, the temporary folder is removed and the destination is untouched.

    With ``plan(entries)`` called first, tensors must be added in the planned order (a tensor
    that arrives early waits in memory for its turn) and are streamed straight into their final
    shard. Without a plan, tensors may come in any order; each shard's bytes go to a side file
    and are copied behind the header when the shard is full.
    """

    def __init__(self, out_dir: str | os.PathLike[str], max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise CheckpointError(f"{self.out_dir}: already exists; choose another output folder or pass overwrite")
        if max_shard_bytes <= 0:
            raise CheckpointError("max_shard_bytes must be positive")
        self.max_shard_bytes = int(max_shard_bytes)
        self.overwrite = overwrite
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
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
            fname = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
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

    def add_part(self, name: str, part, final: bool) -> None:
        """Append the next rows of a planned tensor (the one the writer is waiting for), so a large
        tensor can be written as it is computed, chunk by chunk, without ever being whole in memory."""
        if self._planned is None:
            raise CheckpointError(f"{self.out_dir}: add_part needs a plan")
        if self._done:
            raise CheckpointError(f"{self.out_dir}: writer already committed or aborted")
        if self._cursor >= len(self._order) or self._order[self._cursor] != name or self._early:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} written in parts out of the planned order")
        t = part.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        dtype, shape = self._planned_info[name]
        if safetensors_dtype(t.dtype) != dtype or tuple(t.shape[1:]) != shape[1:]:
            raise CheckpointError(f"{self.out_dir}: part of tensor {name!r} is {list(t.shape)} {safetensors_dtype(t.dtype)}, planned {list(shape)} {dtype}")
        nbytes = t.numel() * t.element_size()
        si = self._shard_of[name]
        self._open_shard(si)
        shard = self._planned[si]
        shard.fh.write(tensor_bytes(t))
        self._part_bytes = getattr(self, "_part_bytes", 0) + nbytes
        self._total += nbytes
        if final:
            expect = TensorInfo(name, shape, dtype).nbytes
            if self._part_bytes != expect:
                raise CheckpointError(f"{self.out_dir}: tensor {name!r} was written with {self._part_bytes} bytes, planned {expect}")
            self._part_bytes = 0
            self._names.add(name)
            shard.next += 1
            self._cursor += 1

    def _open_shard(self, si: int) -> None:
        while len(self._planned) <= si:
            if self._planned:
                self._planned[-1].close()
            i = len(self._planned)
            self._planned.append(_Shard(self.tmp / self._weight_map[self._plan_specs[i][0][0]], self._plan_specs[i]))

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
                s.close()
            n = len(self._planned)
        else:
            self._close_spool()
            if not self._spooled:
                raise CheckpointError(f"{self.out_dir}: nothing to write, no tensor was added")
            n = len(self._spooled)
            for i, (path, names) in enumerate(self._spooled):
                final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
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
        for f in self.tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if self.out_dir.exists():
            # Swap in two renames so a reader sees either the old folder or the new one.
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            self.out_dir.rename(old)
            self.tmp.rename(self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.out_dir)
        self._done = True
        log.info("wrote %s (%d shard%s, %.1f MB)", self.out_dir, n, "" if n == 1 else "s", self._total / 1e6)
        return self.out_dir

    @property
    def bytes_written(self) -> int:
        return self._total

    def abort(self) -> None:
        if not self._done:
            for s in self._planned or []:
                try:
                    s.fh.close()
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
