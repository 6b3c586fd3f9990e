"""The publication gate in the round loop: a round's model is scored, the gate decides, and a refused
model is neither signed nor pushed; the last published model stays current at every hospital."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
from roundkit import RecordingGrid, edit_yaml, runner, status, status_json

from fedmerge.eval.evaluator import EvalResult, TaskScore
from fedmerge.eval.gate import Gate, GateConfig
from fedmerge.eval.store import ResultsStore, ScoreRecord
from fedmerge.protocol import INSTALL_PART
from fedmerge.security.model_sign import PUBLICATION_NAME


def scripted_evaluator(store: ResultsStore, scores: dict[int, dict[str, float]]):
    """An ``evaluate_fn`` that reports the given scores per round, stored as the evaluator stores them."""

    def evaluate(round_id: int, model_dir: Path) -> EvalResult:
        run_id = uuid.uuid4().hex
        result = EvalResult(run_id=run_id, label=f"round-{round_id}", role="merge", round=round_id, fingerprint=None,
                            scores=[TaskScore(t, "acc", v, 0.01, 100) for t, v in scores[round_id].items()], seconds=0.1)  # fmt: skip
        store.append_scores(ScoreRecord(run_id=run_id, task=s.task, metric=s.metric, value=s.value, stderr=s.stderr, label=result.label,
                                        role="merge", round=round_id) for s in result.scores)  # fmt: skip
        return result

    return evaluate


def _current(tf, name):
    return (tf.root / "clients" / name / "models" / "current").resolve().name


def test_a_regressed_round_is_neither_signed_nor_pushed(make_federation, tmp_path):
    tf = make_federation(3, rounds=3, federation_overrides={"reference": "global"})
    store = ResultsStore(tmp_path / "results.db")
    # round 2 drops 8 points on the mean: refused; round 3 recovers: published, held to round 1
    evaluate = scripted_evaluator(store, {1: {"medqa": 0.60, "pubmedqa": 0.50}, 2: {"medqa": 0.50, "pubmedqa": 0.44}, 3: {"medqa": 0.61, "pubmedqa": 0.50}})
    gate = Gate(store, GateConfig(margin=0.02, metric="acc", compare_to="previous"))
    installs_by_round: dict[str, int] = {}

    class Grid(RecordingGrid):
        def push_messages(self, messages):
            messages = list(messages)
            for m in messages:
                if m.metadata.message_type == INSTALL_PART:
                    installs_by_round[m.metadata.group_id] = installs_by_round.get(m.metadata.group_id, 0) + 1
            return super().push_messages(messages)

    refused_current = {}

    def when_refused(event):
        if event.kind == "refused":
            refused_current.update({n: _current(tf, n) for n in tf.client_configs})

    grid = Grid({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))})
    records = runner(tf, grid, evaluate_fn=evaluate, gate_fn=gate.check, on_event=when_refused).run()
    assert [r.status for r in records] == ["completed", "refused", "completed"]
    r1, r2, r3 = records
    # the decision and its numbers, in the record
    assert r2.gate.publish is False and r2.gate.metric == "acc" and r2.gate.reference_kind == "previous"
    assert r2.gate.score == pytest.approx(0.47) and r2.gate.reference == pytest.approx(0.55) and r2.gate.margin == 0.02
    assert "0.0800 below the previous model's 0.5500" in r2.gate.reason
    assert r2.evaluation.scores == {"medqa": {"acc": 0.50}, "pubmedqa": {"acc": 0.44}}
    # not signed, not pushed; the hospitals kept round 1
    model2 = tf.root / "coordinator" / "models" / "round-0002"
    assert model2.is_dir() and not (model2 / PUBLICATION_NAME).exists() and r2.publication is None
    assert "2-install" not in installs_by_round and installs_by_round["1-install"] > 0
    assert refused_current == {n: "round-0001" for n in tf.client_configs}
    # round 3 is held to the last *published* model (round 1), and its reference is round 1's model
    assert r3.gate.publish is True and r3.gate.reference == pytest.approx(0.55)
    assert r3.reference.round == 1 and r3.reference.path.endswith("round-0001")
    assert all(_current(tf, n) == "round-0003" for n in tf.client_configs)
    # the store's gate_decisions table holds the three decisions, in order
    assert [(d.round, d.published) for d in store.gate_decisions()] == [(1, True), (2, False), (3, True)]
    st = status_json(tf)["rounds"]
    assert st[1]["status"] == "refused" and st[1]["gate"]["publish"] is False and st[1]["publication"] is None
    rc, text = status(tf)
    assert "gate          REFUSED: mean acc over 2 task(s) 0.4700" in text
    assert "publication   none: the gate refused the model; the previous one stays current" in text
    assert "medqa acc 0.5000; pubmedqa acc 0.4400" in text


def test_a_model_that_cannot_be_evaluated_is_not_published(make_federation, tmp_path):
    tf = make_federation(2, rounds=1, federation_overrides={"evaluator": {"config_path": str(tmp_path / "missing-eval.yaml")}})
    grid = RecordingGrid({1: str(tf.client_configs["hospital-a"]), 2: str(tf.client_configs["hospital-b"])})
    rec = runner(tf, grid).run()[0]
    assert rec.status == "refused" and rec.gate.publish is False
    assert "missing-eval.yaml" in rec.evaluation.error and "could not be evaluated" in rec.gate.reason
    assert grid.count("push", 1, INSTALL_PART) == 0
    assert not (tf.root / "clients" / "hospital-a" / "models" / "current").exists()
    assert "evaluation    failed:" in status(tf)[1]


def test_a_restart_after_the_gate_decided_does_not_evaluate_again(make_federation, tmp_path):
    tf = make_federation(2, rounds=1)
    store = ResultsStore(tmp_path / "results.db")
    calls = []
    evaluate = scripted_evaluator(store, {1: {"medqa": 0.6}})

    def counted(r, d):
        calls.append(r)
        return evaluate(r, d)

    def stop_after_gate(event):
        if event.kind == "gated":
            raise KeyboardInterrupt("operator stopped the coordinator")

    gate = Gate(store, GateConfig(compare_to="previous"))
    clients = [tf.client_configs[n] for n in sorted(tf.client_configs)]
    from fedmerge.federation.inprocess import LocalGrid

    with pytest.raises(KeyboardInterrupt):
        runner(tf, LocalGrid({i + 1: str(p) for i, p in enumerate(clients)}), evaluate_fn=counted, gate_fn=gate.check, on_event=stop_after_gate).run()
    assert status_json(tf)["rounds"][0]["status"] == "merged"
    rec = runner(tf, LocalGrid({i + 1: str(p) for i, p in enumerate(clients)}), evaluate_fn=counted, gate_fn=gate.check).run()[0]
    assert calls == [1] and rec.status == "completed" and len(store.gate_decisions()) == 1


@pytest.mark.slow
def test_the_configured_evaluator_scores_the_round_and_the_gate_uses_its_settings(make_federation, tmp_path):
    """``evaluator:`` in the federation config: lm-eval on a local task, the base scored once, the
    gate's metric and margin from the config, its decision in the eval store and the record."""
    import yaml

    sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
    from eval_helpers import make_items

    from fedmerge.eval.tasks import write_local_task

    write_local_task(tmp_path / "tasks", "toy_medqa", make_items("medqa", 6), kind="medqa")
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "tasks": ["toy_medqa"], "task_dirs": [str(tmp_path / "tasks")], "num_fewshot": 1, "device": "cpu",
        "batch_size": 4, "cpu_threads": 1, "store": str(tmp_path / "results.db"),
    }))  # fmt: skip
    tf = make_federation(2, rounds=1)
    edit_yaml(tf.federation_config, evaluator={"config_path": str(tmp_path / "eval.yaml"), "gate_metric": "acc", "gate_margin": 1.0, "gate_compare_to": "base"})
    from fedmerge.federation.inprocess import LocalGrid

    rec = runner(tf, LocalGrid({1: str(tf.client_configs["hospital-a"]), 2: str(tf.client_configs["hospital-b"])})).run()[0]
    assert rec.status == "completed", rec.gate
    store = ResultsStore(tmp_path / "results.db")
    assert store.latest_run(role="base") is not None  # the base was scored once, for the gate
    (decision,) = store.gate_decisions()
    assert decision.published and decision.round == 1 and decision.metric == "acc" and decision.margin == 1.0
    assert decision.reference_kind == "base" and rec.gate.reference == pytest.approx(decision.reference)
    assert set(rec.evaluation.scores) == {"toy_medqa"} and rec.evaluation.run_id == decision.run_id
    assert rec.gate.score == pytest.approx(rec.evaluation.scores["toy_medqa"]["acc"])
    assert "gate          published" in status(tf)[1]
