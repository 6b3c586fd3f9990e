"""The merge layout: which input tensors make each output tensor, and with which parameters.

A plain merge maps every tensor of the base to the tensor of the same name in every input, with
one set of parameters for the whole model (``identity_layout``). mergekit-style recipes need
more, and say it here as data the engine follows tensor by tensor:

- **per-tensor parameters**: each output tensor names one ``ParameterSet`` (the method's global
  parameters and one dict per contributing input), so a gradient or a ``filter:`` gives layer 3's
  ``self_attn`` tensors other values than layer 7's ``mlp`` tensors;
- **slices**: an output tensor may come from differently numbered tensors of its inputs
  (output layer 5 made of input layers 12), and from a different set of inputs than its
  neighbours; the reference (the tensor deltas are taken against) is named per tensor too;
- **copies**: a tensor may be copied from its reference, optionally scaled (mergekit's
  ``passthrough``, and slices whose only source is the base);
- **embeddings**: tensors whose rows follow the vocabulary are remapped when the vocabulary
  changes (see ``fedmerge.merging.vocab``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from fedmerge.checkpoints import TensorInfo

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<index>\d+)(?P<suffix>\..+)$")


class TensorReader(Protocol):
    """What a reference model offers the engine (``CheckpointReader`` and ``AdaptedModel`` do)."""

    @property
    def folder(self): ...

    @property
    def config(self) -> dict[str, Any]: ...

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def get(self, name: str, rows: tuple[int, int] | None = None): ...

    def file_of(self, name: str): ...


@dataclass(frozen=True)
class ParameterSet:
    """The method's global parameters and one dict of per-model parameters per input."""

    params: dict[str, Any]
    model_params: tuple[dict[str, Any], ...]

    def key(self) -> str:
        return json.dumps([self.params, list(self.model_params)], sort_keys=True, default=str)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output and where it comes from.

    ``reference``/``reference_name``: the tensor deltas are taken against (index into
    ``MergeLayout.references``). ``inputs``: (input index, tensor name) of each contributing input,
    in the order the strategy sees their deltas. ``params``: index into
    ``MergeLayout.parameter_sets``; ``None`` means the reference is copied, times ``scale``.
    """

    name: str
    reference: int
    reference_name: str
    inputs: tuple[tuple[int, str], ...] = ()
    params: int | None = 0
    scale: float | None = None
    embedding: bool = False

    @property
    def is_copy(self) -> bool:
        return self.params is None


@dataclass
class MergeLayout:
    """Every output tensor, in the order the recipe lists them, plus what the output config needs.

    ``layer_origin``: for a renumbered stack, output layer -> (reference index, input layer), so
    per-layer config lists (``layer_types``) follow the layers they describe. ``vocab``: the
    vocabulary plan when the tokenizer changes (``fedmerge.merging.vocab.VocabPlan``).
    ``input_keys`` / ``reference_keys``: one identity per model (its resolved path), so the
    vocabulary plan can tell which rows belong to which model.
    """

    references: list[Any]
    tensors: list[OutputTensor]
    parameter_sets: list[ParameterSet]
    num_layers: int | None = None
    layer_origin: dict[int, tuple[int, int]] = field(default_factory=dict)
    vocab: Any = None
    input_keys: list[str] = field(default_factory=list)
    reference_keys: list[str] = field(default_factory=list)
    identity: bool = False

    def by_name(self) -> dict[str, OutputTensor]:
        return {t.name: t for t in self.tensors}


class ParameterTable:
    """Collects parameter sets, giving equal sets one index (so one strategy serves them)."""

    def __init__(self) -> None:
        self.sets: list[ParameterSet] = []
        self._index: dict[str, int] = {}

    def add(self, params: dict[str, Any], model_params: Sequence[dict[str, Any]]) -> int:
        ps = ParameterSet(dict(params), tuple(dict(m) for m in model_params))
        key = ps.key()
        if key not in self._index:
            self._index[key] = len(self.sets)
            self.sets.append(ps)
        return self._index[key]


def identity_layout(base, n_inputs: int, params: dict[str, Any], model_params: Sequence[dict[str, Any]]) -> MergeLayout:
    """Every base tensor from the same-named tensor of every input, one parameter set."""
    inputs = tuple(range(n_inputs))
    tensors = [OutputTensor(nm, 0, nm, tuple((i, nm) for i in inputs)) for nm in base.names()]
    mp = tuple(dict(m) for m in model_params) if model_params else tuple({} for _ in inputs)
    return MergeLayout([base], tensors, [ParameterSet(dict(params), mp)], identity=True)


# -- layer names ----------------------------------------------------------------------------------
def split_layer(name: str) -> tuple[str, int, str] | None:
    """``model.layers.12.mlp.up_proj.weight`` -> (``model.layers.``, 12, ``.mlp.up_proj.weight``)."""
    m = _LAYER.match(name)
    if m is None:
        return None
    return m.group("prefix"), int(m.group("index")), m.group("suffix")


def layer_names(names: Sequence[str], index: int) -> list[str]:
    """The tensors of layer ``index``, in stored order."""
    out = []
    for nm in names:
        parts = split_layer(nm)
        if parts is not None and parts[1] == index:
            out.append(nm)
    return out


def renumber(name: str, index: int) -> str:
    prefix, _, suffix = split_layer(name)  # type: ignore[misc]
    return f"{prefix}{index}{suffix}"


def count_layers(names: Sequence[str]) -> int:
    found = [p[1] for p in (split_layer(n) for n in names) if p is not None]
    return max(found) + 1 if found else 0


def is_embedding(name: str, config: dict[str, Any]) -> bool:
    """Tensors whose rows are indexed by token id: the input embedding and the output head."""
    leaf = name.rsplit(".", 2)
    stem = ".".join(leaf[-2:]) if len(leaf) >= 2 else name
    return stem in ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "embed_out.weight") or name in ("lm_head.weight", "output.weight")


def is_pre_layer(name: str) -> bool:
    """Non-layer tensors that come before the stack (embeddings); the others (final norm, head) after."""
    return "embed" in name.rsplit(".", 1)[0] or name.split(".")[-2:-1] == ["wte"] or name.split(".")[-2:-1] == ["wpe"]


__all__ = [
    "MergeLayout", "OutputTensor", "ParameterSet", "ParameterTable", "TensorReader", "count_layers", "identity_layout",
    "is_embedding", "is_pre_layer", "layer_names", "renumber", "split_layer",
]  # fmt: skip
