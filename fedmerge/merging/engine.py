"""The merge engine: streams tensors from the inputs through a strategy into a new HF folder.

``merge(base_dir, inputs, out_dir, spec)`` is the one path every merge takes: the offline CLI
and the federation's coordinator both call it, so the same deltas give the same bytes.

What it guarantees:

- **Checks first.** Before a byte is written: the strategy and its parameters are valid for the
  number of inputs; every input has the base's architecture (config ``model_type`` and layer,
  head and size counts), the base's vocabulary (``vocab_size`` and tokenizer), and the base's
  tensor names and shapes. A method that needs a base is refused without one. Errors name the
  folder, file and tensor. Non-finite values are caught as tensors stream, naming the input and
  tensor; the partial output is then removed.
- **Bounded memory.** Tensors are visited group by group (``strategy.groups``); only the group
  being merged, the one being read ahead and the one being written are in memory, and a byte
  budget (``prefetch_bytes``) keeps read-ahead from piling up. A large tensor of an
  *elementwise* strategy is processed in row chunks, so memory does not even grow with the
  largest tensor. Inputs are read with positioned reads (no memory maps), and the output is
  streamed into shards whose headers are written first.
- **Overlap.** One thread reads (and takes deltas), the caller's thread computes, one thread
  writes; torch uses every core for the compute itself.
- **Reproducible.** Every random choice a strategy makes comes from ``TensorContext.generator``,
  seeded from (seed, tensor name): the same inputs, method, parameters and seed give the same
  bytes, whatever the device order, chunking or thread timing.
- **Atomic.** The output appears under ``out_dir`` only complete (see ``CheckpointWriter``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedmerge.errors import FedmergeError
from fedmerge.checkpoints import (
    FLOAT_DTYPES,
    CheckpointReader,
    CheckpointWriter,
    TensorInfo,
    combine_digests,
    safetensors_dtype,
    tensor_bytes,
    torch_dtype,
)
from fedmerge.checkpoints.compat import CompatibilityCheck
from fedmerge.merging.taskvector import DeltaCheckpoint, TaskVector, open_delta_source

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("float32", "float64", "bfloat16", "float16")


class MergeError(FedmergeError):
    """A merge cannot run as asked."""


class MissingBase(MergeError):
    """The method is defined relative to a base model and none was given."""


class NonFiniteTensor(MergeError):
    """An input (or the merge result) holds NaN or infinite values."""


class MergeSpec(BaseModel):
    """What to merge and how; everything but the inputs and where to write."""

    model_config = ConfigDict(extra="forbid")

    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    model_parameters: list[dict[str, Any]] = Field(default_factory=list, description="one dict per input, in input order")
    dtype: str = Field("float32", description="compute dtype")
    out_dtype: str | None = Field(None, description="dtype written; default: each tensor's dtype in the base")
    seed: int = 0
    device: str = "auto"
    max_shard_bytes: int = Field(2 * 1024**3, gt=0)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: every core")
    chunk_elements: int = Field(1 << 21, ge=1024, description="row-chunk size for elementwise strategies")
    prefetch_bytes: int = Field(256 * 1024**2, ge=0, description="read-ahead budget")
    read_workers: int | None = Field(None, ge=1, description="inputs loaded in parallel per tensor; default: min(inputs, cores)")
    check_finite: bool = True
    fingerprints: bool = True

    @field_validator("dtype")
    @classmethod
    def _compute_dtype(cls, v: str) -> str:
        v = _dtype_name(v)
        if v not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}")
        return v

    @field_validator("out_dtype")
    @classmethod
    def _out_dtype(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = _dtype_name(v)
        if v not in COMPUTE_DTYPES:
            raise ValueError(f"out_dtype must be one of {', '.join(COMPUTE_DTYPES)}")
        return v


def _dtype_name(v: str) -> str:
    v = str(v).strip().lower().removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32", "fp64": "float64"}.get(v, v)


@dataclass
class MergeResult:
    out_dir: Path
    seconds: float
    tensors: int
    bytes_written: int
    method: str
    metadata: dict[str, Any] = field(default_factory=dict)


# -- pre-flight checks ------------------------------------------------------------------------------
def check_compatible(base: CheckpointReader, sources: Sequence[Any]) -> None:
    """Refuse inputs that cannot be merged with ``base``, naming the input, file and tensor."""
    check = CompatibilityCheck(base, config=base.config, folder=base.folder)
    for src in sources:
        full_model = isinstance(src, TaskVector)
        folder = getattr(src, "folder", None)
        found = check.compare(
            src, complete=full_model, config=getattr(src, "config", None) or {},
            tokenizer_folder=folder if full_model and folder is not None else None,
        )  # fmt: skip
        where = folder if folder is not None else "?"
        file_of = src.file_of if hasattr(src, "file_of") else (lambda _name: where)
        found.raise_first(f"{src.label} ({where})", base.folder, file_of)


# -- work items ---------------------------------------------------------------------------------
@dataclass
class _Item:
    names: tuple[str, ...]
    rows: tuple[int, int] | None = None  # a row chunk of the single tensor in ``names``
    final: bool = True  # last chunk of its tensor (always True for whole tensors)
    passthrough: bool = False  # non-float tensor: the base's value is written unchanged
    nbytes: int = 0  # estimated peak bytes while in flight
    in_bytes: int = 0  # bytes of the base this item covers (for the progress bar)


def _plan_items(base: CheckpointReader, groups: Sequence[tuple[str, ...]], passthrough: Sequence[str], elementwise: bool, chunk_elements: int, n_inputs: int) -> list[_Item]:
    items: list[_Item] = []
    for g in groups:
        infos = [base.info(n) for n in g]
        numel = sum(i.numel for i in infos)
        per_elem = 4 * (n_inputs + 2)
        if elementwise and len(g) == 1 and len(infos[0].shape) >= 1 and infos[0].numel > chunk_elements and infos[0].shape[0] > 1:
            rows_total = infos[0].shape[0]
            row_numel = max(1, infos[0].numel // rows_total)
            step = max(1, chunk_elements // row_numel)
            for a in range(0, rows_total, step):
                b = min(rows_total, a + step)
                row_bytes = infos[0].nbytes // rows_total
                items.append(_Item(g, (a, b), b == rows_total, nbytes=(b - a) * row_numel * per_elem, in_bytes=(b - a) * row_bytes))
        else:
            items.append(_Item(tuple(g), nbytes=numel * per_elem, in_bytes=sum(i.nbytes for i in infos)))
    for n in passthrough:
        items.append(_Item((n,), passthrough=True, nbytes=base.info(n).nbytes, in_bytes=base.info(n).nbytes))
    return items


class _Budget:
    """Bytes in flight between the reader and the writer; the reader waits while over budget."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()
        self.cancelled = False

    def acquire(self, n: int) -> bool:
        with self.cond:
            while self.used and self.used + n > self.limit and not self.cancelled:
                self.cond.wait(0.5)
            self.used += n
            return not self.cancelled

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()


