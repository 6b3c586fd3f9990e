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
  being merged, the ones being read ahead and the ones being written are in memory, and a byte
  budget (``prefetch_bytes``) keeps read-ahead from piling up. A large tensor of an
  *elementwise* strategy is processed in row chunks; a tensor of a whole-tensor method (TIES,
  DARE, DELLA, Breadcrumbs, Model Stock, SLERP, hierarchical, the spectral methods' tall
  matrices) larger than ``stream_elements`` is merged as its ``StreamedTensor``: statistics
  passes over fixed chunks read again from the inputs, then the output chunk by chunk. Memory
  then follows the chunk, not the largest tensor (an attention block of hierarchical and a wide
  matrix of a spectral method are held whole; neither grows with the vocabulary). Inputs are
  read with positioned reads (no memory maps), and the output is streamed into shards whose
  headers are written first.
- **Overlap.** The stages run in the bottom layer's bounded pipeline
  (``fedmerge.checkpoints.pipeline``): one thread reads (and takes deltas, and runs the statistics
  passes of streamed tensors), one computes, one writes; torch uses every core for the compute.
- **Reproducible.** Every random choice a strategy makes comes from ``TensorContext.generator``,
  seeded from (seed, tensor name): the same inputs, method, parameters and seed give the same
  bytes, whatever the device order, chunking or thread timing.
- **Atomic.** The output appears under ``out_dir`` only complete (see ``CheckpointWriter``).
- **Loads as written.** ``config.json`` states the dtype the weights are stored in (``dtype`` and
  ``torch_dtype``), the layer count of a renumbered stack and the size of a new vocabulary.

``merge`` maps every base tensor to the same-named tensor of every input with one parameter set;
``merge_layout`` follows a ``MergeLayout`` (per-tensor parameters, slices, copies, remapped
embeddings; see ``fedmerge.merging.layout``). Both run a ``MergeRun``. Every input is a
``DeltaSource`` (``fedmerge.merging.source``); an object that is not one is refused before
anything is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedmerge.checkpoints import (
    FLOAT_DTYPES,
    CheckpointReader,
    CheckpointWriter,
    IncompatibleCheckpoint,
    TensorInfo,
    combine_digests,
    safetensors_dtype,
    tensor_bytes,
    torch_dtype,
    torch_name,
)
from fedmerge.checkpoints.buffers import BufferPool
from fedmerge.checkpoints.compat import CompatibilityCheck
from fedmerge.checkpoints.finite import all_finite
from fedmerge.checkpoints.pipeline import ByteBudget, Stage, run_pipeline
from fedmerge.devices import torch_threads
from fedmerge.errors import FedmergeError
from fedmerge.merging.layout import MergeLayout, OutputTensor, identity_layout
from fedmerge.merging.source import DeltaSource, require_delta_source
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
    stream_elements: int = Field(
        1 << 24, ge=1, description="a tensor of a whole-tensor method larger than this is merged in passes over chunks read again from the inputs"
    )
    prefetch_bytes: int = Field(128 * 1024**2, ge=0, description="read-ahead budget")
    read_workers: int | None = Field(None, ge=1, description="inputs loaded in parallel per tensor; default: min(inputs, cores)")
    reuse_buffers_from: int = Field(
        16 * 1024**2, ge=0, description="whole tensors of at least this many bytes are read and widened into reused CPU buffers (0: never)"
    )
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
def check_compatible(base: CheckpointReader, sources: Sequence[DeltaSource]) -> None:
    """Refuse inputs that cannot be merged with ``base``, naming the input, file and tensor."""
    check = CompatibilityCheck(base, config=base.config, folder=base.folder)
    for src in sources:
        tokenizer = src.folder if src.complete and src.folder is not None else None
        found = check.compare(src, complete=src.complete, config=src.config or {}, tokenizer_folder=tokenizer)
        found.raise_first(f"{src.label} ({src.folder if src.folder is not None else '?'})", base.folder, src.file_of)


# -- work items ---------------------------------------------------------------------------------
@dataclass
class _Streamed:
    """A tensor merged as its strategy's ``StreamedTensor``: the fitted object and the reader of
    its output pass, shared by its work items (the read stage fits it, the compute stage merges)."""

    ot: OutputTensor
    tensor: Any  # StreamedTensor
    feed: "_FlatFeed | None" = None
    checked: bool = False  # a statistics pass has checked every input chunk for non-finite values


@dataclass
class _Item:
    names: tuple[str, ...]  # output tensor names
    strategy: int | None = None  # index into the run's strategies; None: copied from the reference
    rows: tuple[int, int] | None = None  # a row chunk of the single tensor in ``names``
    span: tuple[int, int] | None = None  # an element range of a streamed tensor's output
    streamed: _Streamed | None = None  # set on every item of a streamed tensor
    final: bool = True  # last chunk of its tensor (always True for whole tensors)
    nbytes: int = 0  # estimated peak bytes while in flight
    in_bytes: int = 0  # bytes of the reference this item covers (for the progress bar)

    @property
    def copy(self) -> bool:
        return self.strategy is None

    @property
    def fit(self) -> bool:
        """The statistics passes of a streamed tensor (reads, writes nothing)."""
        return self.streamed is not None and self.span is None


