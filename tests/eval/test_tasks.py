"""Local task files: writing, checking, prompt formats, and clear errors for bad files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from eval_helpers import make_items
from fedmerge.eval.config import EvalConfig
from fedmerge.eval.errors import DatasetUnavailable, TaskFileError, UnknownTask
from fedmerge.eval.evaluator import Evaluator
from fedmerge.eval.builtin import BUILTIN_TASKS, builtin_config
from fedmerge.eval.catalog import TaskCatalog
from fedmerge.eval.tasks import load_local_task, read_jsonl, write_local_task


def _lm_eval_module(rel: str):
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(cfg: dict):
    from lm_eval.tasks import TaskManager

    return next(iter(TaskManager(include_defaults=False).load([cfg])["tasks"].values()))


def test_write_local_task_round_trip(tmp_path):
    items = make_items("medqa", 5)
    yaml_path = write_local_task(tmp_path / "t", "cardio", items, kind="medqa", fewshot_items=make_items("medqa", 3, seed=1, prefix="fs"))
    cfg = yaml.safe_load(yaml_path.read_text())
    files = cfg["dataset_kwargs"]["data_files"]
    assert Path(files["test"]).is_absolute() and Path(files["train"]).is_absolute()
    assert cfg["task"] == "cardio" and cfg["fewshot_split"] == "train" and cfg["test_split"] == "test"
    assert read_jsonl(files["test"], "medqa") == items
    assert len(read_jsonl(files["train"], "medqa")) == 3
    # Nothing but the three files: the writes are atomic (no temporary files left behind).
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["cardio.fewshot.jsonl", "cardio.jsonl", "cardio.yaml"]


def test_write_refuses_bad_items_and_writes_nothing(tmp_path):
    items = make_items("medqa", 3)
    items[1] = {**items[1], "answer": 4}
    with pytest.raises(TaskFileError, match=r"cardio\.jsonl:2: field 'answer' is 4 but there are 4 choices"):
        write_local_task(tmp_path, "cardio", items, kind="medqa")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"id": "x", "question": "q", "choices": ["a", "b", "c", "d"], "answer": 1', "invalid JSON"),
        ('{"id": "x", "question": "q", "choices": ["a", "b", "c", "d"]}', "missing field 'answer'"),
        ('{"id": "x", "question": "q", "choices": ["a", "b", "c"], "answer": 0}', "needs exactly 4 choices, got 3"),
        ('{"id": "x", "question": "q", "choices": ["a", "b", "c", "d"], "answer": true}', "must be an integer"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ("", "empty line"),
        ('{"id": "medqa-0", "question": "q", "choices": ["a", "b", "c", "d"], "answer": 0}', "duplicate id 'medqa-0' (first on line 1)"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, problem):
    good = [json.dumps(i) for i in make_items("medqa", 2)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good[0], good[1], line, good[0].replace("medqa-0", "medqa-9")]) + "\n")
    with pytest.raises(TaskFileError) as err:
        read_jsonl(path, "medqa")
    assert str(err.value).startswith(f"{path}:3: ")
    assert problem in str(err.value)
    assert err.value.line == 3 and err.value.path == str(path)


def test_pubmedqa_items_need_context(tmp_path):
    item = {k: v for k, v in make_items("pubmedqa", 1)[0].items() if k != "context"}
    with pytest.raises(TaskFileError, match=r"x\.jsonl:1: a pubmedqa item needs a non-empty 'context'"):
        write_local_task(tmp_path, "x", [item], kind="pubmedqa")


def test_malformed_file_in_task_folder_fails_before_lm_eval(tmp_path):
    """A user drops a short-form YAML + JSONL with a bad line 2: the evaluator names both."""
    (tmp_path / "derm.yaml").write_text("task: derm\ntemplate: medqa\n")
    lines = [json.dumps(i) for i in make_items("medqa", 3)]
    lines[1] = lines[1].replace('"answer"', '"answr"')
    (tmp_path / "derm.jsonl").write_text("\n".join(lines) + "\n")
    ev = Evaluator(EvalConfig(tasks=["derm"], task_dirs=[tmp_path]), store=None)
    with pytest.raises(TaskFileError, match=rf"^{tmp_path / 'derm.jsonl'}:2: missing field 'answer'"):
        ev.build_tasks()


def test_malformed_yaml_names_file_and_line(tmp_path):
    (tmp_path / "neuro.yaml").write_text("task: neuro\ntemplate: medqa\ndescription: [unclosed\n")
    with pytest.raises(TaskFileError, match=rf"^{tmp_path / 'neuro.yaml'}:\d+: invalid YAML"):
        Evaluator(EvalConfig(tasks=["neuro"], task_dirs=[tmp_path]), store=None).build_tasks()


def test_short_form_yaml_relative_paths_resolved(tmp_path):
    (tmp_path / "onc.yaml").write_text("task: onc\ntemplate: pubmedqa\ndescription: \"Oncology.\\n\\n\"\n")
    items = make_items("pubmedqa", 4)
    (tmp_path / "onc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "onc.fewshot.jsonl").write_text("".join(json.dumps(i) + "\n" for i in make_items("pubmedqa", 2, seed=5, prefix="f")))
    task = load_local_task(tmp_path / "onc.yaml")
    files = task.config["dataset_kwargs"]["data_files"]
    assert files == {"test": str((tmp_path / "onc.jsonl").resolve()), "train": str((tmp_path / "onc.fewshot.jsonl").resolve())}
    assert task.kind == "pubmedqa" and task.config["fewshot_split"] == "train"
    assert task.config["description"] == "Oncology.\n\n" and "template" not in task.config
    catalog = TaskCatalog([tmp_path])
    assert catalog.local_names() == ["onc"] and catalog.entry("onc").yaml_path == tmp_path / "onc.yaml"


def test_local_prompts_match_lm_eval_builtin_formats(tmp_path):
    """The same question renders to the same prompt as lm-eval's own MedQA, MedMCQA, PubMedQA, MMLU."""
    from lm_eval.utils import apply_template

    q = {"id": "a", "question": "Which drug?", "choices": ["aspirin", "insulin", "heparin", "morphine"], "answer": 2}
    medqa = _lm_eval_module("medqa/preprocess_medqa.py")
    medmcqa = _lm_eval_module("medmcqa/utils_medmcqa.py")
    pubmed = _lm_eval_module("pubmedqa/preprocess_pubmedqa.py")
    import lm_eval.tasks

    mmlu_yaml = Path(lm_eval.tasks.__file__).parent / "mmlu/default/_default_template_yaml"
    mmlu_text = yaml.safe_load(mmlu_yaml.read_text())["doc_to_text"]

    expected = {
        "medqa": medqa.doc_to_text({"sent1": q["question"], **{f"ending{i}": c for i, c in enumerate(q["choices"])}}),
        "medmcqa": medmcqa.doc_to_text({"question": q["question"], "opa": "aspirin", "opb": "insulin", "opc": "heparin", "opd": "morphine"}),
        "mmlu": apply_template(mmlu_text, q),
    }
    for kind, want in expected.items():
        task = _build(load_local_task(write_local_task(tmp_path, f"p_{kind}", [q], kind=kind)).config)
        doc = task.test_docs()[0]
        assert task.doc_to_text(doc) == want, kind
        assert task.doc_to_choice(doc) == ["A", "B", "C", "D"] and task.doc_to_target(doc) == 2

    p = {"id": "p", "question": "Does it help?", "context": "An abstract.", "choices": ["yes", "no", "maybe"], "answer": 1}
    task = _build(load_local_task(write_local_task(tmp_path, "p_pubmed", [p], kind="pubmedqa")).config)
    doc = task.test_docs()[0]
    assert task.doc_to_text(doc) == pubmed.doc_to_text({"CONTEXTS": ["An abstract."], "QUESTION": "Does it help?"})
    assert task.doc_to_choice(doc) == ["yes", "no", "maybe"] and task.doc_to_target(doc) == 1

    h = make_items("hellaswag", 1)[0]
    task = _build(load_local_task(write_local_task(tmp_path, "p_hella", [h], kind="hellaswag")).config)
    doc = task.eval_docs[0]  # scored as the validation split, as lm-eval's hellaswag scores its own
    assert task.doc_to_text(doc) == h["question"] and task.doc_to_choice(doc) == h["choices"]


