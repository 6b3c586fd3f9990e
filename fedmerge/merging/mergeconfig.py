"""Merge configs: fedmerge's own YAML format and mergekit's, both turned into one ``MergePlan``.

Our format (``method:`` at the top)::

    method: ties
    base: ./base                  # optional for methods that do not need a base
    models:
      - path: ./hospital-a        # a full model, a PEFT LoRA adapter, or a delta folder
        parameters: {weight: 0.6, density: 0.5}
      - path: ./hospital-b-lora
        kind: lora                # optional: auto (default), model, lora, delta
        parameters: {weight: 0.4, density: 0.5}
    parameters: {lambda: 1.0}
    dtype: float32                # compute dtype
    out_dtype: bfloat16           # default: the base's dtype, tensor by tensor
    seed: 0
    device: auto
    shard_size: 2GB

mergekit's format (``merge_method:`` at the top) is read with mergekit's meaning: ``base_model``,
``models: [{model, parameters}]`` or ``slices: [{sources: [{model, layer_range}]}]`` covering
every layer, ``parameters``, ``dtype`` (the compute dtype, and the output dtype unless
``out_dtype`` is given). A base model that is also listed among the models is the reference of
a method that needs a base (its zero task vector is dropped, as mergekit does) and the first
endpoint of slerp. Per-layer gradients and filtered parameters are refused with an error naming
the field, rather than silently flattened.

Relative paths are relative to the config file. Errors name the YAML field.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedmerge.configfile import describe_validation_error, read_yaml_mapping
from fedmerge.errors import FedmergeError
from fedmerge.merging.engine import MergeSpec

log = logging.getLogger(__name__)

InputKind = Literal["auto", "model", "lora", "delta"]


class MergeConfigError(FedmergeError):
    """A merge config file is missing, malformed or asks for something unsupported."""


def parse_size(value: int | str) -> int:
    """``2GB``, ``500MB``, ``1.5GiB`` or a byte count -> bytes."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*", str(value).lower())
    if not m:
        raise ValueError(f"{value!r} is not a size such as 2GB, 500MB or 1073741824")
    unit = (m.group(2) or "").rstrip("b")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    size = int(float(m.group(1)) * mult)
    if size <= 0:
        raise ValueError("must be positive")
    return size


def _scalar_params(params: dict[str, Any]) -> dict[str, Any]:
    for k, v in params.items():
        if isinstance(v, (list, dict)):
            raise ValueError(f"{k}: per-layer gradients and filtered values are not supported; give a single value")
    return params


# Parameters given as one value each (mergekit's per-layer gradients and filters are refused).
ScalarParams = Annotated[dict[str, Any], AfterValidator(_scalar_params)]


# -- our format ---------------------------------------------------------------------------------
class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    kind: InputKind = "auto"
    label: str | None = None
    parameters: ScalarParams = Field(default_factory=dict)


class FedmergeMergeConfig(BaseModel):
    """fedmerge's own merge config."""

    model_config = ConfigDict(extra="forbid")

    method: str
    base: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: ScalarParams = Field(default_factory=dict)
    dtype: str = "float32"
    out_dtype: str | None = None
    seed: int = 0
    device: str = "auto"
    shard_size: int | str = 2 * 1024**3

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int:
        return parse_size(v)


# -- mergekit's format ------------------------------------------------------------------------------
class MergekitModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: ScalarParams = Field(default_factory=dict)


class MergekitSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    layer_range: tuple[int, int] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class MergekitSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[MergekitSource] = Field(min_length=1)


