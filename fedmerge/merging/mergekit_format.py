"""mergekit's YAML (``merge_method:`` at the top), read with mergekit's meaning.

Reading has two steps. ``read_mergekit`` validates the document (every key, every parameter
name and value shape, the paths) and returns a ``MergekitRecipe``; nothing is opened yet, so a
multi-document file can name outputs that do not exist yet. ``MergekitRecipe.compile`` then
opens the models and turns the recipe into a ``MergeLayout`` the engine follows tensor by
tensor. The semantics are mergekit's:

- ``models:`` is one slice covering every layer of every model; a ``base_model`` not listed
  among them is added to it (with no parameters of its own).
- Each slice's layers are visited in order; layer ``j`` of a slice of ``n`` layers has
  ``t = j / (n - 1)`` (``t = 1`` for a one-layer slice); the tensors before the stack
  (embeddings) use the first slice's sources, those after it (final norm, head) the last
  slice's, both with ``t = 0``. Output layers are numbered in order, so slices of different
  models stack into a deeper (or shallower) model ("frankenmerge"); ``num_hidden_layers`` follows.
- A parameter value is a scalar, a gradient (a list of numbers, interpolated linearly at ``t``:
  ``x = t (len - 1)``, between entries ``floor(x)`` and ``floor(x) + 1``) or a list of
  ``{filter, value}`` entries (the first whose ``filter`` is a substring of the tensor's name,
  or has no filter, or ``*``, gives the value; none matching means "not set here").
- A per-model parameter is looked up in the source's ``parameters`` (slices) or the model's
  (``models:``), then the slice's ``parameters``, then the top-level ``parameters``; a global
  parameter in the slice's ``parameters``, then the top-level ones. Per-model values are
  evaluated at the input tensor's name (for a slice taking layer 12 into output layer 5, the
  name with ``layers.12``), global ones at the output tensor's name.
- Methods on task vectors (``task_arithmetic``, ``ties``, ``dare_*``, ``della*``,
  ``breadcrumbs*``, ``model_stock``) take the base from the slice's sources; every other
  model needs a ``weight`` (refused without). ``linear`` averages every source, the base
  included, and needs a ``weight`` for each. ``slerp`` interpolates from the base (``t = 0``) to
  the other source and needs ``t``. ``passthrough`` copies its slice's only source, times the
  source's ``scale`` when given.
- ``rescale`` (DARE, DELLA) rescales the sparsified task vector to its original L1 norm
  (``rescale_mode: l1``), as mergekit does; ``rescale_mode: probability`` asks for the papers'
  1/p instead.
- ``dtype`` is the compute dtype and, without ``out_dtype``, the written dtype.

Stricter than mergekit, on purpose: unknown keys (top level, in a model, slice or source, and
parameter names no part of the method reads) are refused with the key and the file, where
mergekit would ignore them; a model listed twice in one slice is refused; paths are local folders
(relative to the config file), never hub ids.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedmerge.configfile import resolve_relative
from fedmerge.errors import FedmergeError
from fedmerge.merging.engine import MergeSpec
from fedmerge.merging.layout import (
    MergeLayout,
    OutputTensor,
    ParameterTable,
    count_layers,
    is_embedding,
    is_pre_layer,
    layer_names,
    renumber,
    split_layer,
)
from fedmerge.merging.mergeconfig import MergeConfigError, spec_or_error

log = logging.getLogger(__name__)

# mergekit's methods that fedmerge computes the same way, by their mergekit names.
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
WEIGHTED_METHODS = (*TASK_VECTOR_METHODS, "linear")  # mergekit requires a weight per model
OTHER_MERGEKIT_METHODS = ("nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ram_plus")
TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name", "modules")

Scalar = bool | int | float | str


# -- parameter values ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conditional:
    value: Scalar | tuple[Scalar, ...]
    filter: str | None = None


def parse_setting(value: Any, where: str) -> Any:
    """A parameter value as written -> a scalar, a tuple (gradient) or a tuple of Conditionals."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        raise ValueError(
            f"{where}: a single {{filter, value}} mapping is not a parameter value; "
            "give a list of them (e.g. [{filter: mlp, value: 0.5}, {value: 0.2}]) or a plain value"
        )
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{where}: an empty list is not a parameter value")
        if all(isinstance(e, (bool, int, float, str)) for e in value):
            return tuple(value)
        if all(isinstance(e, dict) for e in value):
            out = []
            for i, e in enumerate(value):
                extra = set(e) - {"filter", "value"}
                if extra or "value" not in e:
                    what = f"unknown key {sorted(extra)[0]!r}" if extra else "no 'value'"
                    raise ValueError(f"{where}[{i}]: {what}; each entry is {{filter: SUBSTRING, value: VALUE}} (filter optional)")
                v = e["value"]
                if isinstance(v, list):
                    if not v or not all(isinstance(x, (bool, int, float)) for x in v):
                        raise ValueError(f"{where}[{i}].value: a gradient is a non-empty list of numbers")
                    v = tuple(v)
                elif not isinstance(v, (bool, int, float, str)):
                    raise ValueError(f"{where}[{i}].value: expected a number or a list of numbers")
                f = e.get("filter")
                if f is not None and not isinstance(f, str):
                    raise ValueError(f"{where}[{i}].filter: expected a substring of tensor names")
                out.append(Conditional(v, f))
            return tuple(out)
        raise ValueError(f"{where}: a list must hold only numbers (a gradient) or only {{filter, value}} entries")
    raise ValueError(f"{where}: expected a number, a list of numbers or a list of {{filter, value}} entries")


