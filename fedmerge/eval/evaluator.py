"""Scoring models with lm-evaluation-harness, round after round, offline.

``Evaluator(config)`` builds its lm-eval tasks once (local JSONL tasks and built-in medical
tasks, datasets read from local files only) and reuses them for every ``evaluate`` call. Before
each call the few-shot samplers are re-seeded, so identical weights always get identical prompts
and therefore identical scores, whichever round they are scored in. Every score is appended to
the ``ResultsStore``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmerge import console
from fedmerge.checkpoints.fingerprint import folder_fingerprint, state_dict_fingerprint
from fedmerge.checkpoints.reader import require_safetensors_weights
from fedmerge.devices import torch_threads
from fedmerge.eval import lmeval
from fedmerge.eval.catalog import TaskCatalog
from fedmerge.eval.config import EvalConfig
from fedmerge.eval.errors import EvalError
from fedmerge.eval.store import ROLES, ResultsStore, ScoreRecord

log = logging.getLogger(__name__)

def force_offline() -> None:
    """Make the hub and ``datasets`` libraries refuse the network, even if already imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import sys

    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as ds_config

        ds_config.HF_HUB_OFFLINE = True
        ds_config.HF_DATASETS_OFFLINE = True


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str
    value: float | None
    stderr: float | None
    n: int | None
    version: str | None = None  # the task's version (its config's metadata), as lm-eval reports it


@dataclass
class EvalResult:
    """The scores of one model: one ``TaskScore`` per (task, metric)."""

    run_id: str
    label: str
    role: str
    round: int | None
    fingerprint: str | None
    scores: list[TaskScore]
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    num_fewshot: int | None = None
    limit: int | float | None = None
    seed: int | None = None
    # task -> item id -> accuracy of that item (1.0 or 0.0); filled only when asked (``items=True``)
    items: dict[str, dict[str, float]] = field(default_factory=dict)

    def value(self, task: str, metric: str = "acc") -> float:
        for s in self.scores:
            if s.task == task and s.metric == metric:
                return float(s.value) if s.value is not None else float("nan")
        raise KeyError(f"no {metric} score for task {task!r} in this result")

    def stderr(self, task: str, metric: str = "acc") -> float | None:
        for s in self.scores:
            if s.task == task and s.metric == metric:
                return s.stderr
        raise KeyError(f"no {metric} score for task {task!r} in this result")

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(s.task for s in self.scores))

    def accuracies(self, metric: str = "acc") -> dict[str, float]:
        return {s.task: float(s.value) for s in self.scores if s.metric == metric and s.value is not None}

    def mean(self, metric: str = "acc") -> float:
        acc = self.accuracies(metric)
        if not acc:
            raise KeyError(f"no {metric} scores in this result")
        return sum(acc.values()) / len(acc)


