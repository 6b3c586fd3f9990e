"""lm-eval behind one adapter: the only module importing it, a version check, and what it replaces
inside lm-eval put back after every run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedmerge.eval import lmeval
from fedmerge.eval.config import EvalConfig
from fedmerge.eval.errors import EvalError
from fedmerge.eval.evaluator import Evaluator

PACKAGE = Path(__file__).resolve().parents[2] / "fedmerge"


def test_only_the_adapter_imports_lm_eval():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "lm_eval" or n.startswith("lm_eval.") for n in names):
                importers.append(path.relative_to(PACKAGE.parent).as_posix())
    assert set(importers) == {"fedmerge/eval/lmeval.py"}, importers


def test_another_lm_eval_version_is_refused_clearly(monkeypatch, local_tasks):
    folder, names = local_tasks
    monkeypatch.setattr(lmeval, "_checked", None)
    monkeypatch.setattr(lmeval, "installed_version", lambda: "0.4.9")
    with pytest.raises(lmeval.LmEvalVersionError, match=r"lm-eval 0\.4\.9 is installed, but fedmerge's evaluator is tested with lm-eval 0\.4\.13 only.*pip install 'lm-eval==0\.4\.13'"):
        Evaluator(EvalConfig(tasks=names[:1], task_dirs=[folder]), store=None).build_tasks()
    monkeypatch.setattr(lmeval, "installed_version", lambda: None)
    with pytest.raises(lmeval.LmEvalVersionError, match="lm-eval is not installed"):
        lmeval.require()
    assert issubclass(lmeval.LmEvalVersionError, EvalError)  # the CLI prints it as one line
    monkeypatch.setattr(lmeval, "installed_version", lambda: lmeval.TESTED_VERSION)
    lmeval.require()


def test_the_installed_version_is_the_tested_one():
    assert lmeval.installed_version() == lmeval.TESTED_VERSION


@pytest.mark.slow
def test_run_environment_is_put_back(tiny_model, local_tasks):
    """During a run lm-eval's git probe and environment report are fedmerge's; afterwards its own."""
    import lm_eval.api.task as lm_task
    import lm_eval.evaluator as lm_evaluator

    before = (lm_evaluator.get_git_commit_hash, lm_evaluator.add_env_info, lm_task.tqdm)
    folder, names = local_tasks
    seen = {}
    ev = Evaluator(EvalConfig(tasks=names[:1], task_dirs=[folder], num_fewshot=0, device="cpu", batch_size=4, store=None))
    lm = lmeval.hf_lm(pretrained=str(tiny_model), device="cpu", dtype="float32", batch_size=4)
    original = lm.loglikelihood  # records which probe lm-eval's module holds while it is scoring

    def spying(requests, disable_tqdm=False):
        seen["probe"] = lm_evaluator.get_git_commit_hash
        seen["env"] = lm_evaluator.add_env_info
        return original(requests, disable_tqdm)

    lm.loglikelihood = spying
    result = ev.evaluate(lm, label="tiny")
    assert result.value(names[0]) >= 0
    assert seen["probe"] is lmeval._quiet_git_hash and seen["env"] is lmeval._light_env_info
    assert (lm_evaluator.get_git_commit_hash, lm_evaluator.add_env_info, lm_task.tqdm) == before
