"""The tasks an evaluator can build, found by lm-eval's own ``TaskManager``.

One index covers the task folders (``include_path``, searched the way ``python -m lm_eval
--include_path`` searches them: every ``*.yaml`` below the folder) and the folders of lm-eval's five
built-in medical tasks. A name resolves to

* a local task: a short-form (``template:``) file is expanded by fedmerge and handed to lm-eval as a
  complete config; a full lm-eval YAML is read by lm-eval itself, with its data files resolved
  against the YAML's folder and checked line by line first;
* a built-in task: lm-eval's YAML with the dataset keys of a local copy in place.

When two files define the same task, lm-eval's rule applies: within one folder the first file in
path order wins, and a later folder overrides an earlier one (local folders override built-ins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from fedmerge.eval import lmeval
from fedmerge.eval.builtin import BUILTIN_COLUMNS, BUILTIN_TASKS, builtin_overrides, hub_dataset_of
from fedmerge.eval.errors import DatasetUnavailable, EvalError, TaskFileError, UnknownTask
from fedmerge.eval.tasks import load_local_task, yaml_problem


class TaskCatalog:
    """Local task folders and the built-in tasks, indexed once; ``build(name)`` makes a Task."""

    def __init__(self, task_dirs: Iterable[str | Path] = (), builtin_datasets: Mapping[str, Any] | None = None):
        self.task_dirs = [Path(d) for d in task_dirs]
        for d in self.task_dirs:
            if not d.is_dir():
                raise TaskFileError(d, None, "task folder not found")
        self.builtin_datasets = dict(builtin_datasets or {})
        unknown = set(self.builtin_datasets) - set(BUILTIN_TASKS)
        if unknown:
            raise UnknownTask(
                f"builtin_datasets names {sorted(unknown)}, which are not built-in tasks fedmerge configures ({', '.join(BUILTIN_TASKS)})"
            )
        self.task_manager = lmeval.task_manager(self.task_dirs)

    def local_names(self) -> list[str]:
        out = []
        for name in self.task_manager.all_subtasks:
            entry = lmeval.indexed(self.task_manager, name)
            if entry is not None and not entry.builtin:
                out.append(name)
        return out

    def entry(self, name: str) -> lmeval.IndexedTask:
        """The index entry of ``name``; a clear error when there is none."""
        entry = lmeval.indexed(self.task_manager, name)
        if entry is not None and (not entry.builtin or name in BUILTIN_TASKS):
            return entry
        # lm-eval's index skips files it cannot parse: name the first such file, if any.
        for d in self.task_dirs:
            for path in sorted(d.glob("**/*.yaml")):
                problem = yaml_problem(path)
                if problem is not None:
                    raise TaskFileError(problem.path, problem.line, f"{problem.problem} (so task {name!r} may be missing)")
        known = sorted(set(self.local_names()) | set(BUILTIN_TASKS))
        where = ", ".join(str(d) for d in self.task_dirs) or "no task folder configured"
        raise UnknownTask(f"task {name!r} is neither a local task ({where}) nor a built-in one; known tasks: {', '.join(known)}")

    def build(self, name: str):
        """The lm-eval Task of ``name``, its data read from local files only."""
        entry = self.entry(name)
        if entry.builtin:
            return self._build_builtin(entry)
        local = load_local_task(entry.yaml_path, entry.raw)
        try:
            if local.config is not None:
                return lmeval.load(self.task_manager, name, inline=local.config)
            return lmeval.load(self.task_manager, name, overrides=local.overrides or None)
        except EvalError:
            raise
        except (TypeError, ValueError, KeyError) as exc:  # lm-eval's own complaint about the config
            raise TaskFileError(entry.yaml_path, None, f"lm-eval cannot build task {name!r}: {exc}") from None

    def _build_builtin(self, entry: lmeval.IndexedTask):
        name = entry.name
        local = self.builtin_datasets.get(name)
        overrides = builtin_overrides(name, entry.raw, local)
        try:
            return lmeval.load(self.task_manager, name, overrides=overrides or None)
        except EvalError:
            raise
        except Exception as exc:  # datasets raises many types when something is not on disk
            import datasets.config as ds_config

            hub = hub_dataset_of(name, entry.raw)
            if local is None:
                raise DatasetUnavailable(
                    f"built-in task {name} needs dataset {hub}, which is not in the local datasets cache "
                    f"({ds_config.HF_DATASETS_CACHE}) and the network is never used; point it at a local copy: "
                    f"builtin_datasets: {{{name}: PATH}} in the eval config or --dataset {name}=PATH "
                    f"(a folder copy of the dataset repository, or a .jsonl/.parquet file with columns {BUILTIN_COLUMNS[name]}). "
                    f"[{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}]"
                ) from None
            raise DatasetUnavailable(
                f"built-in task {name}: the local copy {local} could not be read as {hub} "
                f"(expected columns {BUILTIN_COLUMNS[name]}): {type(exc).__name__}: {exc}"
            ) from None