def test_unknown_task_lists_known_ones(tmp_path, local_tasks):
    folder, names = local_tasks
    ev = Evaluator(EvalConfig(tasks=["toy_medqa", "cardiology"], task_dirs=[folder]), store=None)
    with pytest.raises(UnknownTask, match="task 'cardiology' is neither.*known tasks: .*medqa_4options.*toy_medqa"):
        ev.build_tasks()


def test_builtin_pubmedqa_needs_a_local_file():
    with pytest.raises(DatasetUnavailable, match="pubmedqa reads bigbio/pubmed_qa through a dataset loading script.*QUESTION, CONTEXTS"):
        builtin_config("pubmedqa")


def test_builtin_dataset_missing_names_dataset_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    ev = Evaluator(EvalConfig(tasks=["medmcqa"]), store=None)
    with pytest.raises(DatasetUnavailable) as err:
        ev.build_tasks()
    msg = str(err.value)
    assert "openlifescienceai/medmcqa" in msg and str(tmp_path / "empty-cache") in msg and "--dataset medmcqa=PATH" in msg

    missing = tmp_path / "nowhere" / "medqa.jsonl"
    with pytest.raises(DatasetUnavailable, match=f"local copy of GBaker/MedQA-USMLE-4-options-hf for task medqa_4options: {missing} not found"):
        builtin_config("medqa_4options", missing)


