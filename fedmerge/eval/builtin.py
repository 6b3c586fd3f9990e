"""lm-eval's built-in medical tasks, pointed at local copies of their datasets.

The five tasks the paper reports keep lm-eval's own YAML (prompts, splits, metrics unchanged);
fedmerge only replaces where the data comes from, so nothing is ever downloaded. A local copy is a
folder (a copy of the hub dataset repository), one data file used for every split the task reads,
or a mapping split -> file; it must have the hub dataset's columns (``BUILTIN_COLUMNS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from fedmerge.eval import lmeval
from fedmerge.eval.errors import DatasetUnavailable, UnknownTask

BUILTIN_TASKS: tuple[str, ...] = tuple(lmeval.BUILTIN_FOLDERS)
# Columns a local copy of each built-in dataset must have (those of its hub dataset).
BUILTIN_COLUMNS: dict[str, str] = {
    "medqa_4options": "sent1, ending0..ending3, label",
    "pubmedqa": "QUESTION, CONTEXTS (list of strings), final_decision (yes/no/maybe)",
    "mmlu_professional_medicine": "question, choices (4 strings), answer (0-3)",
    "medmcqa": "question, opa, opb, opc, opd, cop (0-3)",
    "hellaswag": "activity_label, ctx_a, ctx_b, endings (4 strings), label",
}
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_SPLITS = ("training_split", "validation_split", "test_split", "fewshot_split")


def _check_name(name: str) -> None:
    if name not in BUILTIN_TASKS:
        raise UnknownTask(f"{name!r} is not one of the built-in tasks fedmerge configures: {', '.join(BUILTIN_TASKS)}")


def lm_eval_config(name: str) -> dict[str, Any]:
    """lm-eval's raw config of a built-in task (as its index read it: functions not resolved)."""
    _check_name(name)
    entry = lmeval.indexed(lmeval.task_manager([]), name)
    if entry is None:  # the version check makes this unreachable on the tested lm-eval
        raise UnknownTask(f"lm-eval {lmeval.installed_version()} has no task {name!r} in {lmeval.builtin_folder(name)}")
    return entry.raw


def hub_dataset_of(name: str, raw: Mapping[str, Any] | None = None) -> str:
    """The hub dataset a built-in task reads (for messages)."""
    raw = raw if raw is not None else lm_eval_config(name)
    ds = raw.get("dataset_path", "?")
    return f"{ds} ({raw['dataset_name']})" if raw.get("dataset_name") else str(ds)


def builtin_overrides(name: str, raw: Mapping[str, Any], local: str | Path | Mapping[str, str] | None) -> dict[str, Any]:
    """The keys of lm-eval's config of ``name`` that a local copy of its dataset replaces.

    Without ``local`` nothing is replaced and the dataset must be in the local ``datasets`` cache.
    """
    _check_name(name)
    hub = hub_dataset_of(name, raw)
    if local is None:
        if name == "pubmedqa":
            raise DatasetUnavailable(
                f"built-in task pubmedqa reads {raw.get('dataset_path')} through a dataset loading script, which the installed "
                f"'datasets' no longer runs; give a local copy in the same columns ({BUILTIN_COLUMNS[name]}): "
                "builtin_datasets: {pubmedqa: /path/to/pubmedqa.jsonl} in the eval config, "
                "or --dataset pubmedqa=/path/to/pubmedqa.jsonl on the command line"
            )
        return {}
    out: dict[str, Any] = {}
    splits = [s for s in dict.fromkeys(raw.get(k) for k in _SPLITS) if s]
    if isinstance(local, Mapping):
        files = {}
        for split, p in local.items():
            q = Path(p).expanduser().resolve()
            if not q.is_file():
                raise DatasetUnavailable(f"local copy of {hub} for task {name}, split {split}: {q} not found")
            files[split] = str(q)
        needed = raw.get("test_split") or raw.get("validation_split")
        if needed not in files:
            raise DatasetUnavailable(f"local copy of {hub} for task {name} gives splits {sorted(files)} but not {needed!r}, which the task scores")
        builder = _builder_of(Path(next(iter(files.values()))), name)
        for key in ("training_split", "validation_split", "fewshot_split"):
            if raw.get(key) and raw[key] not in files:
                out[key] = None
        if out.get("fewshot_split", raw.get("fewshot_split")) is None and out.get("training_split", raw.get("training_split")) is None:
            out["fewshot_split"] = needed
    else:
        q = Path(local).expanduser().resolve()
        if q.is_dir():
            return {"dataset_path": str(q)}
        if not q.is_file():
            raise DatasetUnavailable(f"local copy of {hub} for task {name}: {q} not found (give a folder or a .jsonl/.json/.parquet/.csv file with columns {BUILTIN_COLUMNS[name]})")
        builder = _builder_of(q, name)
        files = {s: str(q) for s in splits}
    kwargs = {k: v for k, v in (raw.get("dataset_kwargs") or {}).items() if k != "trust_remote_code"}
    out.update(dataset_path=builder, dataset_name=None, dataset_kwargs={**kwargs, "data_files": files})
    return out


def builtin_config(name: str, local: str | Path | Mapping[str, str] | None = None) -> dict[str, Any]:
    """lm-eval's config of a built-in task as fedmerge runs it: with a local copy's keys in place."""
    raw = lm_eval_config(name)
    cfg = {**raw, **builtin_overrides(name, raw, local)}
    for key in ("tag", "group"):
        cfg.pop(key, None)
    return cfg


def _builder_of(path: Path, name: str) -> str:
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DatasetUnavailable(f"local copy for task {name}: {path} is not a .jsonl, .json, .parquet or .csv file")
    return builder
