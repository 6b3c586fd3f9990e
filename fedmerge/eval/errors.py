"""Typed errors of the evaluator; each message names the file, task or field at fault."""

from __future__ import annotations

from fedmerge.errors import FedmergeError


class EvalError(FedmergeError):
    """Something about an evaluation run cannot be done as asked."""


class EvalConfigError(EvalError):
    """An evaluation config file or value is invalid."""


class TaskFileError(EvalError):
    """A local task file (YAML or JSONL) is malformed; the message starts with ``file:line``."""

    def __init__(self, path, line: int | None, problem: str):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class UnknownTask(EvalError):
    """A task name is neither a local task nor a supported built-in one."""


class DatasetUnavailable(EvalError):
    """A built-in task's dataset is not on this machine (and the network is never used)."""


class StoreError(EvalError):
    """The results store cannot be opened or written."""


class MixedSettings(EvalError):
    """Scores measured with different settings (shots, items, seed, task versions) were put side by side."""