def evaluate_setting(setting: Any, tensor: str, t: float) -> Any:
    """The value ``setting`` takes for ``tensor`` at layer position ``t`` (None: not set here)."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, tuple) and setting and isinstance(setting[0], Conditional):
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor and cond.filter in tensor):
                return evaluate_setting(cond.value, tensor, t)
        return None
    if all(isinstance(e, (int, float)) for e in setting):  # bools count as numbers here too
        x = t * (len(setting) - 1)
        i0 = int(x)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = x - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting[int(t * (len(setting) - 1))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _params(v: Any, info) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError("expected a mapping of parameter names to values")
    return {str(k): parse_setting(x, str(k)) for k, x in v.items()}


class MkModel(_Strict):
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)

    _p = field_validator("parameters", mode="before")(_params)


class MkSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)

    _p = field_validator("parameters", mode="before")(_params)


class MkSlice(_Strict):
    sources: list[MkSource] = Field(min_length=1)
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    _p = field_validator("parameters", mode="before")(_params)


class MkTokenRowSource(_Strict):
    kind: Literal["model_token", "zero"]
    model: str | None = None
    token_id: int | None = None
    token: str | None = None


class MkToken(_Strict):
    source: str | MkTokenRowSource | None = None
    force: bool = False


class MkTokenizer(_Strict):
    source: str = "union"
    tokens: dict[str, MkToken] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1)


class MkConfig(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[MkModel] | None = None
    slices: list[MkSlice] | None = None
    modules: dict[str, Any] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: MkTokenizer | None = None
    chat_template: str | None = None
    name: str | None = None

    _p = field_validator("parameters", mode="before")(_params)


# -- model references -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """``MODEL`` or ``MODEL+ADAPTER`` as written, resolved against the config's folder."""

    text: str
    path: Path
    adapter: Path | None = None
    merge_name: str | None = None  # an earlier document of the same file

    @property
    def key(self) -> str:
        return str(self.path) + (f"+{self.adapter}" if self.adapter else "")


def resolve_model(text: str, root: Path, where: str, named: dict[str, Path]) -> ModelRef:
    """Resolve a ``model:`` value; errors name the file's field and say what to do."""
    chunks = text.split("+")
    if len(chunks) > 2:
        raise MergeConfigError(f"{where}: {text!r} has more than one '+'; write MODEL or MODEL+LORA_ADAPTER")
    model_text = chunks[0].strip()
    if model_text in named:
        path, merge_name = named[model_text], model_text
    else:
        path, merge_name = _local_path(model_text, root, where), None
    adapter = None
    if len(chunks) == 2:
        adapter = _local_path(chunks[1].strip(), root, where + " (adapter after '+')")
        if not (adapter / "adapter_config.json").exists():
            raise MergeConfigError(f"{where}: {chunks[1]!r} is not a PEFT adapter folder (no adapter_config.json in {adapter})")
    return ModelRef(text, path, adapter, merge_name)