_DONE = object()


def _put(q: queue.Queue, item: Any, budget: _Budget) -> bool:
    while not budget.cancelled:
        try:
            q.put(item, timeout=0.5)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, budget: _Budget) -> Any:
    while True:
        try:
            return q.get(timeout=0.5)
        except queue.Empty:
            if budget.cancelled:
                return _DONE


# -- the merge -----------------------------------------------------------------------------------
def merge(
    base_dir: str | os.PathLike[str] | None,
    inputs: Sequence[Any],
    out_dir: str | os.PathLike[str],
    spec: MergeSpec,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> MergeResult:
    """Merge ``inputs`` (delta sources, or folders: models, LoRA adapters, delta checkpoints)
    relative to ``base_dir`` into a new HF folder at ``out_dir``.

    Without a base (``base_dir=None``), a method that does not need one uses the first input,
    which must then be a model folder, as the reference: its delta is zero and the algebra of
    weight-space methods (linear, slerp) is unchanged.
    """
    import torch

    from fedmerge.devices import resolve_device
    from fedmerge.merging.strategies import build_strategy, get_strategy_class

    t0 = time.perf_counter()
    _tune_malloc()
    if not inputs:
        raise MergeError("no inputs to merge")
    cls = get_strategy_class(spec.method)
    if base_dir is None:
        if cls.needs_base:
            raise MissingBase(f"merge method {cls.name!r} is defined relative to a base model; give one (base_model: in the config)")
        first = inputs[0]
        if not isinstance(first, (str, os.PathLike)):
            raise MissingBase("without a base, the first input must be a model folder to serve as the reference")
        base_dir = first
    base = CheckpointReader(base_dir)
    sources = [open_delta_source(x, base) if isinstance(x, (str, os.PathLike)) else x for x in inputs]
    n = len(sources)
    if spec.model_parameters and len(spec.model_parameters) != n:
        raise MergeError(f"model_parameters has {len(spec.model_parameters)} entries for {n} inputs")
    strategy = build_strategy(spec.method, spec.parameters, spec.model_parameters or [{}] * n, n_models=n)
    check_compatible(base, sources)
    device = resolve_device(spec.device)
    compute_dtype = getattr(torch, spec.dtype)
    config = base.config

    names = base.names()
    float_names = [nm for nm in names if base.info(nm).dtype in FLOAT_DTYPES]
    passthrough = [nm for nm in names if base.info(nm).dtype not in FLOAT_DTYPES]
    groups = [tuple(g) for g in strategy.groups(float_names, config)]
    grouped = [nm for g in groups for nm in g]
    if sorted(grouped) != sorted(float_names):
        raise MergeError(f"strategy {cls.name} grouped {len(grouped)} tensors for {len(float_names)} inputs; this is a bug in the strategy")
    elementwise = bool(getattr(strategy, "elementwise", False))
    items = _plan_items(base, groups, passthrough, elementwise, spec.chunk_elements, n)

    def out_info(nm: str) -> TensorInfo:
        bi = base.info(nm)
        if bi.dtype not in FLOAT_DTYPES or spec.out_dtype is None:
            return bi
        return TensorInfo(nm, bi.shape, safetensors_dtype(spec.out_dtype))

    plan = [out_info(nm) for g in groups for nm in g] + [out_info(nm) for nm in passthrough]
    out_torch = {i.name: torch_dtype(i.dtype) for i in plan}
    for s in sources:
        rec = getattr(s, "digests", None)
        if rec is not None:
            rec.enabled = spec.fingerprints
    base_digests: dict[str, Any] = {}
    base_done: dict[str, str] = {}

    budget = _Budget(spec.prefetch_bytes)
    loaded: queue.Queue = queue.Queue(maxsize=2)
    written: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        budget.cancel()

    def load(item: _Item):
        bases, deltas = [], []
        for nm in item.names:
            raw = base.get(nm, rows=item.rows)
            if spec.fingerprints:
                _feed_base(base_digests, base_done, base.info(nm), raw, item.rows)
            if item.passthrough:
                return raw, None
            b32 = raw.float()
            if spec.check_finite and not _all_finite(b32):
                raise NonFiniteTensor(f"base {base.file_of(nm)}: tensor {nm!r} holds NaN or infinite values")

            def one_delta(src, nm=nm, b32=b32):
                d = _get_delta(src, nm, item.rows, b32) if nm in _names_of(src) else None
                if d is None:
                    return _to(torch.zeros_like(b32), device, compute_dtype)
                if spec.check_finite and not _all_finite(d):
                    file = src.file_of(nm) if hasattr(src, "file_of") else src.folder
                    raise NonFiniteTensor(f"input {src.label} ({file}): tensor {nm!r} holds NaN or infinite values")
                return _to(d, device, compute_dtype)

            # Reading, converting, subtracting and hashing each input is independent of the
            # others (and releases the GIL), so the inputs of one tensor load side by side. Each
            # input is still visited in tensor order, which its running digest relies on.
            per_model = list(pool.map(one_delta, sources)) if pool is not None else [one_delta(src) for src in sources]
            bases.append(_to(b32, device, compute_dtype))
            deltas.append(per_model)
        return bases, deltas

    workers = min(n, spec.read_workers or os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedmerge-load") if workers > 1 else None

    def reader() -> None:
        try:
            for item in items:
                if not budget.acquire(item.nbytes):
                    return
                if not _put(loaded, (item, load(item)), budget):
                    return
            _put(loaded, _DONE, budget)
        except BaseException as exc:  # surfaced in the caller's thread
            fail(exc)

    writer_obj = CheckpointWriter(out_dir, max_shard_bytes=spec.max_shard_bytes, overwrite=overwrite)

    def writer_loop() -> None:
        try:
            while True:
                got = _get(written, budget)
                if got is _DONE:
                    return
                item, outputs = got
                for nm, t in zip(item.names, outputs):
                    if item.rows is None:
                        writer_obj.add(nm, t)
                    else:
                        writer_obj.add_part(nm, t, final=item.final)
                budget.release(item.nbytes)
        except BaseException as exc:
            fail(exc)

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads or os.cpu_count() or 1)
    bar = None
    try:
        with writer_obj:
            writer_obj.plan(plan)
            threads = [threading.Thread(target=reader, name="fedmerge-read", daemon=True), threading.Thread(target=writer_loop, name="fedmerge-write", daemon=True)]
            for th in threads:
                th.start()
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=sum(base.info(nm).nbytes for nm in names), desc=f"merge {cls.name}", unit="B", unit_scale=True, dynamic_ncols=True)
            try:
                while True:
                    got = _get(loaded, budget)
                    if got is _DONE:
                        break
                    item, payload = got
                    if item.passthrough:
                        outputs = [payload[0]]
                    else:
                        outputs = _compute(strategy, item, payload, spec, device, config, out_torch)
                    # Drop the inputs now, not when the next item arrives: for the largest tensor
                    # they are most of the working set.
                    del got, payload
                    if not _put(written, (item, outputs), budget):
                        break
                    if bar is not None:
                        bar.update(item.in_bytes)
                if not errors:
                    _put(written, _DONE, budget)
            except BaseException as exc:
                fail(exc)
            for th in threads:
                th.join()
            if errors:
                raise errors[0]
            meta = _metadata(spec, cls, base, sources, base_done, metadata)
            writer_obj.commit(sidecars_from=base.folder, metadata=meta)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        torch.set_num_threads(prev_threads)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    log.info("merged %d inputs with %s into %s in %.1f s", n, cls.name, out_dir, seconds)
    return MergeResult(Path(out_dir), seconds, len(names), writer_obj.bytes_written, cls.name, meta)


