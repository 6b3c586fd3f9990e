"""What a merge strategy is: the contract between the engine and every method.

Every strategy sees the same thing for each tensor: the base (reference) tensor and one task
vector (delta = model - base) per input model, in the compute dtype on the compute device
(``TensorContext.device``). It returns the merged *weights* for that tensor. Working on deltas is
what lets the same code merge offline checkpoints, LoRA adapters and the spooled contributions of
a federation round. A strategy never sees a whole model: only one tensor, or one group of tensors
(``groups``), at a time.

A strategy that must see several tensors at once (hierarchical head alignment needs q/k/v/o of
one attention block) overrides ``groups`` and ``merge_group``; all others implement
``merge_tensor`` only. Grouping is stateless: ``merge_group`` receives the group's contexts, and
everything it needs (tensor names, the base model's config) is in them, so it never depends on an
earlier ``groups`` call on the same object.

A method that needs a statistic over a whole tensor (a magnitude rank, a norm, a cosine, a Gram
matrix) may also offer ``streamed``: the same merge as a ``StreamedTensor``, fed fixed chunks of
the tensor's flattened elements, first in the statistics passes it asks for, then once more to
produce the output chunk by chunk. The engine uses it for tensors too large to hold whole
(re-reading the inputs for every pass), so memory follows the chunk, not the tensor; such a
method's ``merge_tensor`` runs the same object over the tensor in memory
(``merge_in_memory``), so both paths give the same bytes by construction.

The registry that names strategies lives in ``registry``; methods are registered with
``registry.register`` or, from another package, through the ``fedmerge.strategies`` entry-point
group.
"""

from __future__ import annotations

import hashlib
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Protocol, Sequence

from pydantic import BaseModel, ConfigDict

from fedmerge.errors import FedmergeError


class StrategyError(FedmergeError):
    """A strategy name, its parameters or its inputs are not acceptable."""


class StrategyParams(BaseModel):
    """Global parameters of a strategy. Unknown fields and non-finite numbers are errors, so typos
    and NaN weights are caught when the config is loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelParams(BaseModel):
    """Per-model parameters (weight, density, ...). Unknown fields and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Workspace:
    """Scratch buffers handed from one tensor's merge to the next (the engine keeps one per merge).

    A whole-tensor method needs several chunk-sized temporaries per tensor; taking them from
    here instead of allocating them anew keeps the allocator from scattering freed blocks over
    its heap (memory that stays resident, unused, for the rest of the merge). Buffers come in
    power-of-two sizes; ``take`` may return a larger one than asked (slice it), ``give`` returns
    them. What it holds is at most what was in use at once.
    """

    SMALLEST = 1 << 16

    def __init__(self) -> None:
        self._free: dict[tuple, list] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, numel: int, dtype, device):
        import torch

        size = max(self.SMALLEST, 1 << max(0, numel - 1).bit_length())
        with self._lock:
            pool = self._free.get((size, dtype, str(device)))
            if pool:
                return pool.pop()
        return torch.empty(size, dtype=dtype, device=device)

    def give(self, buffers: Sequence[Any]) -> None:
        with self._lock:
            for b in buffers:
                self._free[(b.numel(), b.dtype, str(b.device))].append(b)


@dataclass
class TensorContext:
    """Everything a strategy may know about the tensor it is merging."""

    name: str
    model_params: Sequence[ModelParams]
    seed: int
    device: str = "cpu"
    config: dict[str, Any] = field(default_factory=dict)  # the base model's config.json
    workspace: Workspace | None = None  # where to take scratch buffers from (None: allocate)
    # Allocates a whole tensor's result, (shape, dtype) -> CPU tensor (None: ``torch.empty``): the
    # engine hands out buffers it takes back once the result is written.
    results: Callable[[tuple[int, ...], Any], Any] | None = None

    def scratch(self, numel: int, dtype, device=None):
        """A scratch buffer of ``numel`` elements, from the workspace when there is one; a strategy
        gives workspace buffers back (``Workspace.give``) when its tensor is done."""
        import torch

        device = self.device if device is None else device
        if self.workspace is None:
            return torch.empty(numel, dtype=dtype, device=device)
        return self.workspace.take(numel, dtype, device)[:numel]

    def result_like(self, t):
        """An uninitialised tensor shaped like ``t`` (same dtype and device) for a whole result."""
        import torch

        if self.results is None or t.device.type != "cpu":
            return torch.empty(t.shape, dtype=t.dtype, device=t.device)
        return self.results(tuple(t.shape), t.dtype)

    def generator(self, salt: str = ""):
        """A torch generator seeded from (merge seed, tensor name, salt): reproducible per tensor,
        independent of the order tensors are visited in, different across tensors."""
        import torch

        gen = torch.Generator(device=self.device)
        gen.manual_seed(tensor_seed(self.seed, self.name + salt))
        return gen


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class TensorPass(Protocol):
    """One statistics pass of a ``StreamedTensor``: sees every chunk, in order."""

    def observe(self, start: int, end: int, base, deltas: Sequence[Any]) -> None: ...


