"""The one module that talks to lm-evaluation-harness; every other part of fedmerge goes through it.

fedmerge is tested with lm-eval ``TESTED_VERSION`` and ``require()`` refuses any other version
with a message saying so, because a few things below lean on more than lm-eval's public surface.

Public API used: ``simple_evaluate``; ``TaskManager`` (``include_path``, ``include_defaults=False``,
``load`` of names and of config dicts, ``task_index``); a group config whose ``task:`` list carries
per-task keys (lm-eval's documented way to override a task's YAML without editing it); ``HFLM`` and
the ``LM`` interface (``loglikelihood(requests, disable_tqdm)``, ``set_cache_hook``, ``CacheHook``);
``Task.set_fewshot_seed``.

What is not public, kept here and nowhere else:

* ``BUILTIN_FOLDERS``: the folders inside lm-eval's package holding the YAML of the five built-in
  tasks fedmerge configures. Indexing only these takes ~0.02 s; lm-eval's full index of its
  ~10,000 task files takes ~10 s (over a minute on a loaded machine), at every start.
* the fields of the index's entries (``yaml_path``, ``cfg``: the raw config, includes merged,
  functions unresolved), to tell a built-in task from a local one and to read a task's data files.
* while a run lasts, three names inside lm-eval are replaced and put back afterwards:
  ``lm_eval.evaluator.get_git_commit_hash`` (the same ``git describe`` probe, with git's stderr
  captured: outside a repository git prints ``fatal: not a git repository`` straight to the
  terminal), ``lm_eval.evaluator.add_env_info`` (torch's environment report spawns subprocesses,
  ~0.9 s per call, for a field fedmerge never reads; the versions are still recorded), and,
  while libraries are silenced, ``lm_eval.api.task.tqdm`` (the bar lm-eval draws while building
  prompts has no switch: it ignores ``TQDM_DISABLE`` set after tqdm's import).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from fedmerge import console
from fedmerge.eval.errors import EvalError

log = logging.getLogger(__name__)

TESTED_VERSION = "0.4.13"

# Built-in task name -> its folder inside lm_eval/tasks (see the module docstring).
BUILTIN_FOLDERS: dict[str, str] = {
    "medqa_4options": "medqa",
    "pubmedqa": "pubmedqa",
    "mmlu_professional_medicine": "mmlu/default",
    "medmcqa": "medmcqa",
    "hellaswag": "hellaswag",
}
# A name for the wrapper group that carries per-task overrides; never reported.
_OVERRIDE_GROUP = "fedmerge_task_overrides"


class LmEvalVersionError(EvalError):
    """The installed lm-eval is not the version fedmerge's evaluator is tested with."""


_checked: str | None = None


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def require() -> None:
    """Refuse to run on an lm-eval other than ``TESTED_VERSION`` (checked once per process)."""
    global _checked
    if _checked == TESTED_VERSION:
        return
    found = installed_version()
    if found is None:
        raise LmEvalVersionError(f"lm-eval is not installed; fedmerge's evaluator needs lm-eval {TESTED_VERSION}: pip install 'lm-eval=={TESTED_VERSION}'")
    if found != TESTED_VERSION:
        raise LmEvalVersionError(
            f"lm-eval {found} is installed, but fedmerge's evaluator is tested with lm-eval {TESTED_VERSION} only "
            f"(it relies on where lm-eval keeps its built-in task files and on details of its runs that other "
            f"versions change): pip install 'lm-eval=={TESTED_VERSION}'"
        )
    _checked = found


def tasks_root() -> Path:
    """lm-eval's own task folder (inside its package)."""
    require()
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def builtin_folder(name: str) -> Path:
    return tasks_root() / BUILTIN_FOLDERS[name]


def task_manager(task_dirs: list[Path]):
    """A ``TaskManager`` indexing the built-in tasks' folders, then ``task_dirs`` (a local task
    overrides a built-in one of the same name, as lm-eval's ``--include_path`` does)."""
    require()
    if console.libraries_quiet():
        console.quiet_libraries()
    from lm_eval.tasks import TaskManager

    folders = [str(builtin_folder(n)) for n in BUILTIN_FOLDERS] + [str(d) for d in task_dirs]
    return TaskManager(include_path=list(dict.fromkeys(folders)), include_defaults=False)


@dataclass(frozen=True)
class IndexedTask:
    """A task lm-eval's index knows: the YAML file and its raw config (functions unresolved)."""

    name: str
    yaml_path: Path | None
    raw: dict[str, Any]

    @property
    def builtin(self) -> bool:
        return self.yaml_path is not None and tasks_root() in self.yaml_path.resolve().parents


def indexed(tm, name: str) -> IndexedTask | None:
    """The index entry of a single task named ``name`` (not a group or tag), or None."""
    entry = tm.task_index.get(name)
    if entry is None or entry.cfg is None or not isinstance(entry.cfg.get("task"), str):
        return None
    return IndexedTask(name, Path(entry.yaml_path) if entry.yaml_path else None, dict(entry.cfg))


def load(tm, name: str, *, inline: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None):
    """Build one Task: from the index by name, from a complete config dict, or from the indexed
    YAML with some keys replaced (through a group config carrying per-task keys)."""
    if inline is not None:
        spec: Any = inline
    elif overrides:
        spec = {"group": _OVERRIDE_GROUP, "task": [{**overrides, "task": name}]}
    else:
        spec = name
    tasks = tm.load([spec])["tasks"]
    if list(tasks) != [name]:
        raise EvalError(f"task {name!r}: lm-eval built {sorted(tasks)} instead of that one task")
    return tasks[name]


