"""Reading YAML config files into pydantic models, with errors that name the file and the field.

Every part (merge configs, federation and client configs, the evaluator, the demo) reads its
config through these two functions, so a mistake reads the same wherever it is made:
``path: field.sub[2]: what is wrong``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedmerge.errors import FedmergeError


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
