"""``fedmerge eval`` on its five local task templates against lm-eval's own built-in tasks.

The same items are written twice: as fedmerge local tasks (one per kind, with a few-shot file) and
as local copies, in the hub datasets' columns, of the five lm-eval tasks each template is named
after. lm-eval's side is lm-eval alone: a YAML that includes lm-eval's own task file and points it
at the copy, run with ``simple_evaluate`` in the test. At 0 and 5 shots both sides must score the
same items with the same prompts (context and continuations, item by item) and give the same
accuracies and standard errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from eval_helpers import BUILTIN_OF_KIND, KINDS, MMLU_DESCRIPTION, SEED, hub_row, parity_items
from fedmerge.cli import main
from fedmerge.eval.config import EvalConfig
from fedmerge.eval.evaluator import Evaluator
from fedmerge.eval.tasks import task_config, write_local_task

pytestmark = pytest.mark.slow

ITEMS, FEWSHOT = 8, 8
# lm-eval's task files (inside its package) of the five built-in tasks.
LM_EVAL_YAML = {
    "medqa": "medqa/medqa.yaml",
    "pubmedqa": "pubmedqa/pubmedqa.yaml",
    "mmlu": "mmlu/default/mmlu_professional_medicine.yaml",
    "medmcqa": "medmcqa/medmcqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def both_sides(tmp_path_factory):
    """(fedmerge task folder, lm-eval task folder, {kind: (fedmerge name, lm-eval name)})."""
    import lm_eval.tasks

    lm_eval_tasks = Path(lm_eval.tasks.__file__).parent
    root = tmp_path_factory.mktemp("parity")
    ours, theirs, data = root / "fedmerge_tasks", root / "lm_eval_tasks", root / "hub_copies"
    theirs.mkdir()
    data.mkdir()
    names = {}
    for kind in KINDS:
        items = parity_items(kind, ITEMS)
        shots = parity_items(kind, FEWSHOT, seed=7, prefix="fs-")
        write_local_task(ours, f"ours_{kind}", items, kind=kind, fewshot_items=shots,
                         description=MMLU_DESCRIPTION if kind == "mmlu" else None)
        builtin, scored_split, fewshot_split = BUILTIN_OF_KIND[kind]
        scored = _jsonl(data / f"{builtin}.{scored_split}.jsonl", [hub_row(kind, i) for i in items])
        fewshot = _jsonl(data / f"{builtin}.{fewshot_split}.jsonl", [hub_row(kind, i) for i in shots])
        ref = {
            "include": str(lm_eval_tasks / LM_EVAL_YAML[kind]),
            "task": f"ref_{builtin}",
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {scored_split: str(scored), fewshot_split: str(fewshot)}},
        }
        if kind in ("medqa", "pubmedqa"):
            ref["validation_split"] = None  # the copy has the scored and the training split only
        (theirs / f"ref_{builtin}.yaml").write_text(yaml.safe_dump(ref, sort_keys=False))
        names[kind] = (f"ours_{kind}", f"ref_{builtin}")
    return ours, theirs, names


def _lm_eval_run(model: Path, folder: Path, tasks: list[str], shots: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fedmerge.devices import torch_threads

    with torch_threads(1):
        return lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model), "dtype": "float32"}, tasks=tasks, device="cpu", batch_size=4,
            num_fewshot=shots, task_manager=TaskManager(include_path=str(folder), include_defaults=False), log_samples=True,
            bootstrap_iters=1000, random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED,
        )


def _requests(task, shots: int) -> list[tuple[list[tuple[str, str]], int]]:
    """Per item, in order: the (context, continuation) pairs lm-eval scores and the gold index."""
    task.set_fewshot_seed(SEED)
    out = []
    for doc in task.eval_docs:
        ctx = task.fewshot_context(doc, shots)
        choices = task.doc_to_choice(doc)
        out.append(([(ctx, f"{task.config.target_delimiter}{c}") for c in choices], _gold(task.doc_to_target(doc), choices)))
    return out


def _gold(target, choices) -> int:
    return choices.index(target) if isinstance(target, str) and target in choices else int(target)


@pytest.mark.parametrize("shots", [0, 5])
def test_fedmerge_eval_equals_lm_eval_builtin_tasks(both_sides, tiny_model, tmp_path, shots):
    ours, theirs, names = both_sides
    js = tmp_path / "scores.json"
    rc = main(["eval", str(tiny_model), "--tasks", ",".join(n for n, _ in names.values()), "--task-dir", str(ours),
               "--num-fewshot", str(shots), "--seed", str(SEED), "--device", "cpu", "--batch-size", "4", "--threads", "1",
               "--store", "none", "--json", str(js)])
    assert rc == 0
    mine = json.loads(js.read_text())
    ref = _lm_eval_run(tiny_model, theirs, [r for _, r in names.values()], shots)

    built = Evaluator(EvalConfig(tasks=[n for n, _ in names.values()], task_dirs=[ours], store=None)).build_tasks()
    compared = 0
    for kind, (name, ref_name) in names.items():
        # Same items, same prompts: every (context, continuation) pair, item by item.
        samples = sorted(ref["samples"][ref_name], key=lambda s: s["doc_id"])
        theirs_requests = [([tuple(a) for a in s["arguments"]], _gold(s["target"], [a[1].strip() for a in s["arguments"]])) for s in samples]
        assert _requests(built[name], shots) == theirs_requests, kind
        assert len(samples) == ITEMS
        # Same scores.
        for s in (s for s in mine["scores"] if s["task"] == name):
            theirs_value = ref["results"][ref_name][f"{s['metric']},none"]
            theirs_se = ref["results"][ref_name][f"{s['metric']}_stderr,none"]
            assert s["value"] == pytest.approx(theirs_value, abs=1e-12), (kind, s["metric"])
            assert s["stderr"] == pytest.approx(theirs_se, abs=1e-12), (kind, s["metric"])
            assert s["n"] == ITEMS
            compared += 1
    assert compared == 8  # acc for all five; acc_norm for medqa, medmcqa, hellaswag
    if shots:
        # The 5-shot prompts really draw examples at random (a wrong sampler would show).
        contexts = {c[0][0] for c, _ in _requests(built["ours_medqa"], shots)}
        assert len(contexts) == ITEMS


def test_hellaswag_needs_lm_evals_split_layout(both_sides):
    """With the few-shot file as a plain few-shot split (the layout the other kinds use), lm-eval
    draws exactly five examples per item instead of six minus the scored one: other prompts."""
    from lm_eval.tasks import TaskManager

    ours, theirs, _ = both_sides
    tm = TaskManager(include_path=str(theirs), include_defaults=False)
    ref = tm.load(["ref_hellaswag"])["tasks"]["ref_hellaswag"]
    cfg = yaml.safe_load((ours / "ours_hellaswag.yaml").read_text())
    assert cfg["validation_split"] == "test" and cfg["training_split"] == "train" and "test_split" not in cfg
    now = TaskManager(include_defaults=False).load([cfg])["tasks"]["ours_hellaswag"]
    files = cfg["dataset_kwargs"]["data_files"]
    plain = task_config("hellaswag", "plain_hellaswag", files,
                        {"test_split": "test", "fewshot_split": "train", "validation_split": None, "training_split": None})
    before = TaskManager(include_defaults=False).load([plain])["tasks"]["plain_hellaswag"]
    theirs_prompts = [r[0][0][0] for r in _requests(ref, 5)]
    assert [r[0][0][0] for r in _requests(now, 5)] == theirs_prompts
    assert [r[0][0][0] for r in _requests(before, 5)] != theirs_prompts
