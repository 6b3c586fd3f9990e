"""Shared, session-scoped fixtures: lm-eval start-up is heavy, so the tiny model and the local
task folder are built once for the whole evaluator test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from eval_helpers import make_items  # noqa: E402

KINDS = ("medqa", "pubmedqa", "mmlu", "medmcqa", "hellaswag")
ITEMS_PER_TASK = 6


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral

    return build_tiny_mistral(tmp_path_factory.mktemp("eval_model") / "tiny", TinyMistralSpec(), seed=0)


@pytest.fixture(scope="session")
def local_tasks(tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder with one local task of every kind; returns (folder, task names)."""
    from fedmerge.eval.tasks import write_local_task

    folder = tmp_path_factory.mktemp("eval_tasks")
    names = []
    for kind in KINDS:
        name = f"toy_{kind}"
        write_local_task(folder, name, make_items(kind, ITEMS_PER_TASK), kind=kind)
        names.append(name)
    return folder, names
