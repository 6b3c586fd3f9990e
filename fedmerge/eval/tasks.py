"""Local tasks: items in JSONL, the five packaged prompt templates, and the task YAML files.

A *local task* is a YAML file plus a JSONL file of items, one JSON object a line::

    {"id": "q1", "question": "...", "choices": ["...", "...", "...", "..."], "answer": 2}

with an optional ``"context"`` (the abstract, for PubMedQA-style items). For continuation tasks
(HellaSwag-style) ``question`` is the context and ``choices`` are the candidate endings.

Two YAML forms live in a task folder:

* the full lm-eval form, as ``write_local_task`` writes it (``dataset_path: json`` and
  ``dataset_kwargs.data_files``); ``python -m lm_eval --include_path FOLDER`` reads it as is.
  Relative ``data_files`` are taken relative to the YAML file (lm-eval itself would take them
  relative to the working directory, so fedmerge hands lm-eval the resolved paths);
* the short form ``task: NAME`` + ``template: KIND`` (one of ``KINDS``), which fedmerge expands
  with the packaged template of that kind and ``NAME.jsonl`` (and ``NAME.fewshot.jsonl`` when
  present) next to the YAML. Any other key overrides the template (``description``, ...).

Every JSONL file is checked line by line here, before lm-eval or ``datasets`` reads it, so a bad
line is reported as ``file:line: what is wrong`` rather than as a pyarrow traceback. Finding the
task files in their folders is lm-eval's job (``fedmerge.eval.catalog``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from fedmerge.checkpoints.atomic import write_text_atomic
from fedmerge.configfile import resolve_relative
from fedmerge.eval.errors import TaskFileError, UnknownTask

KINDS = ("medqa", "pubmedqa", "mmlu", "medmcqa", "hellaswag")
# Kinds whose prompt letters the options A-D: their items must have exactly four choices.
_FOUR_OPTION_KINDS = {"medqa", "mmlu", "medmcqa"}
_TEMPLATES = Path(__file__).parent / "task_templates"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Where the kind is recorded in a task's metadata, so its items can be checked fully.
KIND_METADATA_KEY = "fedmerge_kind"
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def template(kind: str) -> dict[str, Any]:
    """The packaged lm-eval config body of a task kind (without task name and data files)."""
    if kind not in KINDS:
        raise UnknownTask(f"unknown task kind {kind!r}: expected one of {', '.join(KINDS)}")
    return yaml.safe_load((_TEMPLATES / f"{kind}.yaml").read_text())


def task_config(kind: str, name: str, data_files: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The complete lm-eval config of a local task of ``kind`` reading ``data_files``.

    ``data_files`` maps 'test' (the items) and optionally 'train' (the few-shot examples) to
    files. Without 'train' every split the template names 'train' becomes 'test': few-shot
    examples are then drawn from the items, and lm-eval leaves the item being scored out.
    """
    cfg = template(kind)
    if "train" not in data_files:
        for key in _SPLIT_KEYS:
            if cfg.get(key) == "train":
                cfg[key] = "test"
    overrides = dict(overrides or {})
    body: dict[str, Any] = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": dict(data_files)}}
    body.update(cfg)
    body.update(overrides)
    body["metadata"] = {**cfg.get("metadata", {}), **(overrides.get("metadata") or {}), KIND_METADATA_KEY: kind}
    return body


# --------------------------------------------------------------------------- items


