"""Load a pydantic config from YAML with errors that name the file and the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from fedmerge.configfile import describe_validation_error, read_yaml_mapping
from fedmerge.errors import FedmergeError

M = TypeVar("M", bound=BaseModel)


class ConfigError(FedmergeError):
    """A federation or client config file is missing, not YAML, or has a bad field."""


def load_yaml_config(path: str | os.PathLike[str], model: type[M]) -> M:
    p = Path(path)
    data = _resolve_paths(read_yaml_mapping(p, ConfigError), p.parent.resolve())
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{p}: {describe_validation_error(exc)}") from None


def _resolve_paths(data, root: Path):
    """Relative paths in a config are relative to the config file, not to the working directory."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if isinstance(v, list) and k.endswith("_keys"):
                out[k] = [x if not isinstance(x, str) or os.path.isabs(x) else str(root / x) for x in v]
            elif isinstance(v, str) and (k.endswith(("_dir", "_path", "_file", "_model", "_key", "_cert")) or k in {"base_model", "finetuned", "adapter", "trust_store"}):
                out[k] = v if os.path.isabs(v) or not v else str((root / v))
            else:
                out[k] = _resolve_paths(v, root)
        return out
    if isinstance(data, list):
        return [_resolve_paths(v, root) for v in data]
    return data
