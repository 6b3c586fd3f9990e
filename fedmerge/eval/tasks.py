"""Task definitions for the evaluator: local JSONL tasks and lm-eval's built-in medical tasks.

A *local task* is a YAML file plus a JSONL file of items, one JSON object a line::

    {"id": "q1", "question": "...", "choices": ["...", "...", "...", "..."], "answer": 2}

with an optional ``"context"`` (the abstract, for PubMedQA-style items). For continuation tasks
(HellaSwag-style) ``question`` is the context and ``choices`` are the candidate endings.

Two YAML forms are read from a task folder:

* the full lm-eval form, as ``write_local_task`` writes it (``dataset_path: json`` and
  ``dataset_kwargs.data_files``); ``python -m lm_eval --include_path FOLDER`` reads it as is.
  Relative ``data_files`` are taken relative to the YAML file (lm-eval itself needs absolute
  paths, so fedmerge resolves them before lm-eval sees the config);
* the short form ``task: NAME`` + ``template: KIND`` (one of ``KINDS``), which fedmerge expands
  with the packaged template of that kind and ``NAME.jsonl`` (and ``NAME.fewshot.jsonl`` when
  present) next to the YAML. Any other key overrides the template (``description``, ...).

Every JSONL file is checked line by line here, before lm-eval or ``datasets`` reads it, so a bad
line is reported as ``file:line: what is wrong`` rather than as a pyarrow traceback.

Built-in tasks (``BUILTIN_TASKS``) are built from lm-eval's own YAML files, optionally pointed at
a local copy of their dataset; nothing is ever downloaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from fedmerge.checkpoints.atomic import write_text_atomic
from fedmerge.eval.errors import DatasetUnavailable, TaskFileError, UnknownTask

KINDS = ("medqa", "pubmedqa", "mmlu", "medmcqa", "hellaswag")
# Kinds whose prompt letters the options A-D: their items must have exactly four choices.
_FOUR_OPTION_KINDS = {"medqa", "mmlu", "medmcqa"}
_TEMPLATES = Path(__file__).parent / "task_templates"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Where write_local_task records the kind, so a folder scan can validate items fully.
KIND_METADATA_KEY = "fedmerge_kind"

# lm-eval built-in tasks the paper reports, with their YAML inside lm_eval/tasks. Building them
# from these files directly avoids indexing all of lm-eval's tasks (~10 s) on every start.
BUILTIN_TASKS: dict[str, str] = {
    "medqa_4options": "medqa/medqa.yaml",
    "pubmedqa": "pubmedqa/pubmedqa.yaml",
    "mmlu_professional_medicine": "mmlu/default/mmlu_professional_medicine.yaml",
    "medmcqa": "medmcqa/medmcqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}
# Columns a local copy of each built-in dataset must have (those of its hub dataset).
BUILTIN_COLUMNS: dict[str, str] = {
    "medqa_4options": "sent1, ending0..ending3, label",
    "pubmedqa": "QUESTION, CONTEXTS (list of strings), final_decision (yes/no/maybe)",
    "mmlu_professional_medicine": "question, choices (4 strings), answer (0-3)",
    "medmcqa": "question, opa, opb, opc, opd, cop (0-3)",
    "hellaswag": "activity_label, ctx_a, ctx_b, endings (4 strings), label",
}
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# --------------------------------------------------------------------------- items


def template(kind: str) -> dict[str, Any]:
    """The packaged lm-eval config body of a task kind (without task name and data files)."""
    if kind not in KINDS:
        raise UnknownTask(f"unknown task kind {kind!r}: expected one of {', '.join(KINDS)}")
    return yaml.safe_load((_TEMPLATES / f"{kind}.yaml").read_text())


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
    cfg = template(kind)
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
    body: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": "test",
        "fewshot_split": "train" if fewshot_text is not None else "test",
    }
    if description:
        body["description"] = description
    body.update(cfg)
    body["metadata"] = {**cfg.get("metadata", {}), KIND_METADATA_KEY: kind}
    if fewshot_text is not None:
        write_text_atomic(folder / f"{name}.fewshot.jsonl", fewshot_text)
    write_text_atomic(data, text)
    out = folder / f"{name}.yaml"
    write_text_atomic(out, f"# fedmerge local task ({kind}); items in {data.name}\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=1000))
    return out


# --------------------------------------------------------------------------- task folders


@dataclass(frozen=True)
class LocalTask:
    name: str
    yaml_path: Path
    kind: str | None
    config: dict[str, Any]  # ready for lm-eval: absolute data files, template expanded


def _load_yaml_file(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=True)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise TaskFileError(path, mark.line + 1 if mark else None, f"invalid YAML: {exc.problem or exc}") from None
    except (ValueError, OSError, ImportError, AttributeError) as exc:
        raise TaskFileError(path, None, f"cannot load task config: {exc}") from None
    return cfg


def _task_name_of(path: Path) -> str | None:
    """The ``task:`` of a YAML file without resolving functions (cheap, for discovery)."""
    try:
        head = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)  # noqa: S506 - no object construction
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise TaskFileError(path, mark.line + 1 if mark else None, f"invalid YAML: {exc.problem or exc}") from None
    if isinstance(head, dict) and isinstance(head.get("task"), str):
        return head["task"]
    return None


class _TolerantLoader(yaml.SafeLoader):
    """Safe YAML loading that keeps lm-eval's ``!function`` tags as plain strings."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def discover(task_dirs: Iterable[str | Path]) -> dict[str, Path]:
    """Map task name -> YAML file for every ``*.yaml`` task in the folders (not recursive)."""
    found: dict[str, Path] = {}
    for d in task_dirs:
        d = Path(d)
        if not d.is_dir():
            raise TaskFileError(d, None, "task folder not found")
        for path in sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml")):
            name = _task_name_of(path)
            if name is None:
                continue
            if name in found and found[name] != path:
                raise TaskFileError(path, None, f"task {name!r} is also defined in {found[name]}")
            found[name] = path
    return found


