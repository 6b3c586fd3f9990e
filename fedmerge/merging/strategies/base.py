"""What a merge strategy is, and the one registry that names them all.

Every strategy sees the same thing for each tensor: the base (reference) tensor and one task
vector (delta = model - base) per input model, in float32 on the compute device. It returns the
merged *weights* for that tensor. Working on deltas is what lets the same code merge offline
checkpoints, LoRA adapters and the spooled contributions of a federation round.

A strategy that must see several tensors at once (hierarchical head alignment needs q/k/v/o of
one attention block) overrides ``groups`` and ``merge_group``; all others implement
``merge_tensor`` only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError

from fedmerge.errors import FedmergeError


class StrategyError(FedmergeError):
    """A strategy name, its parameters or its inputs are not acceptable."""


class StrategyParams(BaseModel):
    """Global parameters of a strategy. Unknown fields are errors, so typos are caught."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(BaseModel):
    """Per-model parameters (weight, density, ...). Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class TensorContext:
    """Everything a strategy may know about the tensor it is merging."""

    name: str
    model_params: Sequence[ModelParams]
    seed: int
    device: str = "cpu"
    config: dict[str, Any] = field(default_factory=dict)  # the base model's config.json

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


class Strategy:
    """Base class. Subclasses set ``name``, ``Params``, ``PerModel`` and implement ``merge_tensor``.

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

    def __init__(self, params: StrategyParams, model_params: Sequence[ModelParams]):
        self.params = params
        self.model_params = list(model_params)

    # -- grouping: default one tensor per group ---------------------------------------------------
    def groups(self, names: Sequence[str], config: dict[str, Any]) -> list[tuple[str, ...]]:
        return [(n,) for n in names]

    def merge_group(self, contexts: Sequence[TensorContext], bases: Sequence[Any], deltas: Sequence[Sequence[Any]]) -> list[Any]:
        """``deltas[i][m]``: delta of model m for tensor i. Returns merged weights per tensor."""
        return [self.merge_tensor(ctx, b, d) for ctx, b, d in zip(contexts, bases, deltas)]

    def merge_tensor(self, ctx: TensorContext, base, deltas: Sequence[Any]):
        raise NotImplementedError


@dataclass(frozen=True)
class RegisteredStrategy:
    cls: type[Strategy]
    summary: str


_REGISTRY: dict[str, RegisteredStrategy] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: adds a strategy to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY:
        raise TypeError(f"strategy {cls.name!r} registered twice")
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    _REGISTRY[cls.name] = RegisteredStrategy(cls, summary)
    return cls


def available() -> dict[str, RegisteredStrategy]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def get_strategy_class(name: str) -> type[Strategy]:
    _load_builtin()
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise StrategyError(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key].cls


def _format_validation(where: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"{where}.{loc}: {err['msg']}")
    return "; ".join(parts)


def build_strategy(name: str, params: dict[str, Any] | None, model_params: Sequence[dict[str, Any] | None], n_models: int | None = None) -> Strategy:
    """Validate parameters and instantiate a strategy; errors name the field that is wrong.

    As in mergekit, a per-model parameter (``weight``, ``density``, ...) given among the global
    ``params`` is the default for every model that does not set its own.
    """
    cls = get_strategy_class(name)
    params = dict(params or {})
    per_model_fields = set(cls.PerModel.model_fields)
    shared = {k: params.pop(k) for k in list(params) if k in per_model_fields and k not in cls.Params.model_fields}
    model_params = [{**shared, **(mp or {})} for mp in model_params]
    n = len(model_params) if n_models is None else n_models
    if n < cls.min_models:
        raise StrategyError(f"{cls.name} needs at least {cls.min_models} models, got {n}")
    if cls.max_models is not None and n > cls.max_models:
        raise StrategyError(f"{cls.name} is defined for at most {cls.max_models} models, got {n}")
    try:
        p = cls.Params(**params)
    except ValidationError as exc:
        raise StrategyError(f"{cls.name} parameters: " + _format_validation("parameters", exc)) from None
    mps = []
    for i, mp in enumerate(model_params):
        try:
            mps.append(cls.PerModel(**(mp or {})))
        except ValidationError as exc:
            raise StrategyError(f"{cls.name} model #{i}: " + _format_validation(f"models[{i}].parameters", exc)) from None
    return cls(p, mps)


def _load_builtin() -> None:
    # Importing the package registers every built-in strategy exactly once.
    import fedmerge.merging.strategies  # noqa: F401
