"""A scorer a hospital's client config can name (``validation_scorer``): scores from a hand-built table.

``TABLE[task][candidate]`` is the accuracy reported; every call is kept in ``CALLS`` with the
tasks of the eval config the hospital handed over, the folder it scored and that folder's
tensors, so a test can check what each hospital scored and on what.
"""

from __future__ import annotations

from pathlib import Path

TABLE: dict[str, dict[str, float]] = {}
CALLS: list[dict] = []

# For scorers in other processes (Flower's engine), which the test cannot hand a table to.
FIXED = {
    "val_a": {"c1": 0.50, "c2": 0.60, "c3": 0.80},
    "val_b": {"c1": 0.50, "c2": 0.55, "c3": 0.30},
    "val_c": {"c1": 0.50, "c2": 0.60, "c3": 0.85},
}


class TableScorer:
    def __init__(self, config):
        self.tasks = list(config.tasks)
        self.task_dirs = [str(p) for p in config.task_dirs]

    def __call__(self, model_dir: Path, *, round: int, candidate: str) -> dict[str, float]:
        from fedmerge.checkpoints import CheckpointReader

        with CheckpointReader(model_dir) as r:
            tensors = {n: r.get(n).clone() for n in r.names()}
        CALLS.append({"tasks": self.tasks, "task_dirs": self.task_dirs, "model_dir": str(model_dir), "round": round,
                      "candidate": candidate, "tensors": tensors})  # fmt: skip
        return {t: TABLE[t][candidate] for t in self.tasks}


class FixedScorer:
    def __init__(self, config):
        self.tasks = list(config.tasks)

    def __call__(self, model_dir: Path, *, round: int, candidate: str) -> dict[str, float]:
        return {t: FIXED[t][candidate] for t in self.tasks}


class BrokenScorer:
    def __init__(self, config):
        self.where = Path(config.tasks[0])

    def __call__(self, model_dir: Path, *, round: int, candidate: str) -> dict[str, float]:
        raise RuntimeError(f"validation data unreadable at {model_dir}/../secret/validation.jsonl")
