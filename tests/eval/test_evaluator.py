"""Scoring a tiny local model: fedmerge against lm-eval's own command line, repeatability across
rounds, in-memory against on-disk, and built-in tasks read from local copies."""

from __future__ import annotations

import glob
import json

import pytest

from eval_helpers import ITEMS_PER_TASK, SEED, SHOTS
from fedmerge.cli import main
from fedmerge.eval.config import EvalConfig
from fedmerge.checkpoints import folder_fingerprint, state_dict_fingerprint
from fedmerge.eval.evaluator import Evaluator
from fedmerge.eval.gate import Gate, GateConfig
from fedmerge.eval.store import ResultsStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluator(local_tasks, tmp_path_factory):
    folder, names = local_tasks
    # Three of the kinds are enough to show repeatability; the lm-eval comparison covers all five.
    cfg = EvalConfig(tasks=names[:3], task_dirs=[folder], num_fewshot=SHOTS, seed=SEED, device="cpu", batch_size=4, cpu_threads=1,
                     store=tmp_path_factory.mktemp("eval_store") / "results.db")
    return Evaluator(cfg)


def test_same_weights_twice_score_equal_and_in_memory_matches_folder(evaluator, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = evaluator.evaluate(tiny_model, round=1, label="tiny")
    second = evaluator.evaluate(tiny_model, round=2, label="tiny")  # tasks reused, samplers re-seeded
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype="float32")
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    third = evaluator.evaluate((model, tok), round=3, label="tiny")
    key = [(s.task, s.metric, s.value, s.stderr, s.n) for s in first.scores]
    assert key == [(s.task, s.metric, s.value, s.stderr, s.n) for s in second.scores]
    assert key == [(s.task, s.metric, s.value, s.stderr, s.n) for s in third.scores]
    assert first.fingerprint == second.fingerprint == third.fingerprint == state_dict_fingerprint(model.state_dict())
    # The few-shot sampler really is random per item, so without the re-seeding the second
    # round would have drawn other examples: two items' 2-shot contexts differ.
    task = evaluator.build_tasks()["toy_medqa"]
    task.set_fewshot_seed(SEED)
    docs = list(task.test_docs())
    ctx = [task.fewshot_context(d, SHOTS) for d in docs[:3]]
    assert len({c.split("Question: ")[1] for c in ctx}) > 1
    # The store holds all three rounds; the gate lets equal scores through.
    store = evaluator.store
    assert sorted({r.round for r in store.scores(label="tiny")}) == [1, 2, 3]
    gate = Gate(store, GateConfig(margin=0.0))
    assert gate.check(first).publish and gate.check(third).publish


def test_builtin_tasks_from_local_copies_score_like_local_tasks(tiny_model, local_tasks, tmp_path):
    """medqa_4options and pubmedqa (lm-eval's own configs) read from local JSONL in their hub
    columns give the same 0-shot accuracies as fedmerge's local tasks with the same items."""
    from fedmerge.eval.tasks import read_jsonl

    folder, _ = local_tasks
    medqa = read_jsonl(folder / "toy_medqa.jsonl", "medqa")
    pubmed = read_jsonl(folder / "toy_pubmedqa.jsonl", "pubmedqa")
    medqa_copy, pubmed_copy = tmp_path / "medqa_hub.jsonl", tmp_path / "pubmedqa_hub.jsonl"
    medqa_copy.write_text("".join(json.dumps({"sent1": i["question"], **{f"ending{k}": c for k, c in enumerate(i["choices"])}, "label": i["answer"]}) + "\n" for i in medqa))
    pubmed_copy.write_text("".join(json.dumps({"QUESTION": i["question"], "CONTEXTS": [i["context"]], "final_decision": i["choices"][i["answer"]]}) + "\n" for i in pubmed))
    cfg = EvalConfig(tasks=["toy_medqa", "medqa_4options", "toy_pubmedqa", "pubmedqa"], task_dirs=[folder], num_fewshot=0,
                     device="cpu", batch_size=4, cpu_threads=1, store=None,
                     builtin_datasets={"medqa_4options": str(medqa_copy), "pubmedqa": {"test": str(pubmed_copy)}})
    res = Evaluator(cfg).evaluate(tiny_model, label="tiny")
    assert res.value("medqa_4options") == res.value("toy_medqa")
    assert res.value("medqa_4options", "acc_norm") == res.value("toy_medqa", "acc_norm")
    assert res.value("pubmedqa") == res.value("toy_pubmedqa")
    assert {s.n for s in res.scores} == {ITEMS_PER_TASK}


def test_fedmerge_eval_equals_lm_eval_command_line(tiny_model, local_tasks, lm_eval_cli, tmp_path):
    """Same model, tasks, shots and seed: equal accuracies and stderrs from both (the lm-eval
    command was started at collection time by conftest and ran in the background)."""
    folder, names = local_tasks
    proc, work = lm_eval_cli
    db, js = tmp_path / "r.db", tmp_path / "scores.json"
    rc = main(["eval", str(tiny_model), "--tasks", ",".join(names), "--task-dir", str(folder), "--num-fewshot", str(SHOTS),
               "--seed", str(SEED), "--device", "cpu", "--batch-size", "4", "--threads", "1", "--store", str(db), "--json", str(js),
               "--round", "0", "--label", "tiny"])
    assert rc == 0
    assert proc.wait(timeout=400) == 0, (work / "lm_eval.log").read_text()[-3000:]
    [results_file] = glob.glob(str(work / "out" / "**" / "results_*.json"), recursive=True)
    with open(results_file) as fh:
        theirs = json.load(fh)["results"]

    ours = json.loads(js.read_text())
    stored = ResultsStore(db).scores(run_id=ours["run_id"])
    assert len(stored) == len(ours["scores"]) > 0
    compared = 0
    for s in ours["scores"]:
        t = theirs[s["task"]]
        assert s["value"] == pytest.approx(t[f"{s['metric']},none"], abs=1e-12), (s["task"], s["metric"])
        assert s["stderr"] == pytest.approx(t[f"{s['metric']}_stderr,none"], abs=1e-12)
        compared += 1
    assert compared == len(names) + 3  # acc everywhere; acc_norm for medqa, medmcqa, hellaswag
    assert {r.task for r in stored} == set(names) and all(r.round == 0 and r.label == "tiny" for r in stored)
    assert all(r.num_fewshot == SHOTS and r.seed == SEED and r.n == ITEMS_PER_TASK for r in stored)
    assert stored[0].fingerprint == folder_fingerprint(tiny_model)
