"""The one registry of merge methods: built-in ones and those other packages provide.

Built-in methods register themselves when ``fedmerge.merging.strategies`` is imported (the
``register`` class decorator). Another package adds a method without touching fedmerge by
declaring an entry point in the ``fedmerge.strategies`` group whose name is the method's name and
whose object is its ``Strategy`` subclass::

    # the plugin's pyproject.toml
    [project.entry-points."fedmerge.strategies"]
    my_method = "my_package.merging:MyMethod"

Plugins are discovered once, on the first lookup. A plugin that fails to import, is not a
``Strategy`` subclass, carries another name than its entry point, or reuses a built-in name is
not registered; the failure is logged, and asking for that name raises a ``StrategyError`` that
says why. Names are case-insensitive; an unknown name lists the valid ones.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import BaseModel, ValidationError

from fedmerge.merging.strategies.base import ModelParams, Strategy, StrategyError, StrategyParams

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fedmerge.strategies"
BUILTIN = "fedmerge"


@dataclass(frozen=True)
class RegisteredStrategy:
    cls: type[Strategy]
    summary: str
    origin: str = BUILTIN  # "fedmerge", or the entry point and distribution a plugin came from


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter as users write it in a config."""

    name: str  # the user-facing name (``lambda``, not the Python field ``lambda_``)
    default: Any
    required: bool
    description: str


@dataclass(frozen=True)
class StrategyInfo:
    """What ``fedmerge strategies`` prints for one method."""

    name: str
    summary: str
    paper: str
    parameters: tuple[ParameterInfo, ...]
    per_model: tuple[ParameterInfo, ...]
    min_models: int
    max_models: int | None
    needs_base: bool
    origin: str


_REGISTRY: dict[str, RegisteredStrategy] = {}
_PLUGIN_ERRORS: dict[str, str] = {}  # name -> why the plugin of that name was not registered
_LOCK = threading.RLock()
_plugins_loaded = False


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: adds a built-in strategy to the registry under ``cls.name``."""
    _add(cls, BUILTIN)
    return cls


def _add(cls: type[Strategy], origin: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"{cls!r} is not a Strategy subclass")
    if not cls.name or cls.name != cls.name.strip().lower():
        raise TypeError(f"{cls.__qualname__}: a strategy needs a lower-case name, got {cls.name!r}")
    if not (issubclass(cls.Params, StrategyParams) and issubclass(cls.PerModel, ModelParams)):
        raise TypeError(f"{cls.__qualname__}: Params must subclass StrategyParams and PerModel ModelParams")
    if cls.min_models < 1 or (cls.max_models is not None and cls.max_models < cls.min_models):
        raise TypeError(f"{cls.__qualname__}: min_models {cls.min_models} / max_models {cls.max_models} are inconsistent")
    with _LOCK:
        if cls.name in _REGISTRY:
            raise TypeError(f"strategy {cls.name!r} registered twice")
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[cls.name] = RegisteredStrategy(cls, summary, origin)


def available() -> dict[str, RegisteredStrategy]:
    """Every registered method by name, built-in and plugins, sorted."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def plugin_errors() -> dict[str, str]:
    """Plugins that were found but not registered, by entry-point name, with the reason."""
    _load()
    return dict(_PLUGIN_ERRORS)


def get_strategy_class(name: str) -> type[Strategy]:
    _load()
    key = name.strip().lower()
    if key not in _REGISTRY:
        if key in _PLUGIN_ERRORS:
            raise StrategyError(f"merge method {name!r} comes from a plugin that could not be registered: {_PLUGIN_ERRORS[key]}")
        raise StrategyError(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key].cls


def describe(name: str) -> StrategyInfo:
    """A method's parameters by their user-facing names, with defaults, and its paper."""
    cls = get_strategy_class(name)
    entry = _REGISTRY[cls.name]
    return StrategyInfo(
        name=cls.name,
        summary=entry.summary,
        paper=cls.paper,
        parameters=_parameters(cls.Params),
        per_model=_parameters(cls.PerModel),
        min_models=cls.min_models,
        max_models=cls.max_models,
        needs_base=cls.needs_base,
        origin=entry.origin,
    )


def _parameters(model: type[BaseModel]) -> tuple[ParameterInfo, ...]:
    out = []
    for field_name, info in model.model_fields.items():
        required = info.is_required()
        out.append(ParameterInfo(info.alias or field_name, None if required else info.get_default(call_default_factory=True), required, info.description or ""))
    return tuple(out)


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
    per_model_fields = _accepted_names(cls.PerModel)
    global_fields = _accepted_names(cls.Params)
    shared = {k: params.pop(k) for k in list(params) if k in per_model_fields and k not in global_fields}
    model_params = [{**shared, **(mp or {})} for mp in model_params]
    n = len(model_params) if n_models is None else n_models
    if n < cls.min_models:
        raise StrategyError(f"{cls.name} needs at least {cls.min_models} model{'s' if cls.min_models > 1 else ''}, got {n}")
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


def _accepted_names(model: type[BaseModel]) -> set[str]:
    """Field names and their aliases: a config may use either where the model allows it."""
    return {n for name, info in model.model_fields.items() for n in (name, info.alias) if n}


# -- loading ---------------------------------------------------------------------------------------


def _load() -> None:
    global _plugins_loaded
    # Importing the package registers every built-in strategy exactly once.
    import fedmerge.merging.strategies  # noqa: F401

    if _plugins_loaded:
        return
    with _LOCK:
        if _plugins_loaded:
            return
        _load_plugins()
        _plugins_loaded = True


def _load_plugins() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        origin = f"entry point {ep.name} = {ep.value}" + (f" ({dist.name} {dist.version})" if dist is not None else "")
        key = ep.name.strip().lower()
        existing = _REGISTRY.get(key)
        if existing is not None and existing.origin == BUILTIN:
            _refuse(key, f"{origin}: the name {key!r} is a built-in method; the plugin was not loaded")
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take the built-in methods down with it
            _refuse(key, f"{origin}: import failed ({type(exc).__name__}: {exc})")
            continue
        if not (isinstance(obj, type) and issubclass(obj, Strategy)):
            _refuse(key, f"{origin}: {obj!r} is not a fedmerge Strategy subclass")
            continue
        if obj.name != key:
            _refuse(key, f"{origin}: the class is named {obj.name!r}, the entry point {key!r}; they must agree")
            continue
        current = _REGISTRY.get(key)
        if current is not None:
            if current.cls is obj:  # the module registered its class itself when imported
                _REGISTRY[key] = RegisteredStrategy(obj, current.summary, origin)
            else:
                _refuse(key, f"{origin}: another plugin already registered {key!r} ({current.origin})")
            continue
        try:
            _add(obj, origin)
        except TypeError as exc:
            _refuse(key, f"{origin}: {exc}")


def _refuse(name: str, why: str) -> None:
    _PLUGIN_ERRORS[name] = why
    log.warning("merge method plugin not registered: %s", why)