class FunctionPass:
    """A statistics pass that calls one function on every chunk."""

    def __init__(self, fn: Callable[[int, int, Any, Sequence[Any]], Any]):
        self.fn = fn

    def observe(self, start: int, end: int, base, deltas: Sequence[Any]) -> None:
        self.fn(start, end, base, deltas)


class StreamedTensor:
    """One tensor merged in passes over fixed chunks of its flattened elements.

    ``chunks``: the (start, end) element ranges, consecutive, covering the tensor; they are part
    of the method's definition where it draws random numbers or accumulates statistics chunk by
    chunk, so every caller feeds these exact chunks. ``passes()`` yields the statistics passes in
    order; the caller feeds each one every chunk (``observe``) before asking for the next. Then
    ``merge`` is called once per chunk, in order, and returns the merged flat chunk (written into
    ``out`` when given). Chunks hold the base and one delta per model (``None``: a zero delta
    in memory; the engine always passes tensors), flat, in the compute dtype, on the device.
    """

    chunks: Sequence[tuple[int, int]] = ()

    def passes(self) -> Iterator[TensorPass]:
        return iter(())

    def merge(self, start: int, end: int, base, deltas: Sequence[Any], out=None):
        raise NotImplementedError

    def close(self) -> None:
        """Called once the last chunk is merged: give back scratch space (a no-op by default)."""


def flat_chunks(numel: int, size: int, row: int | None = None) -> list[tuple[int, int]]:
    """Consecutive ranges of ``size`` elements covering ``numel`` (rounded down to whole rows of
    ``row`` elements, at least one row, when ``row`` is given)."""
    if row:
        size = max(1, size // row) * row
    size = max(1, min(size, numel))
    return [(s, min(numel, s + size)) for s in range(0, numel, size)]


def merge_in_memory(st: StreamedTensor, base, deltas: Sequence[Any], out=None):
    """Run a ``StreamedTensor`` over whole tensors held in memory; returns the merged tensor,
    written into ``out`` (shaped like ``base``) when given."""
    import torch

    flat_b = base.reshape(-1)
    flat_d = [None if d is None else d.reshape(-1) for d in deltas]
    for p in st.passes():
        for s, e in st.chunks:
            p.observe(s, e, flat_b[s:e], [None if d is None else d[s:e] for d in flat_d])
    out = torch.empty_like(flat_b) if out is None else out.view(-1)
    try:
        for s, e in st.chunks:
            st.merge(s, e, flat_b[s:e], [None if d is None else d[s:e] for d in flat_d], out=out[s:e])
    finally:
        st.close()
    return out.view(base.shape)


class Strategy:
    """Base class. Subclasses set ``name``, ``paper``, ``Params``, ``PerModel`` and implement
    ``merge_tensor`` (or ``groups`` and ``merge_group``).

    ``needs_base``: the method is defined relative to a shared base (TIES, DARE, ...). Methods on
    raw weights (linear, slerp) may run without one: the engine then uses the first model as the
    reference, whose delta is zero, and the algebra is unchanged.
    ``min_models`` / ``max_models``: how many inputs the method is defined for.
    ``elementwise``: each output element depends only on the same element of the base and the
    deltas (and on the parameters), with no randomness and no statistic over the tensor. The
    engine may then feed a large tensor in row chunks, so memory does not grow with it.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    PerModel: ClassVar[type[ModelParams]] = ModelParams
    needs_base: ClassVar[bool] = True
    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = None
    elementwise: ClassVar[bool] = False
    # Whether the engine should read this method's whole tensors into reused buffers. Methods
    # whose own working memory (decompositions) dwarfs their inputs turn it off: for them idle
    # buffers only raise the peak, and allocation is not what they wait on.
    reuse_buffers: ClassVar[bool] = True

    def __init__(self, params: StrategyParams, model_params: Sequence[ModelParams]):
        self.params = params
        self.model_params = list(model_params)

    # -- grouping: default one tensor per group ---------------------------------------------------
    def groups(self, names: Sequence[str], config: dict[str, Any]) -> list[tuple[str, ...]]:
        """The tensors to merge together, as tuples of names covering ``names`` exactly once."""
        return [(n,) for n in names]

    def merge_group(self, contexts: Sequence[TensorContext], bases: Sequence[Any], deltas: Sequence[Sequence[Any]]) -> list[Any]:
        """``deltas[i][m]``: delta of model m for tensor i. Returns merged weights per tensor."""
        return [self.merge_tensor(ctx, b, d) for ctx, b, d in zip(contexts, bases, deltas)]

    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence[Any]):
        raise NotImplementedError

    # -- tensors merged in passes over chunks ----------------------------------------------------------
    def streams(self, name: str, shape: Sequence[int]) -> bool:
        """Whether ``streamed`` can merge this tensor (alone, not as part of a larger group)."""
        return False

    def streamed(self, ctx: TensorContext, shape: Sequence[int], dtype, present: Sequence[bool]) -> StreamedTensor:
        """This method's merge of one tensor as a ``StreamedTensor`` (only where ``streams``).

        ``dtype``: the compute dtype of the chunks; ``present[m]``: model m has a delta (the
        engine passes zeros for models that leave the tensor unchanged, so all are present)."""
        raise StrategyError(f"{self.name} cannot merge tensor {ctx.name!r} in chunks")