class MergekitConfig(BaseModel):
    """The subset of mergekit's config that means the same here."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[MergekitModel] | None = None
    slices: list[MergekitSlice] | None = None
    parameters: ScalarParams = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Literal["base"] | None = None
    name: str | None = None


# -- the plan both become ---------------------------------------------------------------------------
@dataclass
class InputSpec:
    path: Path
    kind: str = "auto"
    label: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergePlan:
    base: Path | None
    inputs: list[InputSpec]
    spec: MergeSpec
    source: Path  # the config file
    format: str  # "fedmerge" or "mergekit"


def _format_errors(where: str, exc: ValidationError) -> str:
    return f"{where}: {describe_validation_error(exc)}"


def _resolve(path: str, root: Path, field_name: str) -> Path:
    p = Path(os.path.expanduser(path))
    if not p.is_absolute():
        p = root / p
    if not p.exists():
        hint = " (fedmerge reads local folders only and never downloads models)" if re.fullmatch(r"[\w.-]+/[\w.-]+", path) else ""
        raise MergeConfigError(f"{field_name}: {path!r} does not exist (looked in {p}){hint}")
    return p


def load_merge_config(path: str | os.PathLike[str]) -> MergePlan:
    """Read a YAML merge config (either format) into a plan; errors name the file and field."""
    cfg_path = Path(path)
    data = read_yaml_mapping(cfg_path, MergeConfigError, "a mapping with merge_method (mergekit) or method (fedmerge)")
    root = cfg_path.resolve().parent
    if "merge_method" in data:
        return _from_mergekit(data, cfg_path, root)
    if "method" in data:
        return _from_fedmerge(data, cfg_path, root)
    raise MergeConfigError(f"{cfg_path}: no 'method' (fedmerge format) or 'merge_method' (mergekit format) field")


def _spec(where: Path, **kw: Any) -> MergeSpec:
    try:
        return MergeSpec(**kw)
    except ValidationError as exc:
        raise MergeConfigError(_format_errors(str(where), exc)) from None


def _from_fedmerge(data: dict[str, Any], cfg_path: Path, root: Path) -> MergePlan:
    try:
        cfg = FedmergeMergeConfig(**data)
    except ValidationError as exc:
        raise MergeConfigError(_format_errors(str(cfg_path), exc)) from None
    base = _resolve(cfg.base, root, f"{cfg_path}: base") if cfg.base else None
    inputs = [InputSpec(_resolve(m.path, root, f"{cfg_path}: models[{i}].path"), m.kind, m.label, dict(m.parameters)) for i, m in enumerate(cfg.models)]
    spec = _spec(
        cfg_path,
        method=cfg.method,
        parameters=cfg.parameters,
        model_parameters=[i.parameters for i in inputs],
        dtype=cfg.dtype,
        out_dtype=cfg.out_dtype,
        seed=cfg.seed,
        device=cfg.device,
        max_shard_bytes=cfg.shard_size,
    )
    return MergePlan(base, inputs, spec, cfg_path, "fedmerge")


def _from_mergekit(data: dict[str, Any], cfg_path: Path, root: Path) -> MergePlan:
    from fedmerge.merging.strategies import get_strategy_class

    try:
        cfg = MergekitConfig(**data)
    except ValidationError as exc:
        raise MergeConfigError(_format_errors(str(cfg_path), exc)) from None
    if cfg.models and cfg.slices:
        raise MergeConfigError(f"{cfg_path}: give either models or slices, not both")
    entries: list[tuple[str, dict[str, Any], str]] = []
    if cfg.models:
        entries = [(m.model, dict(m.parameters), f"models[{i}].model") for i, m in enumerate(cfg.models)]
    elif cfg.slices:
        if len(cfg.slices) != 1:
            raise MergeConfigError(f"{cfg_path}: slices: only one slice covering every layer is supported (got {len(cfg.slices)})")
        ranges = {s.layer_range for s in cfg.slices[0].sources}
        if len(ranges) != 1:
            raise MergeConfigError(f"{cfg_path}: slices[0].sources: every source must use the same layer_range")
        for i, s in enumerate(cfg.slices[0].sources):
            try:
                _scalar_params(s.parameters)
            except ValueError as exc:
                raise MergeConfigError(f"{cfg_path}: slices[0].sources[{i}].parameters.{exc}") from None
        entries = [(s.model, dict(s.parameters), f"slices[0].sources[{i}].model") for i, s in enumerate(cfg.slices[0].sources)]
        layer_range = next(iter(ranges))
    else:
        raise MergeConfigError(f"{cfg_path}: models: at least one model is required")

    try:
        cls = get_strategy_class(cfg.merge_method)
    except FedmergeError as exc:
        raise MergeConfigError(f"{cfg_path}: merge_method: {exc}") from None
    base = _resolve(cfg.base_model, root, f"{cfg_path}: base_model") if cfg.base_model else None
    resolved = [(_resolve(p, root, f"{cfg_path}: {where}"), params) for p, params, where in entries]
    if cfg.slices and layer_range is not None:
        ref = base or resolved[0][0]
        from fedmerge.checkpoints import CheckpointReader

        n_layers = CheckpointReader(ref).config.get("num_hidden_layers")
        if n_layers is not None and tuple(layer_range) != (0, n_layers):
            raise MergeConfigError(f"{cfg_path}: slices[0].sources[*].layer_range {list(layer_range)} must cover every layer [0, {n_layers}]; partial slices are not supported")

    inputs = [InputSpec(p, "auto", None, params) for p, params in resolved]
    if base is not None:
        same = [i for i, inp in enumerate(inputs) if inp.path.resolve() == base.resolve()]
        if cls.needs_base:
            if same:
                log.info("%s: base_model is also listed among the models; its task vector is zero and is left out", cfg_path)
            inputs = [inp for i, inp in enumerate(inputs) if i not in same]
        elif not same:
            # mergekit's slerp (and linear with a base) treats base_model as an input itself: the first endpoint.
            inputs.insert(0, InputSpec(base, "auto", None, {}))
        else:
            inputs = [inputs[same[0]]] + [inp for i, inp in enumerate(inputs) if i != same[0]]
    dtype = cfg.dtype or "float32"
    spec = _spec(
        cfg_path,
        method=cfg.merge_method,
        parameters=cfg.parameters,
        model_parameters=[i.parameters for i in inputs],
        dtype=dtype,
        out_dtype=cfg.out_dtype or cfg.dtype,
    )
    return MergePlan(base, inputs, spec, cfg_path, "mergekit")


def run_merge_plan(plan: MergePlan, out_dir: str | os.PathLike[str], progress: bool = True, overwrite: bool = False):
    """Open the plan's inputs and run the engine; returns its ``MergeResult``."""
    from fedmerge.checkpoints import CheckpointReader
    from fedmerge.merging.engine import merge
    from fedmerge.merging.taskvector import open_delta_source

    base_dir = plan.base
    if base_dir is None:
        from fedmerge.merging.strategies import get_strategy_class

        if get_strategy_class(plan.spec.method).needs_base:
            raise MergeConfigError(f"{plan.source}: {'base_model' if plan.format == 'mergekit' else 'base'}: method {plan.spec.method!r} needs a base model")
        base_dir = plan.inputs[0].path
    base = CheckpointReader(base_dir)
    sources = [open_delta_source(i.path, base, kind=i.kind, label=i.label) for i in plan.inputs]
    meta = {"config": str(plan.source), "config_format": plan.format}
    return merge(base_dir, sources, out_dir, plan.spec, progress=progress, metadata=meta, overwrite=overwrite)