def check_item(item: Any, kind: str | None, where: str, line: int | None) -> dict[str, Any]:
    """Check one item against contract 4 (and its kind's shape); raise ``TaskFileError`` if not."""

    def bad(problem: str) -> TaskFileError:
        return TaskFileError(where, line, problem)

    if not isinstance(item, dict):
        raise bad(f"expected a JSON object, got {type(item).__name__}")
    for key in ("id", "question", "choices", "answer"):
        if key not in item:
            raise bad(f"missing field {key!r} (an item needs id, question, choices, answer)")
    if not isinstance(item["id"], str) or not item["id"]:
        raise bad("field 'id' must be a non-empty string")
    if not isinstance(item["question"], str):
        raise bad("field 'question' must be a string")
    choices = item["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise bad("field 'choices' must be a list of at least two non-empty strings")
    answer = item["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise bad(f"field 'answer' must be an integer index into 'choices', got {answer!r}")
    if not 0 <= answer < len(choices):
        raise bad(f"field 'answer' is {answer} but there are {len(choices)} choices (valid: 0..{len(choices) - 1})")
    if "context" in item and not isinstance(item["context"], str):
        raise bad("field 'context' must be a string when present")
    if kind in _FOUR_OPTION_KINDS and len(choices) != 4:
        raise bad(f"a {kind} item needs exactly 4 choices, got {len(choices)}")
    if kind == "pubmedqa" and not item.get("context"):
        raise bad("a pubmedqa item needs a non-empty 'context' (the abstract)")
    return item


def read_jsonl(path: str | Path, kind: str | None = None, *, contract: bool = True) -> list[dict[str, Any]]:
    """Read and check a JSONL file line by line; errors name the file and the 1-based line.

    With ``contract=False`` only the syntax is checked (every line one JSON object), for
    lm-eval YAMLs of other people's columns.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(path, None, "data file not found")
    items: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                raise TaskFileError(path, number, "empty line (every line must be one JSON object)")
            try:
                item = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise TaskFileError(path, number, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
            if not isinstance(item, dict):
                raise TaskFileError(path, number, f"expected a JSON object, got {type(item).__name__}")
            if contract:
                check_item(item, kind, str(path), number)
                if item["id"] in seen:
                    raise TaskFileError(path, number, f"duplicate id {item['id']!r} (first on line {seen[item['id']]})")
                seen[item["id"]] = number
            items.append(item)
    if not items:
        raise TaskFileError(path, None, "no items (the file is empty)")
    return items


def _jsonl_text(items: Iterable[Mapping[str, Any]], kind: str, where: str) -> str:
    lines = []
    seen: set[str] = set()
    for i, item in enumerate(items, start=1):
        check_item(dict(item), kind, where, i)
        if item["id"] in seen:
            raise TaskFileError(where, i, f"duplicate id {item['id']!r}")
        seen.add(item["id"])
        lines.append(json.dumps(dict(item), ensure_ascii=False))
    if not lines:
        raise TaskFileError(where, None, "no items given")
    return "\n".join(lines) + "\n"


def write_local_task(
    folder: str | Path,
    name: str,
    items: Iterable[Mapping[str, Any]],
    kind: str = "medqa",
    fewshot_items: Iterable[Mapping[str, Any]] | None = None,
    description: str | None = None,
) -> Path:
    """Write ``NAME.yaml`` + ``NAME.jsonl`` (+ ``NAME.fewshot.jsonl``) into ``folder``.

    The YAML is a complete lm-eval task config with absolute ``data_files`` paths, so both
    fedmerge and ``python -m lm_eval --include_path FOLDER --tasks NAME`` read it. Without
    ``fewshot_items`` the few-shot examples are drawn from the items themselves (lm-eval leaves
    the item being scored out of its own context). Items are checked before anything is written.
    Returns the YAML path.
    """
    if not _NAME_RE.match(name):
        raise UnknownTask(f"task name {name!r} is not usable: letters, digits, '_', '.', '-' only")
    template(kind)
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    text = _jsonl_text(items, kind, str(data))
    data_files = {"test": str(data)}
    fewshot_text = None
    if fewshot_items is not None:
        fs = folder / f"{name}.fewshot.jsonl"
        fewshot_text = _jsonl_text(fewshot_items, kind, str(fs))
        data_files["train"] = str(fs)
    body = task_config(kind, name, data_files, {"description": description} if description else None)
    if fewshot_text is not None:
        write_text_atomic(folder / f"{name}.fewshot.jsonl", fewshot_text)
    write_text_atomic(data, text)
    out = folder / f"{name}.yaml"
    write_text_atomic(out, f"# fedmerge local task ({kind}); items in {data.name}\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=1000))
    return out


# --------------------------------------------------------------------------- task YAML files


@dataclass(frozen=True)
class LocalTask:
    """A local task file, ready for lm-eval.

    ``config`` is the complete config when fedmerge builds it (a short-form file, or any file read
    here without lm-eval's help); otherwise lm-eval reads the YAML itself and ``overrides`` holds
    the keys fedmerge replaces (data files resolved against the YAML's folder).
    """

    name: str
    yaml_path: Path
    kind: str | None
    config: dict[str, Any] | None
    overrides: dict[str, Any] = field(default_factory=dict)


def _yaml_error(path: Path, exc: yaml.YAMLError) -> TaskFileError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if isinstance(exc, yaml.constructor.ConstructorError) and "!function" in str(exc):
        problem = ("uses lm-eval's !function tag, which a short-form (template:) task cannot; write a full lm-eval "
                   "task YAML and put it in a task folder")
        return TaskFileError(path, mark.line + 1 if mark else None, problem)
    return TaskFileError(path, mark.line + 1 if mark else None, f"invalid YAML: {problem}")


def read_task_yaml(path: str | Path) -> dict[str, Any]:
    """A task YAML read safely (no code runs); errors name the file and the line."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    except OSError as exc:
        raise TaskFileError(path, None, f"cannot read: {exc.strerror or exc}") from None
    if not isinstance(raw, dict):
        raise TaskFileError(path, None, f"expected a mapping of task settings, got {type(raw).__name__}")
    return raw


def yaml_problem(path: str | Path) -> TaskFileError | None:
    """Why lm-eval could not read a YAML file (syntax), or None when it is well-formed YAML."""
    path = Path(path)
    try:
        yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)  # noqa: S506 - constructs no objects
    except yaml.YAMLError as exc:
        return _yaml_error(path, exc)
    except OSError as exc:
        return TaskFileError(path, None, f"cannot read: {exc.strerror or exc}")
    return None


class _TolerantLoader(yaml.SafeLoader):
    """Safe loading that accepts lm-eval's tags (``!function``) without resolving them."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _resolve_data_files(data_files: Any, base: Path, yaml_path: Path) -> Any:
    def one(p: Any) -> str:
        if not isinstance(p, str):
            raise TaskFileError(yaml_path, None, f"data_files entries must be paths, got {p!r}")
        q = resolve_relative(p, base)
        if not q.exists():
            raise TaskFileError(yaml_path, None, f"data file {q} not found")
        return str(q.resolve())

    if isinstance(data_files, str):
        return one(data_files)
    if isinstance(data_files, list):
        return [one(p) for p in data_files]
    if isinstance(data_files, dict):
        return {split: _resolve_data_files(v, base, yaml_path) for split, v in data_files.items()}
    raise TaskFileError(yaml_path, None, f"dataset_kwargs.data_files has an unexpected form: {data_files!r}")


def _data_paths(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, list):
        return list(data_files)
    return [p for v in data_files.values() for p in _data_paths(v)]


def _expand_short_form(yaml_path: Path, cfg: dict[str, Any]) -> LocalTask:
    name = cfg["task"]
    kind = cfg.pop("template")
    if kind not in KINDS:
        raise TaskFileError(yaml_path, None, f"template {kind!r} is not one of {', '.join(KINDS)}")
    base = yaml_path.parent
    kwargs = cfg.pop("dataset_kwargs", None)
    if kwargs is None:
        files = {"test": f"{name}.jsonl"}
        if (base / f"{name}.fewshot.jsonl").exists():
            files["train"] = f"{name}.fewshot.jsonl"
        kwargs = {"data_files": files}
    files = kwargs.get("data_files")
    if not isinstance(files, dict) or "test" not in files:
        raise TaskFileError(yaml_path, None, "a template task's dataset_kwargs.data_files must map 'test' (and optionally 'train') to files")
    resolved = _resolve_data_files(files, base, yaml_path)
    for p in _data_paths(resolved):
        read_jsonl(p, kind)
    config = task_config(kind, name, resolved, cfg)
    config["dataset_kwargs"] = {**kwargs, "data_files": resolved}
    return LocalTask(name=name, yaml_path=yaml_path, kind=kind, config=config)


def load_local_task(yaml_path: str | Path, raw: Mapping[str, Any] | None = None) -> LocalTask:
    """Read one task YAML: expand a ``template:``, resolve and check its data files.

    ``raw`` is the config lm-eval's index read from the file (includes merged, functions not
    resolved); without it the file is read here, safely, and must not use ``!function``.
    """
    yaml_path = Path(yaml_path).resolve()
    if raw is None or "template" in raw:
        read = read_task_yaml(yaml_path)
        if "template" in read:
            name = read.get("task")
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise TaskFileError(yaml_path, None, f"'task' must be a task name, got {name!r}")
            return _expand_short_form(yaml_path, read)
        complete = raw is None
        raw = read if raw is None else raw
    else:
        complete = False
    name = raw.get("task")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TaskFileError(yaml_path, None, f"'task' must be a task name, got {name!r}")
    meta = raw.get("metadata")
    kind = meta.get(KIND_METADATA_KEY) if isinstance(meta, dict) else None
    overrides: dict[str, Any] = {}
    kwargs = raw.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        resolved = _resolve_data_files(kwargs["data_files"], yaml_path.parent, yaml_path)
        # Our own kinds (and JSON tasks using our columns) get the full item check; other JSON
        # tasks at least get a line-by-line syntax check before pyarrow sees them.
        if raw.get("dataset_path") == "json":
            for p in _data_paths(resolved):
                read_jsonl(p, kind, contract=kind is not None)
        if resolved != kwargs["data_files"]:
            overrides["dataset_kwargs"] = {**kwargs, "data_files": resolved}
    config = {**raw, **overrides} if complete else None
    return LocalTask(name=name, yaml_path=yaml_path, kind=kind, config=config, overrides=overrides)