def task_version(task) -> str | None:
    """The version a task declares in its config's metadata (what lm-eval reports as its version)."""
    meta = getattr(task.config, "metadata", None) or {}
    version = meta.get("version") if isinstance(meta, dict) else None
    return None if version is None else str(version)


# ----------------------------------------------------------------------------- models


def _tqdm_disabled_by_env() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


@functools.lru_cache(maxsize=None)
def _classes():
    """(the HFLM subclass fedmerge scores with, a cache hook that counts answered requests)."""
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM

    class ProgressHook(CacheHook):
        """lm-eval calls an LM's cache hook once for every request answered: a progress signal."""

        def __init__(self, stage):
            super().__init__(None)
            self.stage = stage

        def add_partial(self, attr, req, res) -> None:
            super().add_partial(attr, req, res)
            self.stage.advance()

    class FedmergeHFLM(HFLM):
        """HFLM whose request-level bars follow fedmerge's console and which sizes fedmerge's bar."""

        stage = None

        def _quiet(self, disable_tqdm: bool) -> bool:
            # HFLM passes disable=False to tqdm explicitly, which overrides TQDM_DISABLE: honour it here.
            return disable_tqdm or console.libraries_quiet() or _tqdm_disabled_by_env()

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            if self.stage is not None:
                self.stage.set_total((self.stage.total or 0) + len(requests))
            return super().loglikelihood(requests, disable_tqdm=self._quiet(disable_tqdm))

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=self._quiet(disable_tqdm))

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=self._quiet(disable_tqdm))

    return FedmergeHFLM, ProgressHook


def hf_lm(pretrained, **kwargs):
    """lm-eval's ``HFLM`` for a model folder or a transformers model object (kwargs as HFLM's)."""
    require()
    if console.libraries_quiet():
        console.quiet_libraries()
    return _classes()[0](pretrained=pretrained, **kwargs)


def is_lm(obj) -> bool:
    require()
    from lm_eval.api.model import LM

    return isinstance(obj, LM)


# ----------------------------------------------------------------------------- runs

_run_lock = threading.RLock()


def _quiet_git_hash() -> str | None:
    """The probe lm-eval makes (``git describe --always`` in the working directory), git's stderr kept."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)  # noqa: S607
    except OSError as exc:
        log.debug("git probe: %s", exc)
        return None
    if done.returncode != 0:
        log.debug("git probe: %s", done.stderr.strip())
        return None
    return done.stdout.strip() or None


def _light_env_info(storage: dict[str, Any]) -> None:
    from importlib.metadata import version

    import transformers

    storage.update({"pretty_env_info": "not collected by fedmerge", "transformers_version": transformers.__version__,
                    "lm_eval_version": version("lm_eval"), "upper_git_hash": None})


@contextmanager
def _run_environment() -> Iterator[None]:
    import lm_eval.api.task as lm_task
    import lm_eval.evaluator as lm_evaluator

    swaps: list[tuple[Any, str, Any]] = [
        (lm_evaluator, "get_git_commit_hash", _quiet_git_hash),
        (lm_evaluator, "add_env_info", _light_env_info),
    ]
    if console.libraries_quiet():
        swaps.append((lm_task, "tqdm", functools.partial(lm_task.tqdm, disable=True)))
    with _run_lock:
        saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in swaps]
        for mod, attr, new in swaps:
            setattr(mod, attr, new)
        try:
            yield
        finally:
            for mod, attr, old in saved:
                setattr(mod, attr, old)


def evaluate(lm, tasks: list, *, tm, stage=None, log_samples: bool = False, **kwargs) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``tasks`` (built Task objects) with ``lm``; ``stage`` (a
    ``console.Stage``) advances once per answered request when ``lm`` came from ``hf_lm``.
    With ``log_samples`` the result holds lm-eval's per-item records under ``samples``."""
    require()
    import lm_eval

    hooked = stage is not None and isinstance(lm, _classes()[0])
    if hooked:
        lm.stage = stage
        lm.set_cache_hook(_classes()[1](stage))
    try:
        with _run_environment():
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=log_samples, **kwargs)
    finally:
        if hooked:
            from lm_eval.api.model import CacheHook

            lm.stage = None
            lm.set_cache_hook(CacheHook(None))
    if not out or "results" not in out:
        raise EvalError("lm-eval returned no results")
    return out


def item_scores(out: dict[str, Any], metric: str = "acc") -> dict[str, dict[str, float]]:
    """task -> item id -> ``metric`` of that item, from a run made with ``log_samples``.

    An item's id is its document's ``id`` field when it has one (fedmerge's local tasks do), else
    its position in the split.
    """
    items: dict[str, dict[str, float]] = {}
    for task, samples in (out.get("samples") or {}).items():
        per = items.setdefault(task, {})
        for sample in samples:
            if metric not in sample:
                continue
            doc = sample.get("doc")
            key = str(doc["id"]) if isinstance(doc, dict) and "id" in doc else str(sample["doc_id"])
            per[key] = float(sample[metric])
    return items