class OutputFiles(Protocol):
    """Files a caller adds to the output folder beside the weights (model card, tokenizer, the
    config it ran from). ``write`` is called once every tensor is written, before the folder is
    committed; it writes into ``folder`` (the hidden temporary folder) and returns the names of
    the sidecar files it wrote, so the base's copies of them are not copied over them."""

    def write(self, folder: Path, metadata: dict[str, Any]) -> set[str]: ...


# -- the merge -----------------------------------------------------------------------------------
def merge(
    base_dir: str | os.PathLike[str] | None,
    inputs: Sequence[Any],
    out_dir: str | os.PathLike[str],
    spec: MergeSpec,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    durable: bool = True,
    direct: bool = True,
) -> MergeResult:
    """Merge ``inputs`` (delta sources, or folders: models, LoRA adapters, delta checkpoints)
    relative to ``base_dir`` into a new HF folder at ``out_dir`` (``durable=False``: a scratch
    folder, not fsynced; ``direct=False``: written through the page cache, for an output that is
    read again at once; see ``CheckpointWriter``).

    Without a base (``base_dir=None``), a method that does not need one uses the first input,
    which must then be a model folder, as the reference: its delta is zero and the algebra of
    weight-space methods (linear, slerp) is unchanged.
    """
    from fedmerge.merging.strategies import get_strategy_class

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
    sources = [open_delta_source(x, base) if isinstance(x, (str, os.PathLike)) else require_delta_source(x, f"merge input #{i}") for i, x in enumerate(inputs)]
    n = len(sources)
    if spec.model_parameters and len(spec.model_parameters) != n:
        raise MergeError(f"model_parameters has {len(spec.model_parameters)} entries for {n} inputs")
    layout = identity_layout(base, n, spec.parameters, spec.model_parameters or [{}] * n)
    return MergeRun(layout, sources, out_dir, spec, progress=progress, metadata=metadata, overwrite=overwrite, durable=durable, direct=direct).run()


def merge_layout(
    layout: MergeLayout,
    sources: Sequence[Any],
    out_dir: str | os.PathLike[str],
    spec: MergeSpec,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    outputs: OutputFiles | None = None,
) -> MergeResult:
    """Merge following ``layout`` (per-tensor inputs, references and parameters) into ``out_dir``.

    ``spec.method`` names the strategy for every tensor that is not a copy; ``spec.parameters`` and
    ``spec.model_parameters`` are recorded but the layout's parameter sets are what each tensor uses.
    """
    return MergeRun(layout, sources, out_dir, spec, progress=progress, metadata=metadata, overwrite=overwrite, outputs=outputs).run()


