"""``selection: central``: the coordinator scores each candidate on the consortium's validation split;
nothing is sent to the hospitals but the published model. Also the real evaluator at the hospitals
in federated mode, each on its own local validation task."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from fedtest_helpers import assert_same_tensors
from roundkit import RecordingGrid, edit_yaml, runner, status

from fedmerge.eval.store import ResultsStore
from fedmerge.protocol import CANDIDATE_PART, OPEN_ROUND, SCORE_CANDIDATES
from fedmerge.server.record import CENTRAL_SCORER

CANDIDATES = [
    {"method": "task_arithmetic", "parameters": {"lambda": 0.5}},
    {"method": "ties", "parameters": {"density": 0.5}},
    {"method": "ties", "parameters": {"density": 1.0}},
]


def _local_task(folder: Path, name: str, seed: int) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
    from eval_helpers import make_items

    from fedmerge.eval.tasks import write_local_task

    write_local_task(folder, name, make_items("medqa", 6, seed=seed, prefix=f"{name}-"), kind="medqa")


def _eval_config(path: Path, task: str, task_dir: Path, store: Path) -> Path:
    path.write_text(yaml.safe_dump({"tasks": [task], "task_dirs": [str(task_dir)], "num_fewshot": 0, "device": "cpu",
                                    "batch_size": 4, "cpu_threads": 1, "store": str(store)}))  # fmt: skip
    return path


def _central(make_federation, tmp_path, **selection):
    tf = make_federation(2)
    _local_task(tmp_path / "tasks", "consortium_val", seed=7)
    _eval_config(tf.root / "validation.yaml", "consortium_val", tmp_path / "tasks", tmp_path / "validation.db")
    edit_yaml(tf.federation_config, selection={"mode": "central", "eval_config": "validation.yaml", "candidates": CANDIDATES, **selection})
    return tf


def _nodes(tf):
    return {i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}


@pytest.mark.slow
def test_central_mode_scores_each_candidate_with_the_evaluator_on_the_validation_split(make_federation, tmp_path):
    tf = _central(make_federation, tmp_path)
    grid = RecordingGrid(_nodes(tf))
    rec = runner(tf, grid).run()[0]
    assert rec.status == "completed"
    sel = rec.selection
    store = ResultsStore(tmp_path / "validation.db")
    stored = {s.label: s.value for s in store.scores(task="consortium_val", metric="acc")}
    assert sorted(stored) == ["round-1-c1", "round-1-c2", "round-1-c3"]
    assert sel.scores == {CENTRAL_SCORER: {c: {"consortium_val": stored[f"round-1-{c}"]} for c in ("c1", "c2", "c3")}}
    best = max(stored.values())
    expected = next(c for c in ("c1", "c2", "c3") if stored[f"round-1-{c}"] >= best - 1e-9)  # ties go to the first
    assert sel.chosen == expected and sel.values == {c: stored[f"round-1-{c}"] for c in ("c1", "c2", "c3")}
    assert rec.merge.fingerprint == sel.candidate(expected).fingerprint
    # the hospitals were asked to contribute and to install, nothing else
    for node in (1, 2):
        assert grid.count("push", node, CANDIDATE_PART) == 0 and grid.count("push", node, SCORE_CANDIDATES) == 0
        assert grid.count("push", node, OPEN_ROUND) == 1
    assert sel.bytes_sent == {} and all(c.package_bytes is None for c in sel.candidates)
    assert f"  selection     central, rule mean; published {expected}" in status(tf)[1]


def test_central_scores_survive_a_restart_and_are_not_computed_again(make_federation, tmp_path):
    tf = _central(make_federation, tmp_path, rule="worst")
    accuracy = {"c1": {"v": 0.4, "w": 0.6}, "c2": {"v": 0.7, "w": 0.5}, "c3": {"v": 0.2, "w": 0.9}}
    calls: list[str] = []

    def validate(round_id, candidate, model_dir):
        assert Path(model_dir).is_dir() and round_id == 1
        calls.append(candidate)
        if len(calls) == 2 and stop:
            raise KeyboardInterrupt("operator stopped the coordinator")
        return accuracy[candidate]

    stop = True
    with pytest.raises(KeyboardInterrupt):
        runner(tf, RecordingGrid(_nodes(tf)), validate_fn=validate).run()
    assert calls == ["c1", "c2"]
    stop = False
    rec = runner(tf, RecordingGrid(_nodes(tf)), validate_fn=validate).run()[0]
    assert calls == ["c1", "c2", "c2", "c3"]  # c1 was recorded before the stop; c2 was not
    sel = rec.selection
    assert sel.scores == {CENTRAL_SCORER: accuracy} and sel.values == pytest.approx({"c1": 0.5, "c2": 0.6, "c3": 0.55})
    assert sel.chosen == "c2" and rec.merge.fingerprint == sel.candidate("c2").fingerprint


def test_a_central_evaluator_that_fails_leaves_the_configured_strategy(make_federation, tmp_path):
    tf = _central(make_federation, tmp_path)

    def validate(round_id, candidate, model_dir):
        if candidate == "c2":
            raise RuntimeError("validation split is empty")
        return {"v": 0.5}

    rec = runner(tf, RecordingGrid(_nodes(tf)), validate_fn=validate).run()[0]
    sel = rec.selection
    assert rec.status == "completed" and sel.fallback and rec.merge.method == "task_arithmetic"
    (failure,) = sel.failures
    assert failure.scorer == CENTRAL_SCORER and failure.reason == "c2: RuntimeError: validation split is empty"
    assert sel.scores == {CENTRAL_SCORER: {"c1": {"v": 0.5}}}  # what was scored stays on the record
    assert sel.reason == "no scorer scored every candidate; published the configured strategy (task_arithmetic) instead (central: c2: RuntimeError: validation split is empty)"


@pytest.mark.slow
def test_federated_mode_with_the_evaluator_scores_each_hospital_on_its_own_task(make_federation, tmp_path):
    tf = make_federation(2)
    edit_yaml(tf.federation_config, selection={"mode": "federated", "candidates": CANDIDATES[:2], "keep_candidates": True})
    for i, name in enumerate(sorted(tf.client_configs)):
        task = f"{name.replace('-', '_')}_val"
        _local_task(tmp_path / f"{name}-tasks", task, seed=11 + i)
        cfg = _eval_config(tf.root / "clients" / f"{name}-validation.yaml", task, tmp_path / f"{name}-tasks", tf.root / "clients" / name / "validation.db")
        edit_yaml(tf.client_configs[name], validation=cfg.name)
    rec = runner(tf, RecordingGrid(_nodes(tf))).run()[0]
    assert rec.status == "completed"
    for name in tf.client_configs:
        task = f"{name.replace('-', '_')}_val"
        store = ResultsStore(tf.root / "clients" / name / "validation.db")
        rows = store.scores(metric="acc")
        # the hospital's evaluator ran its own task only, once per candidate, on the candidate it rebuilt
        assert sorted((r.task, r.label, r.round) for r in rows) == [(task, "round-1-c1", 1), (task, "round-1-c2", 1)]
        assert rec.selection.scores[name] == {r.label.removeprefix("round-1-"): {task: r.value} for r in rows}
    assert rec.selection.chosen in ("c1", "c2")
    assert_same_tensors(tf.root / "clients" / "hospital-a" / "models" / "current", rec.merge.model_dir)
