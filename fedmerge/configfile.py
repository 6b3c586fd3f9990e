"""Reading YAML config files into pydantic models, with errors that name the file and the field.

Every part (merge configs, federation and client configs, the evaluator, the demo, simulations)
reads its config through ``load_config``, so a mistake reads the same wherever it is made:
``path: field.sub[2]: what is wrong``.

Relative paths in a file are relative to that file, never to the working directory. A field
says it holds a path by its type (``ConfigPath``, or ``ConfigDir``... all the same mechanism):
the file's folder travels in pydantic's validation context and the field's validator joins it.
A model built in code (no file) keeps its paths exactly as given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError, ValidationInfo

from fedmerge.errors import FedmergeError

CONFIG_DIR = "config_dir"  # the validation-context key holding the config file's folder

M = TypeVar("M", bound=BaseModel)


def resolve_relative(value: str | os.PathLike[str], base_dir: str | os.PathLike[str]) -> Path:
    """A path written in a config file, as the file means it: ``~`` expanded, and joined to
    ``base_dir`` (the file's folder) unless absolute. The one rule for every path in a config."""
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else Path(base_dir) / p


def _relative_to_config(value: Any, info: ValidationInfo) -> Any:
    root = (info.context or {}).get(CONFIG_DIR)
    if root is None or value is None or value == "":
        return value
    resolved = resolve_relative(value, root)
    return resolved if isinstance(value, Path) else str(resolved)


# A path written in a config file: relative to the file's folder. ``str`` for fields that callers
# treat as strings, ``Path`` where they want a Path; both resolve the same way.
ConfigPath = Annotated[str, AfterValidator(_relative_to_config)]
ConfigPathObj = Annotated[Path, AfterValidator(_relative_to_config)]


def _compression_spec(value: str) -> str:
    from fedmerge.checkpoints.codecs import canonical_spec
    from fedmerge.checkpoints.errors import UnknownCompression

    try:
        return canonical_spec(value)
    except UnknownCompression as exc:  # its message lists the valid specs
        raise ValueError(str(exc)) from None


# A delta codec spec (``none``, ``int4``, ``sparse:0.25+int4``...), stored in its canonical spelling.
CompressionSpec = Annotated[str, AfterValidator(_compression_spec)]


def read_yaml_mapping(path: str | os.PathLike[str], error: type[FedmergeError], expected: str = "a mapping of fields") -> dict[str, Any]:
    """The top-level mapping of a YAML file; ``error`` is raised, naming the file, for a missing
    file, invalid YAML or a document that is not a mapping (an empty file is an empty mapping)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{p}: no such config file") from None
    except IsADirectoryError:
        raise error(f"{p}: is a folder, expected a YAML config file") from None
    except yaml.YAMLError as exc:
        raise error(f"{p}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{p}: expected {expected} at the top level")
    return data


def describe_validation_error(exc: ValidationError) -> str:
    """Every problem pydantic found, as ``field.sub[2]: message``, separated by semicolons."""
    parts = []
    for err in exc.errors():
        loc = ".".join(f"[{x}]" if isinstance(x, int) else str(x) for x in err["loc"]).replace(".[", "[") or "(root)"
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def validate_config(data: dict[str, Any], model: type[M], path: str | os.PathLike[str], error: type[FedmergeError]) -> M:
    """Validate an already-read mapping as ``model``, resolving its paths against ``path``'s folder."""
    p = Path(path)
    try:
        return model.model_validate(data, context={CONFIG_DIR: p.parent.resolve()})
    except ValidationError as exc:
        raise error(f"{p}: {describe_validation_error(exc)}") from None


def load_config(path: str | os.PathLike[str], model: type[M], error: type[FedmergeError], expected: str = "a mapping of fields") -> M:
    """Read ``path`` (YAML) as ``model``: errors name the file and the field, paths are relative to the file."""
    return validate_config(read_yaml_mapping(path, error, expected), model, path, error)


class ConfigError(FedmergeError):
    """A federation, client or simulation config file is missing, not YAML, or has a bad field."""