def _local_path(text: str, root: Path, where: str) -> Path:
    p = resolve_relative(text, root)
    if p.exists():
        return p
    if "@" in text:
        raise MergeConfigError(f"{where}: {text!r} does not exist (looked in {p}); a '@revision' pin is for hub models, and fedmerge reads local folders only")
    hint = " (fedmerge reads local folders only and never downloads models)" if re.fullmatch(r"[\w.-]+/[\w.-]+", text) else ""
    raise MergeConfigError(f"{where}: {text!r} does not exist (looked in {p}; relative paths are relative to the config file){hint}")


# -- the recipe ---------------------------------------------------------------------------------------
@dataclass
class SliceSource:
    model: ModelRef
    layer_range: tuple[int, int] | None  # None: every layer of the model (the models: form)
    parameters: dict[str, Any]
    where: str


@dataclass
class SliceDef:
    sources: list[SliceSource]
    base: ModelRef | None
    parameters: dict[str, Any]
    where: str


@dataclass
class TokenizerDef:
    source: str  # base, union, or a model key
    source_ref: ModelRef | None
    tokens: dict[str, tuple[str, ModelRef | None, int | None, str | None, bool]]
    pad_to_multiple_of: int | None


@dataclass
class MergekitRecipe:
    """A validated mergekit document, ready to be compiled once its models exist."""

    method: str
    base: ModelRef | None
    slices: list[SliceDef]
    explicit_slices: bool
    parameters: dict[str, Any]
    spec: MergeSpec
    source: Path
    tokenizer: TokenizerDef | None = None
    chat_template: str | None = None
    label: str = ""  # how errors name the file (and the document of a multi-document file)
    depends: set[str] = field(default_factory=set)
    format: str = "mergekit"

    @property
    def models(self) -> list[ModelRef]:
        """Every model the recipe names, the base first, each once, in the order written."""
        out: dict[str, ModelRef] = {}
        if self.base is not None:
            out[self.base.key] = self.base
        for s in self.slices:
            if s.base is not None:
                out.setdefault(s.base.key, s.base)
            for src in s.sources:
                out.setdefault(src.model.key, src.model)
        if self.tokenizer is not None and self.tokenizer.source_ref is not None:
            out.setdefault(self.tokenizer.source_ref.key, self.tokenizer.source_ref)
        return list(out.values())

    @property
    def model_folders(self) -> list[Path]:
        return [m.path for m in self.models]

    def compile(self) -> "CompiledMerge":
        return _Compiler(self).compile()

    def run(self, out_dir: str | os.PathLike[str], progress: bool = True, overwrite: bool = False, outputs=None, metadata: dict[str, Any] | None = None):
        """Compile (opening the models) and run the engine on the layout."""
        from fedmerge.merging.engine import merge_layout

        compiled = self.compile()
        if outputs is not None:
            outputs.vocab = compiled.layout.vocab
        return merge_layout(compiled.layout, compiled.sources, out_dir, self.spec, progress=progress, metadata=metadata, overwrite=overwrite, outputs=outputs)


@dataclass
class CompiledMerge:
    layout: MergeLayout
    sources: list[Any]
    labels: list[str]