def _all_finite(t) -> bool:
    """Whether a float tensor holds no NaN or infinity.

    A sum is one cheap pass and is non-finite whenever an element is; only then (or on the
    rare overflow of huge finite values) is the exact, much slower elementwise test run.
    """
    import torch

    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Keep freed tensor memory for reuse instead of returning it to the OS after every tensor.

    glibc serves large blocks with fresh mmaps and unmaps them on free; every new tensor then pays
    a page fault per 4 KiB page, which costs more than the arithmetic. Raising the mmap threshold
    to its maximum (32 MiB; the engine's row chunks stay below it) and the trim threshold makes
    blocks recycle inside the process. Peak memory is unchanged: it is still the live set.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _get_delta(src, name: str, rows, b32):
    """Call a delta source with the engine's extensions (``rows=``, ``base=``) when it takes them;
    a source that implements only the contract's ``get_delta(name)`` is sliced here instead."""
    takes = getattr(src, "_engine_kwargs", None)
    if takes is None:
        import inspect

        try:
            params = inspect.signature(src.get_delta).parameters
            takes = ("rows" in params and "base" in params) or any(p.kind is p.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            takes = False
        try:
            src._engine_kwargs = takes
        except AttributeError:
            pass
    if takes:
        return src.get_delta(name, rows=rows, base=b32)
    d = src.get_delta(name)
    if d is not None:
        d = d.float()
        if rows is not None:
            d = d[rows[0] : rows[1]]
    return d


def _names_of(src) -> set[str]:
    cached = getattr(src, "_engine_names", None)
    if cached is None:
        cached = set(src.names())
        try:
            src._engine_names = cached
        except AttributeError:
            pass
    return cached


def _to(t, device: str, dtype):
    if t.dtype != dtype:
        t = t.to(dtype)
    if device != "cpu":
        t = t.to(device, non_blocking=True)
    return t


def _feed_base(open_: dict[str, Any], done: dict[str, str], info: TensorInfo, raw, rows) -> None:
    h = open_.get(info.name)
    if h is None:
        if rows is not None and rows[0] != 0:
            return
        h = open_[info.name] = hashlib.sha256()
    h.update(tensor_bytes(raw))
    if rows is None or rows[1] == info.shape[0]:
        done[info.name] = open_.pop(info.name).hexdigest()


def _compute(strategy, item: _Item, payload, spec: MergeSpec, device: str, config: dict[str, Any], out_torch: dict[str, Any]) -> list[Any]:
    import torch

    from fedmerge.merging.strategies import TensorContext

    bases, deltas = payload
    contexts = [TensorContext(name=nm, model_params=strategy.model_params, seed=spec.seed, device=device, config=config) for nm in item.names]
    with torch.no_grad():
        if len(item.names) == 1:
            merged = [strategy.merge_tensor(contexts[0], bases[0], deltas[0])]
        else:
            merged = list(strategy.merge_group(contexts, bases, deltas))
    outs = []
    for nm, m in zip(item.names, merged):
        if spec.check_finite and not _all_finite(m):
            raise NonFiniteTensor(f"merge result for tensor {nm!r} holds NaN or infinite values (method {strategy.name}); check its parameters")
        outs.append(m.to(out_torch[nm]).cpu() if m.device.type != "cpu" else m.to(out_torch[nm]))
    return outs


def _metadata(spec: MergeSpec, cls, base: CheckpointReader, sources: Sequence[Any], base_done: dict[str, str], extra: dict[str, Any] | None) -> dict[str, Any]:
    from fedmerge import __version__ as version

    base_fp = None
    if spec.fingerprints and all(nm in base_done for nm in base.names()):
        base_fp = combine_digests((nm, base.info(nm).dtype, base.info(nm).shape, base_done[nm]) for nm in base.names())
    inputs = []
    for s in sources:
        if hasattr(s, "describe"):
            inputs.append(s.describe())
        else:
            inputs.append({"label": s.label, "kind": type(s).__name__})
    meta = {
        "fedmerge_version": version,
        "method": cls.name,
        "parameters": spec.parameters,
        "model_parameters": spec.model_parameters,
        "seed": spec.seed,
        "dtype": spec.dtype,
        "out_dtype": spec.out_dtype,
        "base": {"path": str(base.folder), "fingerprint": base_fp},
        "inputs": inputs,
    }
    if extra:
        meta.update(extra)
    return meta


def iter_groups(strategy, names: Sequence[str], config: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """The groups the engine will visit, in order (for tools that want to mirror its plan)."""
    yield from (tuple(g) for g in strategy.groups(names, config))


__all__ = ["MergeSpec", "MergeResult", "merge", "MergeError", "MissingBase", "NonFiniteTensor", "check_compatible", "DeltaCheckpoint", "TaskVector"]
