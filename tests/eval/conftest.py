"""Shared fixtures of the evaluator tests.

lm-eval start-up is heavy, so the tiny model and the local task folder are built once per
session. lm-eval's own command line (whose start-up indexes all of its built-in tasks, the
slowest step of these tests) is started as soon as the session is collected, when the test
comparing it with ``fedmerge eval`` is selected; that test is moved to the end of the session,
so the command runs in the background of every other test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from eval_helpers import ITEMS_PER_TASK, KINDS, SEED, SHOTS, make_items  # noqa: E402

PARITY_TEST = "test_fedmerge_eval_equals_lm_eval_command_line"


class _Shared:
    root: Path | None = None
    model: Path | None = None
    tasks: tuple[Path, list[str]] | None = None
    cli: tuple[subprocess.Popen, Path] | None = None
    cli_log = None


def _root() -> Path:
    if _Shared.root is None:
        _Shared.root = Path(tempfile.mkdtemp(prefix="fedmerge-evaltests-"))
    return _Shared.root


def _model() -> Path:
    if _Shared.model is None:
        from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral

        _Shared.model = build_tiny_mistral(_root() / "tiny", TinyMistralSpec(), seed=0)
    return _Shared.model


def _tasks() -> tuple[Path, list[str]]:
    if _Shared.tasks is None:
        from fedmerge.eval.tasks import write_local_task

        folder = _root() / "tasks"
        names = []
        for kind in KINDS:
            write_local_task(folder, f"toy_{kind}", make_items(kind, ITEMS_PER_TASK), kind=kind)
            names.append(f"toy_{kind}")
        _Shared.tasks = (folder, names)
    return _Shared.tasks


def _start_lm_eval_cli() -> tuple[subprocess.Popen, Path]:
    if _Shared.cli is None:
        model, (folder, names) = _model(), _tasks()
        work = _root() / "lm_eval_cli"
        work.mkdir()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        _Shared.cli_log = (work / "lm_eval.log").open("w")  # a file, not a pipe: nobody reads it while it runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
             "--device", "cpu", "--batch_size", "4", "--include_path", str(folder), "--tasks", ",".join(names),
             "--num_fewshot", str(SHOTS), "--seed", str(SEED), "--output_path", str(work / "out")],
            stdout=_Shared.cli_log, stderr=subprocess.STDOUT, env=env, cwd=work,
        )
        _Shared.cli = (proc, work)
    return _Shared.cli


def pytest_collection_modifyitems(config, items):
    parity = [item for item in items if item.name == PARITY_TEST]
    if not parity:
        return
    for item in parity:
        items.remove(item)
        items.append(item)
    _start_lm_eval_cli()


def pytest_sessionfinish(session, exitstatus):
    if _Shared.cli is not None:
        proc, _ = _Shared.cli
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        _Shared.cli_log.close()
    if _Shared.root is not None:
        shutil.rmtree(_Shared.root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return _model()


@pytest.fixture(scope="session")
def local_tasks() -> tuple[Path, list[str]]:
    """A folder with one local task of every kind; returns (folder, task names)."""
    return _tasks()


@pytest.fixture(scope="session")
def lm_eval_cli() -> tuple[subprocess.Popen, Path]:
    """lm-eval's CLI run on ``local_tasks`` with ``tiny_model``: (process, its work folder)."""
    return _start_lm_eval_cli()