def read_mergekit(data: dict[str, Any], cfg_path: Path, root: Path, named: dict[str, Path] | None = None, where: str | None = None) -> MergekitRecipe:
    """Validate one mergekit document (``data``) from ``cfg_path``; see the module docstring.
    ``named``: outputs of the file's other documents by name; ``where``: how errors name the file."""
    named = named or {}
    where = where or str(cfg_path)
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise MergeConfigError(f"{where}: {unknown[0]}: {_unknown_key(unknown[0], TOP_LEVEL_KEYS, 'a mergekit config key')}")
    if data.get("modules") is not None:
        raise MergeConfigError(f"{where}: modules: per-module recipes (multimodal models) are not supported; use models: or slices:")
    try:
        cfg = MkConfig(**data)
    except ValidationError as exc:
        raise MergeConfigError(f"{where}: {_describe(exc)}") from None
    if bool(cfg.models) == bool(cfg.slices):
        raise MergeConfigError(f"{where}: give exactly one of models: or slices: (as mergekit requires)")
    if cfg.tokenizer_source is not None and cfg.tokenizer is not None:
        raise MergeConfigError(f"{where}: tokenizer_source and tokenizer: give one of them, not both (as mergekit requires)")
    method = cfg.merge_method.strip().lower()
    cls = _method_class(method, where)
    base = resolve_model(cfg.base_model, root, f"{where}: base_model", named) if cfg.base_model else None
    slices: list[SliceDef] = []
    if cfg.models:
        sources = []
        seen = set()
        for i, m in enumerate(cfg.models):
            ref = resolve_model(m.model, root, f"{where}: models[{i}].model", named)
            if ref.key in seen:
                raise MergeConfigError(f"{where}: models[{i}].model: {m.model!r} is listed twice")
            seen.add(ref.key)
            sources.append(SliceSource(ref, None, m.parameters, f"models[{i}]"))
        if base is not None and base.key not in seen:
            log.debug("%s: base_model is not among the models; it is added (as mergekit does)", where)
            sources.append(SliceSource(base, None, {}, "base_model"))
        slices.append(SliceDef(sources, None, {}, "models"))
    else:
        for si, s in enumerate(cfg.slices or []):
            srcs = []
            seen = set()
            for j, src in enumerate(s.sources):
                w = f"slices[{si}].sources[{j}]"
                ref = resolve_model(src.model, root, f"{where}: {w}.model", named)
                if ref.key in seen:
                    raise MergeConfigError(f"{where}: {w}.model: {src.model!r} appears twice in this slice")
                seen.add(ref.key)
                a, b = src.layer_range
                if not 0 <= a < b:
                    raise MergeConfigError(f"{where}: {w}.layer_range: {[a, b]} is not a range [start, end) with 0 <= start < end")
                srcs.append(SliceSource(ref, (a, b), src.parameters, w))
            lengths = {x.layer_range[1] - x.layer_range[0] for x in srcs}
            if len(lengths) != 1:
                raise MergeConfigError(f"{where}: slices[{si}].sources: every source of a slice must span the same number of layers (got {sorted(lengths)})")
            if s.residual_weight is not None:
                log.warning("%s: slices[%d].residual_weight is read but never used by mergekit; ignored", where, si)
            sbase = resolve_model(s.base_model, root, f"{where}: slices[{si}].base_model", named) if s.base_model else None
            slices.append(SliceDef(srcs, sbase, s.parameters, f"slices[{si}]"))
    _check_parameter_names(cls, method, cfg, where)
    tokenizer = _tokenizer_def(cfg, root, where, named, base, slices)
    dtype = cfg.dtype or "float32"
    spec = spec_or_error(where, method=method, parameters=_plain(cfg.parameters), model_parameters=[], dtype=dtype, out_dtype=cfg.out_dtype or cfg.dtype)
    recipe = MergekitRecipe(method, base, slices, bool(cfg.slices), cfg.parameters, spec, cfg_path, tokenizer, cfg.chat_template, label=where)
    recipe.depends = {m.merge_name for m in recipe.models if m.merge_name}
    _check_method_shape(recipe, cls, where)
    if cfg.chat_template is not None:
        from fedmerge.merging.vocab import VocabError, resolve_chat_template

        if cfg.chat_template != "auto":
            try:
                resolve_chat_template(cfg.chat_template, [])
            except VocabError as exc:
                raise MergeConfigError(f"{where}: {exc}") from None
    return recipe


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as written (gradients and filters as lists), for the record."""

    def one(v: Any) -> Any:
        if isinstance(v, tuple):
            return [one(x) for x in v]
        if isinstance(v, Conditional):
            return {"filter": v.filter, "value": one(v.value)} if v.filter is not None else {"value": one(v.value)}
        return v

    return {k: one(v) for k, v in params.items()}


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(f"[{x}]" if isinstance(x, int) else str(x) for x in err["loc"]).replace(".[", "[") or "(root)"
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key (mergekit's keys here are: {_allowed_at(err['loc'])})")
        else:
            parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _allowed_at(loc: Sequence[Any]) -> str:
    names = [x for x in loc if isinstance(x, str)]
    table = {"models": MkModel, "slices": MkSlice, "sources": MkSource, "tokenizer": MkTokenizer, "tokens": MkToken, "source": MkTokenRowSource}
    cls: Any = MkConfig
    for n in names[:-1]:
        cls = table.get(n, cls)
    return ", ".join(cls.model_fields)


def _unknown_key(key: str, known: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"not {what}{hint} (known: {', '.join(known)})"


def _method_class(method: str, where: str):
    from fedmerge.merging.strategies import get_strategy_class

    if method == "passthrough":
        return None
    if method in OTHER_MERGEKIT_METHODS:
        raise MergeConfigError(f"{where}: merge_method: {method!r} is a mergekit method fedmerge does not implement; use one of: {', '.join(supported_methods())}")
    try:
        return get_strategy_class(method)
    except FedmergeError as exc:
        raise MergeConfigError(f"{where}: merge_method: {exc}") from None


def supported_methods() -> list[str]:
    from fedmerge.merging.strategies import available

    return sorted([*available(), "passthrough"])


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def method_parameters(cls) -> tuple[list[str], list[str]]:
    """(global, per-model) parameter names of a method, as written in configs."""
    if cls is None:  # passthrough
        return [], ["scale"]
    return _field_names(cls.Params), _field_names(cls.PerModel)


def _check_parameter_names(cls, method: str, cfg: MkConfig, where: str) -> None:
    glob, per = method_parameters(cls)
    known = [*glob, *per]

    def check(params: dict[str, Any], loc: str, per_model_only: bool) -> None:
        for k in params:
            if k in glob and per_model_only:
                raise MergeConfigError(
                    f"{where}: {loc}.parameters.{k}: {k} is a global parameter of {method} (one value per tensor, not per model); "
                    "set it under the top-level parameters: (or a slice's parameters:)"
                )
            if k not in known:
                raise MergeConfigError(f"{where}: {loc}.parameters.{k}: {_unknown_key(k, known, f'a parameter of {method}')}")

    check(cfg.parameters, "(top level)", False)
    for i, m in enumerate(cfg.models or []):
        check(m.parameters, f"models[{i}]", True)
    for si, s in enumerate(cfg.slices or []):
        check(s.parameters, f"slices[{si}]", False)
        for j, src in enumerate(s.sources):
            check(src.parameters, f"slices[{si}].sources[{j}]", True)


def _check_method_shape(recipe: MergekitRecipe, cls, where: str) -> None:
    """Refuse, before anything is opened, what mergekit refuses for this method."""
    method = recipe.method
    for s in recipe.slices:
        base = s.base or recipe.base
        keys = [x.model.key for x in s.sources]
        has_base = base is not None and base.key in keys
        if method == "passthrough":
            if len(s.sources) != 1:
                raise MergeConfigError(f"{where}: {s.where}: passthrough copies one model per slice, this slice has {len(s.sources)} (a listed base_model counts)")
        elif method == "slerp":
            if base is None:
                raise MergeConfigError(f"{where}: base_model: slerp interpolates from base_model (t=0) to the other model; give base_model")
            if len(s.sources) > 2:
                raise MergeConfigError(f"{where}: {s.where}: slerp merges exactly two models, the base and one other; this slice has {len(s.sources)} (base_model included)")
            if not has_base and len(s.sources) == 2:
                raise MergeConfigError(f"{where}: {s.where}: base_model {base.text!r} is not among this slice's sources; slerp needs it as its t=0 end")
        elif cls is not None and cls.needs_base:
            if base is None:
                raise MergeConfigError(f"{where}: base_model: {method} is defined on task vectors from a base model; give base_model")
            if not has_base:
                raise MergeConfigError(f"{where}: {s.where}: base_model {base.text!r} is not among this slice's sources; {method} takes the base's layers from the slice")


def _tokenizer_def(cfg: MkConfig, root: Path, where: str, named: dict[str, Path], base: ModelRef | None, slices: list[SliceDef]) -> TokenizerDef | None:
    if cfg.tokenizer_source is None and cfg.tokenizer is None:
        return None
    if cfg.tokenizer_source is not None:
        source, tokens_cfg, pad, loc = cfg.tokenizer_source, {}, None, "tokenizer_source"
    else:
        source, tokens_cfg, pad, loc = cfg.tokenizer.source, cfg.tokenizer.tokens or {}, cfg.tokenizer.pad_to_multiple_of, "tokenizer.source"
    source_ref = None
    if source not in ("base", "union"):
        source_ref = resolve_model(source, root, f"{where}: {loc}", named)
        source = source_ref.key
    tokens = {}
    for tok, tc in tokens_cfg.items():
        w = f"{where}: tokenizer.tokens[{tok!r}].source"
        if tc.source is None:
            raise MergeConfigError(f"{w}: give the row's source: a model, {{kind: model_token, model, token|token_id}} or {{kind: zero}}")
        if isinstance(tc.source, str):
            tokens[tok] = ("model", resolve_model(tc.source, root, w, named), None, None, tc.force)
        elif tc.source.kind == "zero":
            tokens[tok] = ("zero", None, None, None, tc.force)
        else:
            s = tc.source
            if s.model is None or (s.token is None) == (s.token_id is None):
                raise MergeConfigError(f"{w}: a model_token source names model and exactly one of token or token_id")
            tokens[tok] = ("model_token", resolve_model(s.model, root, w + ".model", named), s.token_id, s.token, tc.force)
    return TokenizerDef(source, source_ref, tokens, pad)


# -- compiling a recipe into a layout -----------------------------------------------------------------
class _Compiler:
    """Opens the recipe's models and lists every output tensor with its inputs and parameters."""

    def __init__(self, recipe: MergekitRecipe):
        self.r = recipe
        self.where = recipe.label or str(recipe.source)
        self.cls = _method_class(recipe.method, self.where)
        self.glob, self.per = method_parameters(self.cls)
        self.readers: dict[str, Any] = {}
        self.references: list[Any] = []
        self.reference_keys: list[str] = []
        self.sources: list[Any] = []
        self.input_keys: list[str] = []
        self.table = ParameterTable()
        self.tensors: list[OutputTensor] = []
        self.layer_origin: dict[int, tuple[int, int]] = {}
        self._valid: set[tuple[str, str]] = set()

    # models
    def reader(self, ref: ModelRef):
        from fedmerge.checkpoints import CheckpointReader
        from fedmerge.merging.adapted import AdaptedModel
        from fedmerge.merging.lora import is_lora_adapter

        got = self.readers.get(ref.key)
        if got is None:
            if not ref.path.exists():
                raise MergeConfigError(f"{self.where}: {ref.text!r} ({ref.path}) does not exist")
            if is_lora_adapter(ref.path):
                raise MergeConfigError(
                    f"{self.where}: {ref.text!r} is a LoRA adapter folder; as a base or in slices give the model it adapts too: MODEL+{ref.text}"
                )
            got = AdaptedModel(ref.path, ref.adapter, label=ref.text) if ref.adapter else CheckpointReader(ref.path)
            self.readers[ref.key] = got
        return got

    def reference(self, ref: ModelRef) -> int:
        if ref.key not in self.reference_keys:
            self.reference_keys.append(ref.key)
            self.references.append(self.reader(ref))
        return self.reference_keys.index(ref.key)

    def source(self, ref: ModelRef) -> int:
        from fedmerge.merging.lora import is_lora_adapter
        from fedmerge.merging.taskvector import TaskVector, is_delta_checkpoint, open_delta_source

        if ref.key in self.input_keys:
            return self.input_keys.index(ref.key)
        if ref.adapter is None and (is_lora_adapter(ref.path) or is_delta_checkpoint(ref.path)):
            if self.r.base is None:
                raise MergeConfigError(f"{self.where}: {ref.text!r} is an adapter or delta folder; it needs a base_model to apply to")
            src = open_delta_source(ref.path, self.reader(self.r.base), label=ref.text)
        elif ref.adapter is not None:
            src = self.reader(ref)
        else:
            from fedmerge.checkpoints import CheckpointReader

            model = self.reader(ref)
            # The engine always hands a TaskVector its reference tensor; this reader is a fallback only.
            fallback = self.references[0] if isinstance(self.references[0], CheckpointReader) else model
            src = TaskVector(model, fallback, label=ref.text)
        self.input_keys.append(ref.key)
        self.sources.append(src)
        return len(self.sources) - 1

    def layer_count(self, ref: ModelRef) -> int:
        r = self.reader(ref)
        n = r.config.get("num_hidden_layers")
        return int(n) if isinstance(n, int) else count_layers(r.names())

    # parameters
    def _lookup(self, name: str, levels: Sequence[dict[str, Any]], tensor: str, t: float) -> Any:
        for params in levels:
            if name in params:
                value = evaluate_setting(params[name], tensor, t)
                if value is not None:
                    return value
        return None

    def global_params(self, s: SliceDef, tensor: str, t: float) -> dict[str, Any]:
        out = {}
        for name in self.glob:
            v = self._lookup(name, (s.parameters, self.r.parameters), tensor, t)
            if v is not None:
                out[name] = v
        if self.cls is not None and "rescale_mode" in self.glob and "rescale_mode" not in out:
            out["rescale_mode"] = "l1"  # mergekit rescales to the original L1 norm
        if self.r.method == "model_stock" and "negative_cosine" not in out:
            out["negative_cosine"] = "keep"  # mergekit does not clamp a negative cosine to 0
        if self.r.method == "slerp" and "t" not in out:
            raise MergeConfigError(f"{self.where}: parameters.t: slerp needs t (0 gives base_model) for tensor {tensor!r}")
        return out

    def model_params(self, s: SliceDef, src: SliceSource, tensor: str, t: float, required: bool) -> dict[str, Any]:
        out = {}
        for name in self.per:
            v = self._lookup(name, (src.parameters, s.parameters, self.r.parameters), tensor, t)
            if v is not None:
                out[name] = v
        if required and "weight" not in out and src.where == "base_model":
            raise MergeConfigError(
                f"{self.where}: base_model: {src.model.text!r} is not listed under models, so mergekit's {self.r.method} adds it as one more "
                f"input, and that input has no weight (for tensor {tensor!r}); list it under models: with a weight, give a top-level weight, or drop base_model"
            )
        if required and "weight" not in out:
            raise MergeConfigError(
                f"{self.where}: {src.where}: {src.model.text!r} has no weight for tensor {tensor!r}; mergekit's {self.r.method} "
                "requires one for every model (set weight: under the model's parameters, or at the top level for all)"
            )
        return out

    # layout
    def compile(self) -> CompiledMerge:
        r = self.r
        donor = r.base or r.slices[0].sources[0].model
        self.reference(donor)  # config, generation config and tokenizer come from it
        ranges = [self._ranges(s) for s in r.slices]
        template = self.reader(donor)
        first_layer_names = None
        pre = [n for n in template.names() if split_layer(n) is None and is_pre_layer(n)]
        post = [n for n in template.names() if split_layer(n) is None and not is_pre_layer(n)]
        config = template.config
        for name in pre:
            self.add_tensor(r.slices[0], [(x, name) for x in r.slices[0].sources], name, 0.0, config)
        out_layer = 0
        for s, rng in zip(r.slices, ranges):
            n = rng[0][1] - rng[0][0]
            for j in range(n):
                t = j / (n - 1) if n > 1 else 1.0
                first = s.sources[0]
                src_layer = rng[0][0] + j
                names = layer_names(self.reader(first.model).names(), src_layer)
                if not names:
                    raise MergeConfigError(f"{self.where}: {first.where}: {first.model.text!r} has no layer {src_layer}")
                first_layer_names = first_layer_names or names
                ref_model = self._slice_reference(s)
                ref_src = next((i for i, x in enumerate(s.sources) if x.model.key == ref_model.key), 0)
                self.layer_origin[out_layer] = (self.reference(ref_model), rng[ref_src][0] + j)
                for nm in names:
                    out_name = renumber(nm, out_layer)
                    inputs = [(x, renumber(nm, rg[0] + j)) for x, rg in zip(s.sources, rng)]
                    self.add_tensor(s, inputs, out_name, t, config)
                out_layer += 1
        for name in post:
            self.add_tensor(r.slices[-1], [(x, name) for x in r.slices[-1].sources], name, 0.0, config)
        layout = MergeLayout(
            references=self.references,
            tensors=self.tensors,
            parameter_sets=self.table.sets,
            num_layers=out_layer if r.explicit_slices else None,
            layer_origin=self.layer_origin if r.explicit_slices else {},
            input_keys=self.input_keys,
            reference_keys=self.reference_keys,
        )
        if r.tokenizer is not None:
            layout.vocab = self._vocab()
        return CompiledMerge(layout, self.sources, [getattr(s, "label", "?") for s in self.sources])

    def _ranges(self, s: SliceDef) -> list[tuple[int, int]]:
        out = []
        for x in s.sources:
            if x.layer_range is not None:
                n = self.layer_count(x.model)
                if x.layer_range[1] > n:
                    raise MergeConfigError(f"{self.where}: {x.where}.layer_range: {list(x.layer_range)} goes past the last layer of {x.model.text!r} ({n} layers)")
                out.append(x.layer_range)
            else:
                out.append((0, self.layer_count(x.model)))
        if len({b - a for a, b in out}) != 1:
            raise MergeConfigError(f"{self.where}: {s.where}: the models have different layer counts ({[b - a for a, b in out]}); every input of a slice must contain the same number of layers")
        return out

    def _slice_reference(self, s: SliceDef) -> ModelRef:
        base = s.base or self.r.base
        keys = [x.model.key for x in s.sources]
        if base is not None and base.key in keys:
            return base
        return s.sources[0].model

    def add_tensor(self, s: SliceDef, inputs: list[tuple[SliceSource, str]], out_name: str, t: float, config: dict[str, Any]) -> None:
        base = s.base or self.r.base
        ref_model = self._slice_reference(s)
        ref_name = next(nm for x, nm in inputs if x.model.key == ref_model.key)
        ref = self.reference(ref_model)
        embedding = is_embedding(out_name, config)
        method = self.r.method
        if method == "passthrough":
            src, name = inputs[0]
            scale = self._lookup("scale", (src.parameters, s.parameters, self.r.parameters), name, t)
            self.tensors.append(OutputTensor(out_name, ref, ref_name, params=None, scale=None if scale is None else float(scale), embedding=embedding))
            return
        needs_base = self.cls.needs_base or method in TASK_VECTOR_METHODS
        if needs_base or method == "slerp":
            contributing = [(x, nm) for x, nm in inputs if base is None or x.model.key != base.key]
        else:
            contributing = list(inputs)
            # The reference first: its delta is zero, and linear's algebra does not care where it sits.
        if not contributing or (method == "slerp" and len(inputs) == 1):
            self.tensors.append(OutputTensor(out_name, ref, ref_name, params=None, embedding=embedding))
            return
        if method == "slerp":  # the base is the t=0 end (and the reference); the other the t=1 end
            contributing = [(next(x for x, _ in inputs if x.model.key == ref_model.key), ref_name), *contributing]
        required_weight = method in WEIGHTED_METHODS
        model_params = [self.model_params(s, x, nm, t, required_weight) for x, nm in contributing]
        ins = [(self.source(x.model), nm) for x, nm in contributing]
        params = self.global_params(s, out_name, t)
        self._validate(params, model_params, out_name)
        idx = self.table.add(params, model_params)
        self.tensors.append(OutputTensor(out_name, ref, ref_name, tuple(ins), idx, embedding=embedding))

    def _validate(self, params: dict[str, Any], model_params: list[dict[str, Any]], tensor: str) -> None:
        from fedmerge.merging.strategies import build_strategy

        key = (repr(sorted(params.items())), repr([sorted(m.items()) for m in model_params]))
        if key in self._valid:
            return
        try:
            build_strategy(self.r.method, params, model_params, n_models=len(model_params))
        except FedmergeError as exc:
            raise MergeConfigError(f"{self.where}: tensor {tensor!r}: {exc}") from None
        if self.r.method in ("della", "della_linear"):
            for i, mp in enumerate(model_params):
                d, e = float(mp.get("density", 1.0)), float(mp.get("epsilon", 0.15))
                if d < 1.0 and d > 0.0 and (d + e >= 1.0 or d - e <= 0.0):
                    raise MergeConfigError(f"{self.where}: tensor {tensor!r}: density {d} +/- epsilon {e} must lie strictly inside (0, 1), as mergekit requires")
        self._valid.add(key)

    def _vocab(self):
        from fedmerge.merging.vocab import TokenRow, VocabError, build_vocab_plan

        tk = self.r.tokenizer
        models = {m.key: m.path for m in self.r.models}
        base_key = self.reference_keys[0]
        ordered = {base_key: models.pop(base_key), **models}
        rows = {}
        for tok, (kind, ref, token_id, token, force) in tk.tokens.items():
            rows[tok] = TokenRow(kind, ref.key if ref else None, token_id, token, force)
        source: Any = tk.source
        if tk.source_ref is not None:
            source = tk.source_ref.key
        try:
            return build_vocab_plan(base_key, ordered, source, rows, tk.pad_to_multiple_of)
        except VocabError as exc:
            raise MergeConfigError(f"{self.where}: tokenizer: {exc}") from None


__all__ = ["CompiledMerge", "Conditional", "MergekitRecipe", "ModelRef", "evaluate_setting", "method_parameters", "parse_setting", "read_mergekit", "resolve_model", "supported_methods"]
