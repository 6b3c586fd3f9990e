"""Merge configs: fedmerge's own YAML format and mergekit's, one document or several.

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

mergekit's format (``merge_method:`` at the top) is read with mergekit's meaning; see
``fedmerge.merging.mergekit_format``. A file may hold several documents separated by ``---``
(mergekit-multi): each may have a ``name:``, and a later one may use an earlier one's output by
that name wherever it names a model (see ``fedmerge.merging.multimerge``).

Relative paths are relative to the config file. Errors name the file and the YAML field.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedmerge.configfile import describe_validation_error, resolve_relative
from fedmerge.errors import FedmergeError
from fedmerge.merging.engine import MergeResult, MergeSpec

log = logging.getLogger(__name__)

InputKind = Literal["auto", "model", "lora", "delta"]


class MergeConfigError(FedmergeError):
    """A merge config file is missing, malformed or asks for something unsupported."""


_UNITS = {
    "": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "b": 10**9,  # mergekit's notation: 5B is five billion
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}  # fmt: skip


def parse_size(value: int | str) -> int:
    """A shard size -> bytes: a byte count, mergekit's ``5B`` / ``500M`` / ``100K`` (billions,
    millions, thousands, as mergekit's parser reads them), or ``2GB``, ``500MB``, ``1.5GiB``."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a size such as 5B (five billion, mergekit's notation), 2GB, 500MB or 1073741824")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError("must be positive")
    return size


def _scalar_params(params: dict[str, Any]) -> dict[str, Any]:
    for k, v in params.items():
        if isinstance(v, (list, dict)):
            raise ValueError(f"{k}: per-layer gradients and filtered values are read in mergekit's format only (merge_method:); give a single value")
    return params


# Parameters given as one value each (gradients and filters belong to mergekit's format).
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
    name: str | None = None

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int:
        return parse_size(v)


@dataclass
class InputSpec:
    path: Path
    kind: str = "auto"
    label: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergePlan:
    """A fedmerge-format document: one parameter set, every input on every tensor."""

    base: Path | None
    inputs: list[InputSpec]
    spec: MergeSpec
    source: Path  # the config file
    format: str = "fedmerge"
    depends: set[str] = field(default_factory=set)

    @property
    def model_folders(self) -> list[Path]:
        return [p for p in [self.base, *[i.path for i in self.inputs]] if p is not None]

    def run(self, out_dir: str | os.PathLike[str], progress: bool = True, overwrite: bool = False, outputs=None, metadata: dict[str, Any] | None = None) -> MergeResult:
        """Open the inputs and run the engine."""
        from fedmerge.checkpoints import CheckpointReader
        from fedmerge.merging.engine import merge_layout
        from fedmerge.merging.layout import identity_layout
        from fedmerge.merging.strategies import get_strategy_class
        from fedmerge.merging.taskvector import open_delta_source

        base_dir = self.base
        if base_dir is None:
            if get_strategy_class(self.spec.method).needs_base:
                raise MergeConfigError(f"{self.source}: base: method {self.spec.method!r} needs a base model")
            base_dir = self.inputs[0].path
        base = CheckpointReader(base_dir)
        sources = [open_delta_source(i.path, base, kind=i.kind, label=i.label) for i in self.inputs]
        n = len(sources)
        layout = identity_layout(base, n, self.spec.parameters, self.spec.model_parameters or [{}] * n)
        return merge_layout(layout, sources, out_dir, self.spec, progress=progress, metadata=metadata, overwrite=overwrite, outputs=outputs)


def _resolve(path: str, root: Path, field_name: str, named: dict[str, Path] | None = None) -> Path:
    if named and path in named:
        return named[path]
    p = resolve_relative(path, root)
    if not p.exists():
        hint = " (fedmerge reads local folders only and never downloads models)" if re.fullmatch(r"[\w.-]+/[\w.-]+", path) else ""
        raise MergeConfigError(f"{field_name}: {path!r} does not exist (looked in {p}; relative paths are relative to the config file){hint}")
    return p


def spec_or_error(where: Path | str, **kw: Any) -> MergeSpec:
    """A ``MergeSpec``, or a ``MergeConfigError`` naming the file and the field."""
    try:
        return MergeSpec(**kw)
    except ValidationError as exc:
        raise MergeConfigError(f"{where}: {describe_validation_error(exc)}") from None


def read_fedmerge(data: dict[str, Any], cfg_path: Path, root: Path, named: dict[str, Path] | None = None, where: str | None = None) -> MergePlan:
    where = where or str(cfg_path)
    try:
        cfg = FedmergeMergeConfig(**data)
    except ValidationError as exc:
        raise MergeConfigError(f"{where}: {describe_validation_error(exc)}") from None
    base = _resolve(cfg.base, root, f"{where}: base", named) if cfg.base else None
    inputs = [InputSpec(_resolve(m.path, root, f"{where}: models[{i}].path", named), m.kind, m.label, dict(m.parameters)) for i, m in enumerate(cfg.models)]
    spec = spec_or_error(
        where,
        method=cfg.method,
        parameters=cfg.parameters,
        model_parameters=[i.parameters for i in inputs],
        dtype=cfg.dtype,
        out_dtype=cfg.out_dtype,
        seed=cfg.seed,
        device=cfg.device,
        max_shard_bytes=cfg.shard_size,
    )
    used = {n for n, p in (named or {}).items() if p == base or any(p == i.path for i in inputs)}
    return MergePlan(base, inputs, spec, cfg_path, "fedmerge", used)


def read_document(data: Any, cfg_path: Path, named: dict[str, Path] | None = None, which: str = ""):
    """One YAML document (either format) -> a ``MergePlan`` or a ``MergekitRecipe``."""
    where = f"{cfg_path}{which}"
    if not isinstance(data, dict):
        raise MergeConfigError(f"{where}: expected a mapping with merge_method (mergekit) or method (fedmerge) at the top level")
    root = cfg_path.resolve().parent
    if "merge_method" in data:
        from fedmerge.merging.mergekit_format import read_mergekit

        return read_mergekit(data, cfg_path, root, named, where)
    if "method" in data:
        return read_fedmerge(data, cfg_path, root, named, where)
    raise MergeConfigError(f"{where}: no 'method' (fedmerge format) or 'merge_method' (mergekit format) field")


def load_merge_config(path: str | os.PathLike[str]):
    """Read a one-document YAML merge config (either format); errors name the file and field.

    A file of several documents is read with ``fedmerge.merging.multimerge.load_documents``.
    """
    from fedmerge.merging.multimerge import read_yaml_documents

    cfg_path = Path(path)
    docs = read_yaml_documents(cfg_path)
    if len(docs) != 1:
        raise MergeConfigError(f"{cfg_path}: holds {len(docs)} documents; read it with fedmerge.merging.multimerge.load_documents (fedmerge merge does)")
    return read_document(docs[0].data, cfg_path)


def run_merge_plan(plan, out_dir: str | os.PathLike[str], progress: bool = True, overwrite: bool = False) -> MergeResult:
    """Run one document's merge into ``out_dir`` with the standard output files."""
    from fedmerge.merging.multimerge import run_document, MergeDocument

    doc = MergeDocument(name=None, index=0, text=Path(plan.source).read_text(encoding="utf-8") if Path(plan.source).exists() else "", plan=plan, out_dir=Path(out_dir))
    return run_document(doc, progress=progress, overwrite=overwrite)


__all__ = ["InputSpec", "MergeConfigError", "MergePlan", "load_merge_config", "parse_size", "read_document", "run_merge_plan", "spec_or_error"]