def _resolve_data_files(data_files: Any, base: Path, yaml_path: Path) -> Any:
    def one(p: Any) -> str:
        if not isinstance(p, str):
            raise TaskFileError(yaml_path, None, f"data_files entries must be paths, got {p!r}")
        q = Path(p).expanduser()
        q = q if q.is_absolute() else (base / q)
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


def load_local_task(yaml_path: str | Path) -> LocalTask:
    """Read one task YAML, expand a ``template:``, resolve and check its data files."""
    yaml_path = Path(yaml_path).resolve()
    cfg = _load_yaml_file(yaml_path)
    name = cfg.get("task")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TaskFileError(yaml_path, None, f"'task' must be a task name, got {name!r}")
    base = yaml_path.parent
    kind = cfg.pop("template", None)
    if kind is not None:
        if kind not in KINDS:
            raise TaskFileError(yaml_path, None, f"template {kind!r} is not one of {', '.join(KINDS)}")
        merged = template(kind)
        merged.update({"dataset_path": "json", "test_split": "test"})
        if "dataset_kwargs" not in cfg:
            files = {"test": f"{name}.jsonl"}
            if (base / f"{name}.fewshot.jsonl").exists():
                files["train"] = f"{name}.fewshot.jsonl"
            cfg["dataset_kwargs"] = {"data_files": files}
        files = cfg["dataset_kwargs"].get("data_files", {})
        merged["fewshot_split"] = "train" if isinstance(files, dict) and "train" in files else "test"
        merged.update(cfg)
        merged["metadata"] = {**template(kind).get("metadata", {}), **(cfg.get("metadata") or {}), KIND_METADATA_KEY: kind}
        cfg = merged
    else:
        meta = cfg.get("metadata")
        kind = meta.get(KIND_METADATA_KEY) if isinstance(meta, dict) else None
    kwargs = cfg.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        kwargs = dict(kwargs)
        kwargs["data_files"] = _resolve_data_files(kwargs["data_files"], base, yaml_path)
        cfg["dataset_kwargs"] = kwargs
        # Our own kinds (and JSON tasks using our columns) get the full item check; other JSON
        # tasks at least get a line-by-line syntax check before pyarrow sees them.
        if cfg.get("dataset_path") == "json":
            for p in _data_paths(kwargs["data_files"]):
                read_jsonl(p, kind, contract=kind is not None)
    return LocalTask(name=name, yaml_path=yaml_path, kind=kind, config=cfg)