class MergeRun:
    """One merge, from open inputs to a committed folder, in three stages:

    ``prepare`` (strategies per parameter set, compatibility, the work items and the output
    plan), ``stream`` (read -> compute -> write, the bottom layer's bounded pipeline), ``finish``
    (config, sidecar and caller files, metadata, atomic commit).
    """

    def __init__(
        self,
        layout: MergeLayout,
        sources: Sequence[Any],
        out_dir: str | os.PathLike[str],
        spec: MergeSpec,
        progress: bool = True,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
        outputs: OutputFiles | None = None,
        durable: bool = True,
        direct: bool = True,
    ):
        self.layout = layout
        self.sources: list[DeltaSource] = [require_delta_source(s, f"merge input #{i}") for i, s in enumerate(sources)]
        self.out_dir = Path(out_dir)
        self.spec = spec
        self.progress = progress
        self.extra_metadata = metadata
        self.overwrite = overwrite
        self.durable = durable
        self.direct = direct
        self.outputs = outputs
        self.reference = layout.references[0]
        self.tensors = layout.by_name()
        self.names_of = [set(s.names()) for s in self.sources]

    # -- stage 1 --------------------------------------------------------------------------------
    def prepare(self) -> None:
        import torch

        from fedmerge.devices import resolve_device
        from fedmerge.merging.strategies import get_strategy_class
        from fedmerge.merging.strategies.base import Workspace

        # A layout of copies only (mergekit's passthrough) runs no strategy at all.
        self.cls = get_strategy_class(self.spec.method) if self.layout.parameter_sets else None
        self.method = self.cls.name if self.cls is not None else self.spec.method
        self.strategies = self._build_strategies()
        if self.layout.identity:
            check_compatible(self.reference, self.sources)
        else:
            check_layout(self.layout, self.sources)
        self.device = resolve_device(self.spec.device)
        self.compute_dtype = getattr(torch, self.spec.dtype)
        self.workspace = Workspace()
        self.config = output_config(self.layout, self.spec, self._out_dtype_name())
        self.items = self._plan_items()
        self.plan = [self._out_info(nm) for item in self.items if item.final and not item.fit for nm in item.names]
        self.out_torch = {i.name: torch_dtype(i.dtype) for i in self.plan}
        for s in self.sources:
            s.record_digests(self.spec.fingerprints)

    def _build_strategies(self) -> list[Any]:
        from fedmerge.merging.strategies import build_strategy

        out = []
        for ps in self.layout.parameter_sets:
            n = len(ps.model_params)
            out.append(build_strategy(self.spec.method, ps.params, list(ps.model_params), n_models=n))
        return out

    def _is_float(self, ot: OutputTensor) -> bool:
        return self.layout.references[ot.reference].info(ot.reference_name).dtype in FLOAT_DTYPES

    def _plan_items(self) -> list[_Item]:
        """Items in output order: tensors sharing a parameter set and inputs are grouped as their
        strategy groups them; a large tensor of an elementwise strategy is cut in row chunks, one
        of a whole-tensor strategy is streamed (see ``_streamed_items``)."""
        buckets: dict[tuple, list[str]] = {}
        copies: list[str] = []
        for ot in self.layout.tensors:
            if ot.is_copy or not self._is_float(ot):
                copies.append(ot.name)
            else:
                buckets.setdefault((ot.params, tuple(i for i, _ in ot.inputs)), []).append(ot.name)
        items: list[_Item] = []
        for (params, inputs), names in buckets.items():
            strategy = self.strategies[params]
            groups = [tuple(g) for g in strategy.groups(names, self.config)]
            grouped = [nm for g in groups for nm in g]
            if sorted(grouped) != sorted(names):
                raise MergeError(f"strategy {self.method} grouped {len(grouped)} tensors for {len(names)} inputs; this is a bug in the strategy")
            for g in groups:
                items.extend(self._items_for(g, params, strategy, len(inputs)))
        for nm in copies:
            info = self._ref_info(self.tensors[nm])
            items.append(_Item((nm,), None, nbytes=info.nbytes, in_bytes=info.nbytes))
        return items

    def _ref_info(self, ot: OutputTensor) -> TensorInfo:
        return self.layout.references[ot.reference].info(ot.reference_name)

    def _items_for(self, g: tuple[str, ...], params: int, strategy, n_inputs: int) -> list[_Item]:
        infos = [self._ref_info(self.tensors[nm]) for nm in g]
        # Bytes per element in flight: the reference, one delta per input and the result, in
        # float32; a whole-tensor method also keeps working copies about as large again.
        per_elem = 4 * (n_inputs + 2)
        working = per_elem if strategy.elementwise else 4 * (2 * n_inputs + 4)
        remapped = self.layout.vocab is not None and any(self.tensors[nm].embedding for nm in g)
        info = infos[0]
        if len(g) == 1 and not remapped and len(info.shape) >= 1 and info.shape[0] > 1:
            if strategy.elementwise and info.numel > self.spec.chunk_elements:
                return self._row_items(g, params, info, per_elem)
            if not strategy.elementwise and info.numel > self.spec.stream_elements and strategy.streams(g[0], tuple(info.shape)):
                return self._streamed_items(g[0], params, strategy, info, per_elem, working, n_inputs)
        return [_Item(tuple(g), params, nbytes=sum(i.numel for i in infos) * working, in_bytes=sum(i.nbytes for i in infos))]

    def _row_items(self, g, params: int, info: TensorInfo, per_elem: int) -> list[_Item]:
        rows_total = info.shape[0]
        row_numel = max(1, info.numel // rows_total)
        step = max(1, self.spec.chunk_elements // row_numel)
        row_bytes = info.nbytes // rows_total
        out = []
        for a in range(0, rows_total, step):
            b = min(rows_total, a + step)
            out.append(_Item(g, params, rows=(a, b), final=b == rows_total, nbytes=(b - a) * row_numel * per_elem, in_bytes=(b - a) * row_bytes))
        return out

    def _streamed_items(self, name: str, params: int, strategy, info: TensorInfo, per_elem: int, working: int, n_inputs: int) -> list[_Item]:
        """A fitting item (the strategy's statistics passes, run by the read stage: a chunk of
        every input and the strategy's working space) and one item per chunk of the output."""
        from fedmerge.merging.strategies import TensorContext

        ctx = TensorContext(name=name, model_params=strategy.model_params, seed=self.spec.seed, device=self.device, config=self.config, workspace=self.workspace)
        tensor = strategy.streamed(ctx, tuple(info.shape), self.compute_dtype, [True] * n_inputs)
        holder = _Streamed(self.tensors[name], tensor)
        elem_bytes = info.nbytes // max(1, info.numel)
        biggest = max(e - s for s, e in tensor.chunks)
        items = [_Item((name,), params, streamed=holder, final=False, nbytes=biggest * working)]
        for j, (s, e) in enumerate(tensor.chunks):
            last = j == len(tensor.chunks) - 1
            items.append(_Item((name,), params, span=(s, e), streamed=holder, final=last, nbytes=(e - s) * per_elem, in_bytes=(e - s) * elem_bytes))
        return items

    def _out_dtype_name(self) -> str | None:
        """The dtype every float output tensor has, or None when they differ."""
        if self.spec.out_dtype is not None:
            return self.spec.out_dtype
        found = {self._ref_info(ot).dtype for ot in self.layout.tensors if self._is_float(ot)}
        return torch_name(found.pop()) if len(found) == 1 else None

    def _out_info(self, nm: str) -> TensorInfo:
        ot = self.tensors[nm]
        ri = self._ref_info(ot)
        shape = tuple(ri.shape)
        if ot.embedding and self.layout.vocab is not None:
            shape = (self.layout.vocab.rows, *shape[1:])
        if ri.dtype not in FLOAT_DTYPES or self.spec.out_dtype is None:
            return TensorInfo(nm, shape, ri.dtype)
        return TensorInfo(nm, shape, safetensors_dtype(self.spec.out_dtype))

    # -- stage 2: read ---------------------------------------------------------------------------
    def _read(self, item: _Item, _value=None):
        """What the compute stage needs for ``item``: (references, deltas) for a merged item, the
        finished tensors of a copied one, a chunk of a streamed tensor; a fitting item runs the
        statistics passes here and hands on nothing."""
        if item.streamed is not None:
            return self._fit(item.streamed) if item.fit else self._read_span(item)
        bases, deltas = [], []
        for nm in item.names:
            ot = self.tensors[nm]
            if ot.embedding and self.layout.vocab is not None:
                b32, per_model = self._load_remapped(ot)
                if item.copy:
                    return [b32 if ot.scale is None else b32.mul_(ot.scale)], None
            elif item.copy:
                raw = self._reference_rows(ot, item.rows)
                if not raw.is_floating_point():
                    self._check_reference(ot, raw, None, item.rows, check=False)
                    return [raw], None
                b32 = raw.float()
                self._check_reference(ot, raw, b32, item.rows)
                return [raw if ot.scale is None else b32.mul_(ot.scale)], None
            else:
                b32, per_model = self._read_rows(ot, item.rows, check=True, pooled=item.rows is None)
            bases.append(_to(b32, self.device, self.compute_dtype))
            deltas.append(per_model)
        return bases, deltas

    def _reference_rows(self, ot: OutputTensor, rows):
        return self.layout.references[ot.reference].get(ot.reference_name, rows=rows)

    def _check_reference(self, ot: OutputTensor, raw, b32, rows, check: bool = True) -> None:
        """Hash the reference's raw rows for the base's fingerprint; refuse non-finite values."""
        self._hash_reference(ot, raw, rows)
        self._reference_finite(ot, b32, check)

    def _hash_reference(self, ot: OutputTensor, raw, rows) -> None:
        nm = ot.name
        if self.spec.fingerprints and ot.reference == 0 and ot.reference_name == nm and nm not in self.base_done:
            _feed_base(self.base_digests, self.base_done, self.layout.references[0].info(nm), raw, rows)

    def _reference_finite(self, ot: OutputTensor, b32, check: bool) -> None:
        if b32 is not None and check and self.spec.check_finite and not all_finite(b32):
            ref_reader = self.layout.references[ot.reference]
            raise NonFiniteTensor(f"reference {ref_reader.file_of(ot.reference_name)}: tensor {ot.reference_name!r} holds NaN or infinite values")

    def _read_rows(self, ot: OutputTensor, rows, check: bool, pooled: bool = False):
        """(reference rows, one delta per input) in the compute dtype, on the device.

        The inputs' deltas are computed by the loader threads and the reference's rows hashed by
        the hashing thread while this one checks them: no share of the work waits for another
        (the base's hashing and checks, done first, were the longest chain of a merge).
        ``pooled``: a whole tensor, read into the run's reusable buffers (``_compute`` gives
        them back).
        """
        import torch

        pool = self.buffers if pooled else None
        raw = self._reference_rows(ot, rows)
        b32 = raw.float() if pool is None else pool.empty(tuple(raw.shape), torch.float32).copy_(raw)
        one = self._delta_loader(ot, rows, b32, check)
        if self.pool is None:  # one input, or one core: in turn, the reference first
            self._check_reference(ot, raw, b32, rows, check)
            results = [one(p) for p in ot.inputs]
        else:
            pending = [self.pool.submit(one, p) for p in ot.inputs]
            if self.hasher is not None:
                pending.append(self.hasher.submit(self._hash_reference, ot, raw, rows))
            else:
                self._hash_reference(ot, raw, rows)
            try:
                self._reference_finite(ot, b32, check)
            except BaseException:
                for f in pending:  # let the loaders finish with b32 before it is dropped
                    if not f.cancel():
                        f.exception()
                raise
            results = [f.result() for f in pending][: len(ot.inputs)]
        base = _to(b32, self.device, self.compute_dtype, pool)
        if pool is not None:
            pool.give(raw)  # hashed and widened
            if base is not b32 and self.device == "cpu":  # (a copy to the device may still be reading it)
                pool.give(b32)  # every delta is taken
        return base, results

    def _delta_loader(self, ot: OutputTensor, rows, b32, check: bool = True):
        import torch

        check = check and self.spec.check_finite

        def one_delta(pair):
            i, name = pair
            src = self.sources[i]
            d = src.get_delta(name, rows=rows, base=b32) if name in self.names_of[i] else None
            if d is None:
                return _to(torch.zeros_like(b32), self.device, self.compute_dtype)
            if check and not all_finite(d):
                raise NonFiniteTensor(f"input {src.label} ({src.file_of(name)}): tensor {name!r} holds NaN or infinite values")
            out = _to(d, self.device, self.compute_dtype, self.buffers if rows is None else None)
            if out is not d and self.buffers is not None and self.device == "cpu":
                self.buffers.give(d)  # computed in another dtype: the float32 delta is done with
            return out

        # Reading, converting, subtracting and hashing each input is independent of the others
        # (and releases the GIL), so the inputs of one tensor load side by side. Each input is
        # still visited in tensor order, which its running digest relies on.
        return one_delta

    def _load_remapped(self, ot: OutputTensor):
        """Embedding rows re-indexed to the output vocabulary, for the reference and every input;
        deltas are taken after the remap (the vocabulary plan fills rows a model lacks)."""
        ref_reader = self.layout.references[ot.reference]
        ref_key = self.layout.reference_keys[ot.reference]
        weights = {ref_key: ref_reader.get(ot.reference_name).float()}
        for i, name in ot.inputs:
            key = self.layout.input_keys[i]
            if key not in weights:
                reference = weights[ref_key]
                weights[key] = self.sources[i].weight(name, reference).float() if name in self.names_of[i] else reference.clone()
        for key, w in weights.items():
            if self.spec.check_finite and not all_finite(w):
                raise NonFiniteTensor(f"{key}: tensor {ot.reference_name!r} holds NaN or infinite values")
        remapped = self.layout.vocab.remap(weights)
        b32 = remapped[ref_key]
        deltas = [_to(remapped[self.layout.input_keys[i]] - b32, self.device, self.compute_dtype) for i, _ in ot.inputs]
        return b32, deltas

    def _lend_buffers(self, pool) -> None:
        """Let the references and the inputs that can read into ``pool`` do so (None: stop)."""
        for obj in [*self.layout.references, *self.sources]:
            hook = getattr(obj, "use_buffers", None)
            if hook is not None:
                hook(pool)

    def _fit(self, holder: _Streamed) -> None:
        """Every statistics pass of a streamed tensor, each over all its chunks read afresh."""
        if self.buffers is not None:  # a streamed tensor works in chunks: whole-tensor buffers wait in vain
            self.buffers.release_idle()
        for p in holder.tensor.passes():
            feed = _FlatFeed(self, holder.ot, check=not holder.checked)
            for s, e in holder.tensor.chunks:
                base, deltas = feed.take(s, e)
                p.observe(s, e, base, deltas)
            holder.checked = True
        return None

    def _read_span(self, item: _Item):
        holder = item.streamed
        if holder.feed is None:
            holder.feed = _FlatFeed(self, holder.ot, check=not holder.checked)
        return holder.feed.take(*item.span)

    # -- stage 3: compute ------------------------------------------------------------------------
    def _compute(self, item: _Item, payload) -> list[Any]:
        import torch

        if item.copy:
            return [t.to(self.out_torch[nm]) for nm, t in zip(item.names, payload[0])]
        if item.fit:
            return []
        strategy = self.strategies[item.strategy]
        nm = item.names[0]
        if item.span is not None:
            base, deltas = payload
            with torch.no_grad():
                merged = [item.streamed.tensor.merge(*item.span, base, deltas)]
            if item.final:  # the last chunk: give back the strategy's scratch space, drop the reader's rows
                item.streamed.tensor.close()
                item.streamed.tensor = item.streamed.feed = None
        else:
            from fedmerge.merging.strategies import TensorContext

            bases, deltas = payload
            results = self.buffers.empty if self.buffers is not None and self.device == "cpu" else None
            contexts = [
                TensorContext(name=n, model_params=strategy.model_params, seed=self.spec.seed, device=self.device, config=self.config, workspace=self.workspace, results=results)
                for n in item.names
            ]
            with torch.no_grad():
                if len(item.names) == 1:
                    merged = [strategy.merge_tensor(contexts[0], bases[0], deltas[0])]
                else:
                    merged = list(strategy.merge_group(contexts, bases, deltas))
        outs = []
        for nm, m in zip(item.names, merged):
            if self.spec.check_finite and not all_finite(m):
                raise NonFiniteTensor(f"merge result for tensor {nm!r} holds NaN or infinite values (method {strategy.name}); check its parameters")
            if m.device.type != "cpu":
                outs.append(m.to(self.out_torch[nm]).cpu())
            else:
                outs.append(_to(m, "cpu", self.out_torch[nm], self.buffers if item.span is None else None))
        if self.buffers is not None and item.span is None:
            # Inputs and results go back to the pool, but not a buffer still to be written (a
            # result, or an input a result is): ``_write`` gives those back once written.
            writing = {o.untyped_storage().data_ptr() for o in outs}
            bases, deltas = payload
            done = [*bases, *(d for per_model in deltas for d in per_model), *merged]
            self.buffers.give(*(t for t in done if t is not None and t.untyped_storage().data_ptr() not in writing))
        return outs

    # -- stage 4: write --------------------------------------------------------------------------
    def _write(self, item: _Item, outputs: list[Any]) -> None:
        for nm, t in zip(item.names, outputs):
            if item.span is not None:
                self.writer.add_bytes(nm, tensor_bytes(t), final=item.final)
            elif item.rows is not None:
                self.writer.add_part(nm, t, final=item.final)
            else:
                self.writer.add(nm, t)
        if self.buffers is not None and item.span is None:  # written: a pooled result (or input) may be handed out again
            self.buffers.give(*(t for nm, t in zip(item.names, outputs) if not self.writer.holds(nm)))
        self.budget.release(item.nbytes)
        self.freed.settle(item.nbytes)
        if self.bar is not None:
            self.bar.update(item.in_bytes)

    def stream(self, writer: CheckpointWriter) -> None:
        """Read, compute and write every item through the bounded pipeline, in order."""
        self.writer = writer
        self.budget = ByteBudget(max(1, self.spec.prefetch_bytes))
        self.freed = _FreedMemory(256 * 1024**2)
        self.bar = None
        if self.progress:
            from tqdm import tqdm

            name = (self.extra_metadata or {}).get("merge_name")
            desc = f"merge {name} ({self.method})" if name else f"merge {self.method}"
            self.bar = tqdm(total=sum(i.in_bytes for i in self.items), desc=desc, unit="B", unit_scale=True, dynamic_ncols=True)
        stages = [Stage(self._read, 1, "read"), Stage(self._compute, 1, "compute")]
        try:
            run_pipeline(self.items, stages, self._write, depth=4, budget=self.budget, cost=lambda item: item.nbytes)
        finally:
            if self.bar is not None:
                self.bar.close()

    # -- stage 5 --------------------------------------------------------------------------------
    def finish(self, writer: CheckpointWriter) -> dict[str, Any]:
        meta = _metadata(self.spec, self.method, self.cls, self.reference, self.sources, self.base_done, self.extra_metadata)
        others = self.layout.references[1:]
        if others:  # models only copied or used as a slice's reference (passthrough, frankenmerges)
            meta["references"] = [_describe_reference(r) for r in others]
        written = self.outputs.write(writer.tmp, meta) if self.outputs is not None else set()
        _write_sidecars(writer.tmp, self.reference.folder, self.config, skip=written)
        writer.commit(metadata=meta)
        return meta

    def run(self) -> MergeResult:
        t0 = time.perf_counter()
        _tune_malloc()
        self.prepare()
        self.base_digests: dict[str, Any] = {}
        self.base_done: dict[str, str] = {}
        n = len(self.sources)
        workers = min(max(n, 1), self.spec.read_workers or os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedmerge-load") if workers > 1 else None
        # Whole tensors of repeating shapes are read and widened into reused buffers (on the
        # CPU, before any move to the compute dtype or device): allocating them afresh cost
        # millions of page faults per merge.
        reuse = self.spec.reuse_buffers_from and getattr(self.cls, "reuse_buffers", True)
        # An item of one shape holds the reference, a delta per input and the result at once:
        # that many idle buffers per shape are kept for the next item.
        self.buffers = BufferPool(min_bytes=self.spec.reuse_buffers_from, keep=n + 2) if reuse else None
        self._lend_buffers(self.buffers)
        # The base's running digests are fed in order by one thread of their own.
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmerge-hash") if self.pool is not None and self.spec.fingerprints else None
        with torch_threads(self.spec.threads or os.cpu_count() or 1), _old_objects_frozen():
            try:
                with CheckpointWriter(self.out_dir, max_shard_bytes=self.spec.max_shard_bytes, overwrite=self.overwrite, durable=self.durable, direct=self.direct) as writer:
                    writer.plan(self.plan)
                    self.stream(writer)
                    meta = self.finish(writer)
            finally:
                for pool in (self.pool, self.hasher):
                    if pool is not None:
                        pool.shutdown(wait=True)
                self._lend_buffers(None)
                if self.buffers is not None:
                    log.debug("buffers: %d allocated, %d reused", self.buffers.allocated, self.buffers.reused)
                    self.buffers.clear()
        seconds = time.perf_counter() - t0
        log.debug("merged %d inputs with %s into %s in %.1f s", n, self.method, self.out_dir, seconds)
        return MergeResult(self.out_dir, seconds, len(self.plan), writer.bytes_written, self.method, meta)


class _FlatFeed:
    """Consecutive element ranges of one tensor's reference and of every input's delta, read from
    the inputs row by row: each row once per pass and in order (what the sources' running digests
    rely on); the part of a row that runs past a range is kept for the next one."""

    def __init__(self, run: MergeRun, ot: OutputTensor, check: bool):
        info = run._ref_info(ot)
        self.run, self.ot, self.check = run, ot, check
        self.rows_total = int(info.shape[0])
        self.row = max(1, info.numel // max(1, self.rows_total))
        self.next_row = 0
        self.start = 0  # element index of the first element held
        self.held: tuple[Any, list[Any]] | None = None

    def take(self, start: int, end: int):
        import torch

        if start != self.start:
            raise MergeError(f"tensor {self.ot.name!r}: chunk {start}:{end} asked out of order (next is {self.start}); this is a bug")
        last_row = min(self.rows_total, -(-end // self.row))
        base, deltas = self.held if self.held is not None else (None, None)
        if last_row > self.next_row:
            b, ds = self.run._read_rows(self.ot, (self.next_row, last_row), self.check)
            b, ds = b.reshape(-1), [d.reshape(-1) for d in ds]
            if base is None or base.numel() == 0:
                base, deltas = b, ds
            else:
                base, deltas = torch.cat([base, b]), [torch.cat([h, d]) for h, d in zip(deltas, ds)]
            self.next_row = last_row
        n = end - start
        out = (base[:n], [d[:n] for d in deltas])
        self.held = (base[n:], [d[n:] for d in deltas])
        self.start = end
        return out


def _describe_reference(r) -> dict[str, Any]:
    """A reference model as the metadata lists it (a folder, or a model with an adapter applied)."""
    if isinstance(r, CheckpointReader):
        return {"path": str(r.folder), "kind": "model", "fingerprint": None}
    return r.describe()


def check_layout(layout: MergeLayout, sources: Sequence[DeltaSource]) -> None:
    """Refuse a layout whose inputs cannot make its tensors: each named input tensor exists and
    has its reference's shape (the rows of remapped embeddings may differ), every model shares the
    first reference's architecture (layer count and, with a new vocabulary, its size excepted), and
    adapters and delta folders feed only the same-named tensors of the base they were made on."""
    first = layout.references[0]
    relaxed = {"num_hidden_layers"} | ({"vocab_size"} if layout.vocab is not None else set())
    check = CompatibilityCheck({}, config=first.config, folder=first.folder)
    seen = set()
    for m in [*layout.references, *[s for s in sources if s.complete]]:
        folder = Path(m.folder)
        if folder in seen:
            continue
        seen.add(folder)
        found = check.compare({}, complete=False, config=m.config or {}, tokenizer_folder=folder if layout.vocab is None else None, relaxed=relaxed)
        found.raise_first(str(folder), first.folder, tokenizer_hint="set tokenizer_source to merge vocabularies")
    names = [set(s.names()) for s in sources]
    for ot in layout.tensors:
        ref = layout.references[ot.reference]
        rshape = tuple(ref.info(ot.reference_name).shape)
        for i, name in ot.inputs:
            src = sources[i]
            if not src.complete and (ot.reference != 0 or name != ot.reference_name or name != ot.name):
                raise IncompatibleCheckpoint(
                    f"{src.label} ({src.folder}): a LoRA adapter or delta folder changes the base's own tensors; "
                    f"it cannot feed output tensor {ot.name!r} from {name!r}. Give a full model (or MODEL+ADAPTER) instead"
                )
            if name not in names[i]:
                if src.complete:
                    raise IncompatibleCheckpoint(f"{src.label} ({src.folder}): has no tensor {name!r}, needed for output tensor {ot.name!r}")
                continue
            sshape = tuple(src.info(name).shape)
            same = sshape[1:] == rshape[1:] if (ot.embedding and layout.vocab is not None) else sshape == rshape
            if not same:
                raise IncompatibleCheckpoint(f"{src.file_of(name)}: tensor {name!r} has shape {list(sshape)}, but {ot.reference_name!r} of {ref.folder} has {list(rshape)}")


def output_config(layout: MergeLayout, spec: MergeSpec, out_dtype: str | None) -> dict[str, Any]:
    """The output's config.json: the first reference's, with the layer count of a renumbered
    stack (and per-layer lists following their layers), the new vocabulary's size, and the dtype
    the weights are written in (``dtype`` and the older ``torch_dtype``), so loaders with
    ``dtype="auto"`` get what is on disk."""
    import copy

    cfg = copy.deepcopy(layout.references[0].config or {})
    if not cfg:
        return cfg
    if layout.num_layers is not None:
        old = cfg.get("num_hidden_layers")
        cfg["num_hidden_layers"] = layout.num_layers
        for key, value in list(cfg.items()):
            if isinstance(value, list) and old is not None and len(value) == old and key in PER_LAYER_KEYS:
                rebuilt = []
                for out_layer in range(layout.num_layers):
                    r, in_layer = layout.layer_origin.get(out_layer, (0, out_layer))
                    src_list = layout.references[r].config.get(key) or value
                    rebuilt.append(src_list[in_layer] if in_layer < len(src_list) else value[-1])
                cfg[key] = rebuilt
    if layout.vocab is not None:
        cfg["vocab_size"] = layout.vocab.rows
    if out_dtype is not None:
        cfg["dtype"] = out_dtype
        cfg["torch_dtype"] = out_dtype
    return cfg


# Config lists with one entry per layer, rebuilt when slices renumber the stack.
PER_LAYER_KEYS = ("layer_types", "sliding_window_pattern_layers", "no_rope_layers")


def _write_sidecars(folder: Path, source: Path, config: dict[str, Any], skip: set[str]) -> None:
    import shutil

    from fedmerge.checkpoints import SIDECAR_FILES

    src = Path(source)
    src = src if src.is_dir() else src.parent
    for fname in SIDECAR_FILES:
        if fname in skip:
            continue
        if fname == "config.json" and config:
            (folder / fname).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif (src / fname).exists():
            shutil.copy2(src / fname, folder / fname)


@contextlib.contextmanager
def _old_objects_frozen():
    """Spare the garbage collector's full passes the ~200k objects that imports left behind.

    A merge allocates a few container objects per item; the collections they trigger
    periodically walked every object of torch, transformers and pydantic too, most of a second
    per merge. Objects that exist when the merge starts are moved out of collection for its
    duration (``gc.freeze``) and handed back afterwards; nothing is leaked either way.
    """
    import gc

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Keep freed tensor memory for reuse instead of returning it to the OS after every tensor.

    glibc serves large blocks with fresh mmaps and unmaps them on free; every new tensor then pays
    a page fault per 4 KiB page, which costs more than the arithmetic. Raising the mmap threshold
    to 20 MiB (the engine's row chunks and the 16 MiB chunks of streamed tensors stay below it)
    and the trim threshold makes those blocks recycle inside the process; a tensor larger than
    that (a large tensor held whole) is still mapped and unmapped whole, so it leaves no hole in
    the heap. ``_FreedMemory`` bounds what the heap keeps beyond the live set.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 20 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class _FreedMemory:
    """Gives memory the allocator keeps but no tensor uses back to the system, past a limit.

    Freed blocks stay with glibc's allocator (``_tune_malloc`` wants that, to spare page faults),
    and with several threads allocating, free space scattered over its arenas can exceed what is
    in use: after a large tensor it would be resident for the rest of the merge. ``settle`` (after
    each written item) trims it when more than ``limit`` resident bytes lie free: the resident
    set, less what was resident outside the allocator at the start, less the bytes in use. It
    looks only once every ``check_every`` bytes released: reading the resident set and walking
    the allocator's arenas cost about a millisecond, which over the hundreds of small items of
    an elementwise merge added up to most of a second.
    """

    def __init__(self, limit: int, check_every: int = 64 * 1024**2):
        self.limit = limit
        self.check_every = check_every
        self._released = 0
        self._libc = None
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")

            class _Mallinfo2(ctypes.Structure):
                _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

            libc.mallinfo2.restype = _Mallinfo2
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            self._libc = libc
            self._outside = self._resident() - self._in_use()
        except (OSError, AttributeError, ValueError):  # not glibc 2.33+ on Linux: nothing to trim
            self._libc = None

    @staticmethod
    def _resident() -> int:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _in_use(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def settle(self, released: int) -> None:
        """Called after ``released`` bytes of working memory were let go."""
        self._released += released
        if self._libc is None or self._released < self.check_every:
            return
        self._released = 0
        if self._resident() - self._outside - self._in_use() > self.limit:
            self._libc.malloc_trim(0)


def _to(t, device: str, dtype, pool=None):
    """``t`` in ``dtype`` on ``device``; a conversion on the CPU is written into one of ``pool``'s
    buffers when there is a pool (fresh memory costs a page fault per 4 KiB on first touch)."""
    if t.dtype != dtype:
        t = pool.empty(tuple(t.shape), dtype).copy_(t) if pool is not None and device == "cpu" else t.to(dtype)
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


def _metadata(spec: MergeSpec, method: str, cls, base: CheckpointReader, sources: Sequence[DeltaSource], base_done: dict[str, str], extra: dict[str, Any] | None) -> dict[str, Any]:
    from fedmerge import __version__ as version

    base_fp = None
    if spec.fingerprints and all(nm in base_done for nm in base.names()):
        base_fp = combine_digests((nm, base.info(nm).dtype, base.info(nm).shape, base_done[nm]) for nm in base.names())
    meta = {
        "fedmerge_version": version,
        "method": method,
        "paper": (cls.paper if cls is not None else "") or None,
        "parameters": spec.parameters,
        "model_parameters": spec.model_parameters,
        "seed": spec.seed,
        "dtype": spec.dtype,
        "out_dtype": spec.out_dtype,
        "base": {"path": str(base.folder), "fingerprint": base_fp},
        "inputs": [s.describe() for s in sources],
    }
    if extra:
        meta.update(extra)
    return meta


__all__ = [
    "MergeSpec", "MergeResult", "MergeRun", "OutputFiles", "merge", "merge_layout", "MergeError", "MissingBase", "NonFiniteTensor",
    "check_compatible", "check_layout", "output_config", "DeltaCheckpoint", "TaskVector",
]  # fmt: skip