class Evaluator:
    """Scores models on a fixed set of lm-eval tasks; tasks are built once and reused."""

    def __init__(self, config: EvalConfig, store: ResultsStore | str | Path | None = "config"):
        self.config = config
        if isinstance(store, str) and store == "config":
            store = config.store
        self.store = ResultsStore(store) if isinstance(store, (str, Path)) else store
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype(self.device)
        self.batch_size = config.resolved_batch_size(self.device)
        self._tasks: dict[str, Any] | None = None
        self._task_manager = None
        self.build_seconds: float | None = None
        force_offline()

    # ----------------------------------------------------------------- tasks

    def build_tasks(self) -> dict[str, Any]:
        """Build (once) the lm-eval Task objects of ``config.tasks``, in that order."""
        if self._tasks is not None:
            return self._tasks
        force_offline()
        t0 = time.perf_counter()
        cfg = self.config
        names = list(dict.fromkeys(cfg.tasks))
        built: dict[str, Any] = {}
        with console.stage("load tasks", total=len(names), unit="tasks") as st:
            catalog = TaskCatalog(cfg.task_dirs, cfg.builtin_datasets)
            for name in names:
                built[name] = catalog.build(name)
                st.advance()
        self._task_manager = catalog.task_manager
        self._tasks = built
        self.build_seconds = time.perf_counter() - t0
        log.debug("built %d task(s) in %.1f s: %s", len(built), self.build_seconds, ", ".join(built))
        return built

    # ----------------------------------------------------------------- scoring

    def _make_lm(self, model, tokenizer):
        if lmeval.is_lm(model):
            return model, "<lm>", None
        if isinstance(model, (str, Path)):
            folder = Path(model)
            if not (folder / "config.json").is_file():
                raise EvalError(f"{folder}: not a model folder (no config.json)")
            folder = folder.resolve()
            # Never unpickle, whatever `fingerprint` says: refuse pickle-only weights before
            # transformers sees the folder, and forbid its pickle fallback.
            require_safetensors_weights(folder)
            lm = lmeval.hf_lm(
                pretrained=str(folder), tokenizer=tokenizer, device=self.device, dtype=self.dtype,
                batch_size=self.batch_size, max_batch_size=self.config.max_batch_size, use_safetensors=True,
            )
            fp = folder_fingerprint(folder) if self.config.fingerprint else None
            return lm, str(folder), fp
        if isinstance(model, tuple):
            if len(model) != 2:
                raise EvalError("an in-memory model is given as (model, tokenizer)")
            model, tokenizer = model
        if tokenizer is None:
            raise EvalError("an in-memory model needs its tokenizer: evaluate((model, tokenizer)) or tokenizer=")
        # With a model object lm-eval takes the batch size from HFLM itself (simple_evaluate's
        # own batch_size is ignored), and the model stays on the device it is on.
        lm = lmeval.hf_lm(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, max_batch_size=self.config.max_batch_size)
        fp = state_dict_fingerprint(model.state_dict()) if self.config.fingerprint else None
        return lm, "<in-memory>", fp

    def evaluate(
        self,
        model,
        *,
        round: int | None = None,
        label: str | None = None,
        role: str = "merge",
        strategy: str | None = None,
        params: dict[str, Any] | None = None,
        tokenizer=None,
        fingerprint: str | None = None,
        items: bool = False,
    ) -> EvalResult:
        """Score a model folder, a ``(model, tokenizer)`` pair in memory, or an lm-eval ``LM``.

        ``label`` names the row in reports (a merge method, a hospital, 'base'); ``role`` is
        base, parent or merge. Scores are appended to the store when there is one. With
        ``items`` the result also holds each item's accuracy (``EvalResult.items``), for paired
        comparisons of two models on the same items.
        """
        if role not in ROLES:
            raise EvalError(f"role {role!r} is not one of {', '.join(ROLES)}")
        tasks = self.build_tasks()
        cfg = self.config
        t0 = time.perf_counter()
        with console.stage("load model") as st:
            lm, source, fp = self._make_lm(model, tokenizer)
            fingerprint = fingerprint or fp
            st.note(Path(source).name if not source.startswith("<") else source)
        label = label or strategy or (Path(source).name if not source.startswith("<") else role)
        for task in tasks.values():
            # The sampler's generator advances as prompts are built: without a reset each round
            # would draw different few-shot examples and identical weights would score differently.
            task.set_fewshot_seed(seed=cfg.seed)
        # One thread can be many times faster than two on a shared CPU (``cpu_threads``).
        with torch_threads(cfg.cpu_threads if self.device == "cpu" else None):
            with console.stage(f"score {label}" + (f" (round {round})" if round is not None else ""), unit="requests") as st:
                out = lmeval.evaluate(
                    lm, list(tasks.values()), tm=self._task_manager, stage=st,
                    num_fewshot=cfg.num_fewshot,
                    limit=cfg.limit,
                    bootstrap_iters=cfg.bootstrap_iters,
                    random_seed=cfg.seed,
                    numpy_random_seed=cfg.seed,
                    torch_random_seed=cfg.seed,
                    fewshot_random_seed=cfg.seed,
                    log_samples=items,
                )
                scores = _scores_from(out, tasks)
                per_item = lmeval.item_scores(out) if items else {}
                accs = [x.value for x in scores if x.metric == "acc" and x.value is not None]
                if accs:
                    st.note(f"mean acc {sum(accs) / len(accs):.4f} over {len(accs)} task(s)")
        seconds = time.perf_counter() - t0
        run_id = uuid.uuid4().hex
        result = EvalResult(run_id=run_id, label=label, role=role, round=round, fingerprint=fingerprint,
                            scores=scores, seconds=seconds, params=dict(params or {}),
                            num_fewshot=cfg.num_fewshot, limit=cfg.limit, seed=cfg.seed, items=per_item)
        for s in scores:
            log.debug("%s round=%s %s %s=%.4f ± %.4f (n=%s, version %s)", label, round, s.task, s.metric, s.value, s.stderr or 0.0, s.n, s.version)
        if self.store is not None:
            self.store.append_scores(
                ScoreRecord(
                    run_id=run_id, task=s.task, metric=s.metric, value=s.value, stderr=s.stderr, label=label,
                    role=role, round=round, strategy=strategy, params=dict(params or {}), fingerprint=fingerprint,
                    model=source, n=s.n, num_fewshot=cfg.num_fewshot,
                    item_limit=float(cfg.limit) if cfg.limit is not None else None, seed=cfg.seed,
                    task_version=s.version,
                )
                for s in scores
            )
        return result


def _scores_from(out: dict[str, Any], tasks: dict[str, Any]) -> list[TaskScore]:
    scores = []
    for name, task in tasks.items():
        res = out["results"].get(name)
        if res is None:
            raise EvalError(f"lm-eval returned no results for task {name!r}")
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        version = lmeval.task_version(task)
        for key, value in res.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            if not isinstance(value, (int, float)):
                continue
            stderr = res.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) else None
            scores.append(TaskScore(task=name, metric=metric if filt == "none" else f"{metric}:{filt}",
                                    value=float(value), stderr=stderr, n=n, version=version))
    return scores