def test_builtin_config_points_at_local_copy(tmp_path):
    f = tmp_path / "mmlu_pm.jsonl"
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 1, "subject": "x"}) + "\n")
    cfg = builtin_config("mmlu_professional_medicine", {"test": str(f), "dev": str(f)})
    assert cfg["dataset_path"] == "json" and cfg["dataset_name"] is None
    assert cfg["dataset_kwargs"]["data_files"] == {"test": str(f.resolve()), "dev": str(f.resolve())}
    assert cfg["fewshot_split"] == "dev" and cfg["task"] == "mmlu_professional_medicine"
    folder_cfg = builtin_config("hellaswag", tmp_path)
    assert folder_cfg["dataset_path"] == str(tmp_path.resolve())
    assert set(BUILTIN_TASKS) == {"medqa_4options", "pubmedqa", "mmlu_professional_medicine", "medmcqa", "hellaswag"}


def test_eval_config_yaml_and_offline(tmp_path):
    from fedmerge.eval.errors import EvalConfigError

    (tmp_path / "eval.yaml").write_text("eval:\n  tasks: [cardio]\n  task_dirs: [tasks]\n  num_fewshot: 3\n  batch_size: 8\n")
    cfg = EvalConfig.from_yaml(tmp_path / "eval.yaml")
    assert cfg.task_dirs == [tmp_path / "tasks"] and cfg.num_fewshot == 3 and cfg.seed == 1234
    assert (cfg.resolved_dtype("cpu"), cfg.resolved_dtype("cuda:0")) == ("float32", "bfloat16")
    assert cfg.resolved_batch_size("cpu") == 8
    assert EvalConfig(tasks=["x"]).resolved_batch_size("cpu") == 4 and EvalConfig(tasks=["x"]).resolved_batch_size("cuda:0") == "auto"
    (tmp_path / "bad.yaml").write_text("tasks: [cardio]\nnum_fewshot: -1\nlimt: 5\n")
    with pytest.raises(EvalConfigError, match=r"bad.yaml: num_fewshot: .*greater than or equal to 0.*limt: Extra inputs"):
        EvalConfig.from_yaml(tmp_path / "bad.yaml")
    Evaluator(EvalConfig(tasks=["x"]), store=None)
    import os

    import datasets.config

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert datasets.config.HF_DATASETS_OFFLINE and datasets.config.HF_HUB_OFFLINE


def test_every_path_in_an_eval_config_is_relative_to_the_file(tmp_path, monkeypatch):
    from fedmerge.eval.config import EvalConfig

    cfg_dir = tmp_path / "configs" / "paper"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "eval.yaml").write_text(
        "tasks: [medqa_4options]\ntask_dirs: [tasks]\nstore: ../../results/paper.db\n"
        "builtin_datasets:\n  medqa_4options: ../../datasets/medqa\n  pubmedqa: {test: data/test.jsonl}\n"
    )
    monkeypatch.chdir(tmp_path / "configs")  # anywhere but the file's folder
    cfg = EvalConfig.from_yaml(cfg_dir / "eval.yaml")
    root = cfg_dir.resolve()
    assert cfg.task_dirs == [root / "tasks"]
    assert cfg.store == root / "../../results/paper.db"
    assert cfg.builtin_datasets == {"medqa_4options": str(root / "../../datasets/medqa"), "pubmedqa": {"test": str(root / "data/test.jsonl")}}


def test_the_paper_eval_config_points_at_the_repository_root():
    from pathlib import Path

    from fedmerge.eval.config import EvalConfig

    repo = Path(__file__).resolve().parents[2]
    cfg = EvalConfig.from_yaml(repo / "configs" / "paper" / "eval.yaml")
    assert cfg.store.resolve() == repo / "results" / "paper.db"
    assert Path(cfg.builtin_datasets["medqa_4options"]).resolve() == repo / "datasets" / "medqa_4options"
