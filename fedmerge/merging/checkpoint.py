"""Hugging Face model folders in and out, one tensor at a time.

Reading: a folder with ``model.safetensors`` or sharded ``*.safetensors`` plus
``model.safetensors.index.json``. Tensors are opened lazily through ``safe_open`` so nothing
but the tensor asked for is in memory. Pickled weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``)
are refused, never unpickled.

Writing: ``CheckpointWriter`` fills shards of a bounded size in a hidden temporary folder next
to the destination and renames it into place only when every shard, the index, the config and
tokenizer files and the metadata are written. A merge that fails leaves nothing that looks like
a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

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


_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def dtype_nbytes(dtype: str) -> int:
    return _SAFETENSORS_DTYPE_BYTES.get(dtype, 4)


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickledWeightsRefused(
            f"{folder}: only pickled weights found ({', '.join(pickles[:3])}); fedmerge never unpickles. "
            "Convert them once in a trusted environment, e.g. "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)`."
        )
    raise CheckpointError(f"{folder}: no model.safetensors, no {INDEX_NAME} and no *.safetensors file")


class CheckpointReader:
    """Lazy, read-only view of the tensors of one model folder (or one .safetensors file)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such model folder or file")
        self._handles: dict[Path, Any] = {}
        self._weight_map: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self._expected: set[str] = set()
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                if self.path.suffix in PICKLE_SUFFIXES:
                    _refuse_pickles(self.path.parent)
                raise CheckpointError(f"{self.path}: not a .safetensors file")
            files = [self.path]
            self.folder = self.path.parent
        else:
            self.folder = self.path
            index = self.path / INDEX_NAME
            if index.exists():
                files = self._read_index(index)
            elif (self.path / SINGLE_NAME).exists():
                files = [self.path / SINGLE_NAME]
            else:
                files = sorted(p for p in self.path.glob("*.safetensors") if not p.name.startswith("adapter_"))
                if not files:
                    _refuse_pickles(self.path)
        for f in files:
            self._scan(f)
        missing = sorted(self._expected - set(self._info))
        if missing:
            raise MissingTensor(f"{self.path / INDEX_NAME}: lists {missing[0]!r} ({len(missing)} in all), not found in any shard")
        if not self._info:
            raise CheckpointError(f"{self.path}: the checkpoint holds no tensors")

    def _read_index(self, index: Path) -> list[Path]:
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = sorted({self.path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing")
        self._expected = set(weight_map)
        return files

    def _scan(self, file: Path) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises several types for a corrupt header
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
        self._handles[file] = handle
        for name in handle.keys():
            if name in self._weight_map:
                raise CheckpointError(f"{file}: tensor {name!r} also appears in {self._weight_map[name].name}")
            sl = handle.get_slice(name)
            self._weight_map[name] = file
            self._info[name] = TensorInfo(name, tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))

    # -- queries ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in the order they are stored (by shard, then by name)."""
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def __len__(self) -> int:
        return len(self._info)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._info[name]
        except KeyError:
            raise MissingTensor(f"{self.path}: no tensor named {name!r}") from None

    def file_of(self, name: str) -> Path:
        self.info(name)
        return self._weight_map[name]

    def get(self, name: str):
        """Load one tensor (on the CPU, in its stored dtype)."""
        self.info(name)
        try:
            return self._handles[self._weight_map[name]].get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{self._weight_map[name]}: tensor {name!r} cannot be read ({exc})") from exc

    def total_bytes(self) -> int:
        return sum(i.numel * dtype_nbytes(i.dtype) for i in self._info.values())

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
        self._handles.clear()

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


def model_fingerprint(reader: CheckpointReader, progress: bool = False) -> str:
    """Content fingerprint of a checkpoint: independent of sharding and file names.

    SHA-256 over the sorted (name, dtype, shape, SHA-256 of bytes) of every tensor. Two folders
    holding the same weights have the same fingerprint however they were sharded.
    """
    outer = hashlib.sha256()
    names = sorted(reader.names())
    it: Iterable[str] = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc=f"fingerprint {reader.path.name}", unit="tensor", leave=False)
    for name in it:
        info = reader.info(name)
        outer.update(json.dumps([name, info.dtype, list(info.shape), tensor_digest(reader.get(name))]).encode())
    return "sha256:" + outer.hexdigest()


class CheckpointWriter:
    """Writes a complete HF folder atomically: shards + index + sidecar files + metadata.

    Use as a context manager; ``add`` tensors in any order, then ``commit``. On an exception,
    or without ``commit``, the temporary folder is removed and the destination is untouched.
    """

    def __init__(self, out_dir: str | os.PathLike[str], max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise CheckpointError(f"{self.out_dir}: already exists; choose another output folder or pass overwrite")
        if max_shard_bytes <= 0:
            raise CheckpointError("max_shard_bytes must be positive")
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
        self._pending: dict[str, Any] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._total = 0
        self._done = False

    def add(self, name: str, tensor) -> None:
        if name in self._names:
            raise CheckpointError(f"tensor {name!r} written twice")
        self._names.add(name)
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = t.contiguous()
        self._pending_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        path = self.tmp / f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def commit(self, sidecars_from: str | os.PathLike[str] | None = None, metadata: dict[str, Any] | None = None) -> Path:
        """Finish the folder and move it into place; returns the destination."""
        self._flush()
        if not self._shards:
            raise CheckpointError(f"{self.out_dir}: nothing to write, no tensor was added")
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self._shards):
            final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.tmp / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
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

    def abort(self) -> None:
        if not self._done:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._done = True

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()