# --------------------------------------------------------------------------- built-in tasks


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def builtin_config(name: str, local: str | Path | Mapping[str, str] | None = None) -> dict[str, Any]:
    """lm-eval's own config of a built-in task, pointed at a local copy of its dataset if given.

    ``local`` is a folder (a copy of the hub dataset repository, or anything
    ``datasets.load_dataset(folder, name)`` reads), one data file used for every split, or a
    mapping split -> file. Without it the dataset must already be in the local ``datasets`` cache.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    rel = BUILTIN_TASKS.get(name)
    if rel is None:
        raise UnknownTask(f"{name!r} is not one of the built-in tasks fedmerge configures: {', '.join(BUILTIN_TASKS)}")
    cfg = load_yaml(_lm_eval_tasks_dir() / rel, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    hub = cfg.get("dataset_path")
    if local is None:
        if name == "pubmedqa":
            raise DatasetUnavailable(
                f"built-in task pubmedqa reads {hub} through a dataset loading script, which the installed "
                f"'datasets' no longer runs; give a local copy in the same columns ({BUILTIN_COLUMNS[name]}): "
                "builtin_datasets: {pubmedqa: /path/to/pubmedqa.jsonl} in the eval config, "
                "or --dataset pubmedqa=/path/to/pubmedqa.jsonl on the command line"
            )
        return cfg
    splits = [cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")]
    splits = [s for s in dict.fromkeys(splits) if s]
    if isinstance(local, Mapping):
        files = {}
        for split, p in local.items():
            q = Path(p).expanduser().resolve()
            if not q.is_file():
                raise DatasetUnavailable(f"local copy of {hub} for task {name}, split {split}: {q} not found")
            files[split] = str(q)
        needed = cfg.get("test_split") or cfg.get("validation_split")
        if needed not in files:
            raise DatasetUnavailable(f"local copy of {hub} for task {name} gives splits {sorted(files)} but not {needed!r}, which the task scores")
        builder = _builder_of(Path(next(iter(files.values()))), name)
        for key in ("training_split", "validation_split", "fewshot_split"):
            if cfg.get(key) and cfg[key] not in files:
                cfg[key] = None
        if cfg.get("fewshot_split") is None and cfg.get("training_split") is None:
            cfg["fewshot_split"] = needed
    else:
        q = Path(local).expanduser().resolve()
        if q.is_dir():
            cfg["dataset_path"] = str(q)
            return cfg
        if not q.is_file():
            raise DatasetUnavailable(f"local copy of {hub} for task {name}: {q} not found (give a folder or a .jsonl/.json/.parquet/.csv file with columns {BUILTIN_COLUMNS[name]})")
        builder = _builder_of(q, name)
        files = {s: str(q) for s in splits}
    cfg["dataset_path"] = builder
    cfg["dataset_name"] = None
    cfg["dataset_kwargs"] = {**(cfg.get("dataset_kwargs") or {}), "data_files": files}
    cfg["dataset_kwargs"].pop("trust_remote_code", None)
    return cfg


def _builder_of(path: Path, name: str) -> str:
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DatasetUnavailable(f"local copy for task {name}: {path} is not a .jsonl, .json, .parquet or .csv file")
    return builder


def hub_dataset_of(name: str) -> str:
    """The hub dataset id a built-in task reads (for messages)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(_lm_eval_tasks_dir() / BUILTIN_TASKS[name], resolve_func=False)
    ds = cfg.get("dataset_path", "?")
    return f"{ds} ({cfg['dataset_name']})" if cfg.get("dataset_name") else str(ds)
