"""The publication gate: the pure decision, and the decisions recorded in the store."""

from __future__ import annotations

import pytest

from fedmerge.eval.evaluator import EvalResult, TaskScore
from fedmerge.eval.gate import Gate, GateConfig, decide
from fedmerge.eval.store import ResultsStore, ScoreRecord


def test_within_margin_is_published():
    d = decide({"a": 0.50, "b": 0.40}, previous={"a": 0.52, "b": 0.40}, base=None, config=GateConfig(margin=0.02))
    # mean 0.45 vs previous 0.46: 0.01 below, inside the 0.02 margin
    assert d.publish and d.score == pytest.approx(0.45) and d.reference == pytest.approx(0.46) and d.reference_kind == "previous"


def test_drop_beyond_margin_is_refused_with_reason():
    d = decide({"a": 0.40, "b": 0.40}, previous={"a": 0.50, "b": 0.44}, base={"a": 0.30, "b": 0.30}, config=GateConfig(margin=0.02))
    assert not d.publish and d.reference_kind == "previous"
    assert d.score == pytest.approx(0.40) and d.reference == pytest.approx(0.47)
    assert d.reason == "mean acc over 2 task(s) 0.4000 is 0.0700 below the previous model's 0.4700, more than the margin 0.0200"


def test_below_base_is_refused_even_without_previous():
    d = decide({"a": 0.20}, previous=None, base={"a": 0.25}, config=GateConfig(margin=0.01))
    assert not d.publish and d.reference_kind == "base" and "below the base model's 0.2500" in d.reason
    # compare_to=previous ignores the base
    assert decide({"a": 0.20}, previous=None, base={"a": 0.25}, config=GateConfig(margin=0.01, compare_to="previous")).publish


def test_each_task_mode_catches_one_task_regressing():
    cand, prev = {"a": 0.90, "b": 0.30}, {"a": 0.50, "b": 0.40}
    assert decide(cand, prev, None, GateConfig(margin=0.05)).publish  # the mean went up
    d = decide(cand, prev, None, GateConfig(margin=0.05, aggregate="each"))
    assert not d.publish and d.reason.startswith("b: acc 0.3000 is 0.1000 below the previous model's 0.4000")


def test_no_reference_publishes_and_margin_edge():
    assert decide({"a": 0.1}, None, None).publish
    # exactly at the margin is still allowed ("more than the margin" refuses)
    assert decide({"a": 0.48}, {"a": 0.50}, None, GateConfig(margin=0.02)).publish
    assert not decide({"a": 0.4799}, {"a": 0.50}, None, GateConfig(margin=0.02)).publish
    # only gated tasks count
    assert decide({"a": 0.1, "b": 0.9}, {"a": 0.5, "b": 0.5}, None, GateConfig(margin=0.0, tasks=["b"])).publish


def _result(run: str, rnd: int, accs: dict[str, float], store: ResultsStore, role: str = "merge") -> EvalResult:
    scores = [TaskScore(t, "acc", v, 0.01, 100) for t, v in accs.items()]
    store.append_scores(ScoreRecord(run_id=run, task=t, metric="acc", value=v, stderr=0.01, label="ties" if role == "merge" else role,
                                    role=role, round=rnd) for t, v in accs.items())
    return EvalResult(run, "ties", role, rnd, f"sha256:{run}", scores, 1.0)


def test_gate_uses_store_and_records_decisions(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    gate = Gate(store, GateConfig(margin=0.02))
    _result("base", None, {"a": 0.30, "b": 0.30}, store, role="base")
    r1 = _result("r1", 1, {"a": 0.50, "b": 0.50}, store)
    assert gate.check(r1).publish  # above the base, no previous yet
    r2 = _result("r2", 2, {"a": 0.40, "b": 0.40}, store)
    d2 = gate.check(r2)
    assert not d2.publish and d2.reference == pytest.approx(0.50)  # compared with round 1, the last published
    r3 = _result("r3", 3, {"a": 0.49, "b": 0.49}, store)
    d3 = gate.check(r3)
    # The refused round 2 is not the reference: round 3 is held to round 1's 0.50 and passes.
    assert d3.publish and d3.reference == pytest.approx(0.50)
    rec = store.gate_decisions()
    assert [(g.round, g.published, g.run_id, g.fingerprint) for g in rec] == [
        (1, True, "r1", "sha256:r1"), (2, False, "r2", "sha256:r2"), (3, True, "r3", "sha256:r3")]
    assert rec[1].reason == d2.reason and rec[1].reference_kind == "previous" and rec[1].margin == 0.02
