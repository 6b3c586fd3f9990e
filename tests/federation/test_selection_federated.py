"""``selection: federated`` on the in-process grid: each contributing hospital scores every candidate
on its own validation split and returns only accuracies; the coordinator publishes the best by the
rule, records every score, survives restarts without asking again, and falls back to the
configured strategy when nobody could score."""

from __future__ import annotations

from pathlib import Path

import pytest
import selection_scorers
import torch
import yaml
from fedtest_helpers import assert_same_tensors, load_tensors, offline_merge
from roundkit import RecordingGrid, edit_yaml, runner, status, status_json

from fedmerge.checkpoints import CheckpointReader, model_fingerprint
from fedmerge.protocol import CANDIDATE_PART, FETCH_PART, OPEN_ROUND, SCORE_CANDIDATES, read_meta
from fedmerge.server.record import EventKind

CANDIDATES = [
    {"method": "task_arithmetic", "parameters": {"lambda": 0.5}},
    {"method": "ties", "parameters": {"density": 0.5}},
    {"method": "ties", "parameters": {"density": 1.0}},
]
# c3 is best on average but bad for hospital-b; c2 serves everyone: mean picks c3, worst picks c2.
TABLE = {
    "val_a": {"c1": 0.50, "c2": 0.60, "c3": 0.80},
    "val_b": {"c1": 0.50, "c2": 0.55, "c3": 0.30},
    "val_c": {"c1": 0.50, "c2": 0.60, "c3": 0.85},
}


@pytest.fixture(autouse=True)
def scripted_scores():
    selection_scorers.TABLE.clear()
    selection_scorers.TABLE.update({t: dict(v) for t, v in TABLE.items()})
    selection_scorers.CALLS.clear()
    yield
    selection_scorers.CALLS.clear()


def selective(make_federation, n=3, *, rule="mean", keep=True, scorers: dict[str, str | None] | None = None, **selection):
    """A toy federation with ``selection: federated``; hospital-x validates on its task ``val_x``."""
    tf = make_federation(n)
    edit_yaml(tf.federation_config, selection={"mode": "federated", "rule": rule, "keep_candidates": keep, "candidates": CANDIDATES, **selection})
    for name, path in tf.client_configs.items():
        task = f"val_{name[-1]}"
        (path.parent / f"{name}-validation.yaml").write_text(yaml.safe_dump({"tasks": [task], "task_dirs": [f"{name}-val-tasks"]}))
        scorer = (scorers or {}).get(name, "selection_scorers:TableScorer")
        if scorer == "none":
            continue
        edit_yaml(path, validation=f"{name}-validation.yaml", validation_scorer=scorer)
    return tf


class ReplyGrid(RecordingGrid):
    """Keeps the content of every reply to a candidate message: what left each hospital."""

    def __init__(self, node_configs, **kw):
        super().__init__(node_configs, **kw)
        self.candidate_replies: list[tuple[int, str, dict, list[str]]] = []

    def pull_messages(self, message_ids):
        out = super().pull_messages(message_ids)
        for r in out:
            if r.metadata.message_type in (CANDIDATE_PART, SCORE_CANDIDATES):
                self.candidate_replies.append((r.metadata.src_node_id, r.metadata.message_type, read_meta(r.content), list(r.content.array_records)))
        return out


def nodes_of(tf) -> dict[int, str]:
    return {i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}


def candidate_model(tf, rec, cid: str) -> Path:
    return Path(rec.selection.candidate(cid).model_dir)


def test_each_hospital_scores_on_its_own_validation_data_and_returns_only_scores(make_federation):
    tf = selective(make_federation, 3)
    grid = ReplyGrid(nodes_of(tf))
    rec = runner(tf, grid).run()[0]
    assert rec.status == "completed"
    inst_of = {i + 1: n for i, n in enumerate(sorted(tf.client_configs))}
    # what came back: per candidate part an acknowledgement, per hospital one table of numbers
    score_replies = [(node, meta, arrays) for node, kind, meta, arrays in grid.candidate_replies if kind == SCORE_CANDIDATES]
    assert sorted(node for node, _, _ in score_replies) == [1, 2, 3]
    for node, meta, arrays in score_replies:
        task = f"val_{inst_of[node][-1]}"
        assert arrays == []  # no payload: no model, no data
        assert meta == {"round": 1, **{f"acc/{c}/{task}": TABLE[task][c] for c in ("c1", "c2", "c3")}}
        assert all(type(v) in (int, float) for v in meta.values())
    for node, kind, meta, arrays in grid.candidate_replies:
        if kind == CANDIDATE_PART:
            assert arrays == [] and set(meta) == {"round", "candidate", "part"}
    # each hospital's scorer was handed its own validation config, and scored its own rebuilt candidates
    seen: dict[str, list[str]] = {}
    for call in selection_scorers.CALLS:
        inst = Path(call["model_dir"]).relative_to(tf.root / "clients").parts[0]
        assert call["tasks"] == [f"val_{inst[-1]}"]
        assert call["task_dirs"] == [str(tf.root / "clients" / f"{inst}-val-tasks")]
        seen.setdefault(inst, []).append(call["candidate"])
    assert seen == {n: ["c1", "c2", "c3"] for n in tf.client_configs}
    # what a hospital scored is the candidate rebuilt from a bfloat16 delta: reference + bf16(candidate - reference)
    base = load_tensors(tf.base)
    for call in selection_scorers.CALLS:
        cand = load_tensors(candidate_model(tf, rec, call["candidate"]))
        for name, rebuilt in call["tensors"].items():
            expected = (base[name].float() + (cand[name].float() - base[name].float()).to(torch.bfloat16).float()).to(base[name].dtype)
            assert torch.equal(rebuilt, expected), name
    # every score is in the record, with the bytes each hospital was sent
    sel = rec.selection
    assert sel.scores == {n: {c: {f"val_{n[-1]}": TABLE[f"val_{n[-1]}"][c]} for c in ("c1", "c2", "c3")} for n in tf.client_configs}
    package_bytes = sum(c.package_bytes for c in sel.candidates)
    assert sel.bytes_sent == {n: package_bytes for n in tf.client_configs} and sel.failures == []
    # hospitals keep scores, not candidate bytes; what they installed is the published model
    for n in tf.client_configs:
        hosp = tf.root / "clients" / n
        assert not list((hosp / "candidates" / "round-0001").glob("c*/package"))
        assert (hosp / "candidates" / "round-0001" / "scores.json").exists()
        assert (hosp / "models" / "current").resolve().name == "round-0001"
        assert_same_tensors(hosp / "models" / "current", rec.merge.model_dir)


@pytest.mark.parametrize("rule, chosen, values", [("mean", "c3", {"c1": 0.5, "c2": 1.75 / 3, "c3": 1.95 / 3}), ("worst", "c2", {"c1": 0.5, "c2": 0.55, "c3": 0.30})])
def test_the_published_model_is_the_best_candidate_by_the_rule(make_federation, tmp_path, rule, chosen, values):
    tf = selective(make_federation, 3, rule=rule)
    seen_by_evaluator = []

    def evaluate(round_id, model_dir):
        from fedmerge.eval.evaluator import EvalResult, TaskScore

        with CheckpointReader(model_dir) as r:
            seen_by_evaluator.append(model_fingerprint(r))
        return EvalResult(run_id="x", label="r", role="merge", round=round_id, fingerprint=None, scores=[TaskScore("test", "acc", 0.5, 0.1, 10)], seconds=0.0)

    from fedmerge.eval.gate import decide

    rec = runner(tf, RecordingGrid(nodes_of(tf)), evaluate_fn=evaluate, gate_fn=lambda res: decide(res.accuracies(), None, None)).run()[0]
    sel = rec.selection
    assert sel.chosen == chosen and sel.values == pytest.approx(values) and not sel.fallback
    assert sel.reason.startswith(f"{chosen} has the highest")
    # the published model is that candidate: the same merge as the chosen strategy run offline
    spec = CANDIDATES[int(chosen[1:]) - 1]
    offline = offline_merge(tf.base, [tf.finetunes[n] for n in sorted(tf.client_configs)], tmp_path / "off", spec)
    assert_same_tensors(rec.merge.model_dir, offline)
    assert rec.merge.method == spec["method"] and rec.merge.fingerprint == sel.candidate(chosen).fingerprint
    assert Path(rec.merge.model_dir) == tf.root / "coordinator" / "models" / "round-0001"
    assert_same_tensors(tf.root / "clients" / "hospital-b" / "models" / "current", offline)
    # only then the evaluator and the gate saw it
    assert seen_by_evaluator == [sel.candidate(chosen).fingerprint]
    kinds = [e.kind for e in rec.events]
    assert kinds.index(EventKind.SELECTED) < kinds.index(EventKind.MERGED) < kinds.index(EventKind.EVALUATED) < kinds.index(EventKind.GATED) < kinds.index(EventKind.SIGNED)
    assert kinds.count(EventKind.CANDIDATE) == 3 and kinds.count(EventKind.SCORED) == 3
    # the candidates not published are kept (keep_candidates) in the round's folder
    for c in sel.candidates:
        assert Path(c.model_dir).is_dir() and not (Path(c.model_dir).parent / "package").exists()


def test_status_shows_every_score_and_the_choice(make_federation):
    tf = selective(make_federation, 3, rule="worst", keep=False)
    runner(tf, RecordingGrid(nodes_of(tf))).run()
    rc, text = status(tf)
    assert rc == 0
    assert "round 1: completed; ties density=0.5 (candidate c2);" in text
    assert "  selection     federated, rule worst; published c2 (c2 has the highest worst scorer's mean accuracy (over 3 scorer(s)): 0.5500 (c1 0.5000, c3 0.3000))" in text
    assert "    c1   task_arithmetic lambda=0.5  0.5000  hospital-a: val_a 0.5000 | hospital-b: val_b 0.5000 | hospital-c: val_c 0.5000" in text
    assert "  * c2   ties density=0.5            0.5500  hospital-a: val_a 0.6000 | hospital-b: val_b 0.5500 | hospital-c: val_c 0.6000" in text
    assert "    c3   ties density=1.0            0.3000  hospital-a: val_a 0.8000 | hospital-b: val_b 0.3000 | hospital-c: val_c 0.8500" in text
    assert "    candidates sent: " in text and "to each of hospital-a, hospital-b, hospital-c" in text
    sel = status_json(tf)["rounds"][0]["selection"]
    assert sel["chosen"] == "c2" and sel["scores"]["hospital-b"] == {"c1": {"val_b": 0.5}, "c2": {"val_b": 0.55}, "c3": {"val_b": 0.3}}
    assert [c["label"] for c in sel["candidates"]] == ["task_arithmetic lambda=0.5", "ties density=0.5", "ties density=1.0"]
    # without keep_candidates only the published model stays
    assert not (tf.root / "coordinator" / "rounds" / "round-0001" / "candidates").exists()


def test_a_hospital_that_cannot_score_is_dropped_with_its_reason_and_the_others_decide(make_federation):
    tf = selective(make_federation, 3, scorers={"hospital-b": "selection_scorers:BrokenScorer", "hospital-c": "none"})
    rec = runner(tf, RecordingGrid(nodes_of(tf))).run()[0]
    sel = rec.selection
    assert rec.status == "completed" and sel.chosen == "c3"  # hospital-a alone decides: 0.80 is its best
    assert sorted(sel.scores) == ["hospital-a"] and sel.values == pytest.approx({"c1": 0.5, "c2": 0.6, "c3": 0.8})
    failures = {f.scorer: f for f in sel.failures}
    assert sorted(failures) == ["hospital-b", "hospital-c"] and failures["hospital-b"].node == 2
    b = failures["hospital-b"].reason
    assert b.startswith("the hospital refused: ScorerFailed: hospital-b: scoring candidate c1 failed: RuntimeError: validation data unreadable at <local path>")
    assert str(tf.root) not in b and "secret" not in b
    assert "NoValidationData: hospital-c: no validation eval config (validation: in the client config)" in failures["hospital-c"].reason
    # they were still sent the published model, like any contributor
    assert rec.publication.installed == ["hospital-a", "hospital-b", "hospital-c"]
    text = status(tf)[1]
    assert "    not scored by hospital-b: the hospital refused: ScorerFailed:" in text and "<local path>" in text
    assert [e.institution for e in rec.events if e.kind == EventKind.NOT_SCORED] == ["hospital-b", "hospital-c"]


def test_when_nobody_scores_the_configured_strategy_is_published(make_federation, tmp_path):
    broken = "selection_scorers:BrokenScorer"
    tf = selective(make_federation, 2, keep=False, scorers={"hospital-a": broken, "hospital-b": broken})
    rec = runner(tf, RecordingGrid(nodes_of(tf))).run()[0]
    sel = rec.selection
    assert rec.status == "completed" and sel.fallback and sel.chosen is None and sel.values == {}
    assert sel.reason.startswith("no scorer scored every candidate; published the configured strategy (task_arithmetic) instead (hospital-a: the hospital refused")
    offline = offline_merge(tf.base, [tf.finetunes[n] for n in sorted(tf.client_configs)], tmp_path / "off", {"method": "task_arithmetic"})
    assert_same_tensors(rec.merge.model_dir, offline) and rec.merge.method == "task_arithmetic"
    assert not (tf.root / "coordinator" / "rounds" / "round-0001" / "candidates").exists()
    assert "  selection     federated, rule mean; FALLBACK: no scorer scored every candidate" in status(tf)[1]


def test_a_candidate_that_cannot_be_built_is_recorded_and_the_others_compete(make_federation):
    # linear with all weights zero validates as a config but cannot be normalized by any tensor
    tf = selective(make_federation, 2, candidates=[CANDIDATES[0], {"method": "linear", "parameters": {"weight": 0.0}}, CANDIDATES[2]])
    rec = runner(tf, RecordingGrid(nodes_of(tf))).run()[0]
    sel = rec.selection
    assert [c.id for c in sel.candidates] == ["c1", "c3"] and list(sel.unbuilt) == ["c2"]
    assert "weights sum to zero" in sel.unbuilt["c2"]
    assert sel.scores["hospital-a"] == {"c1": {"val_a": 0.5}, "c3": {"val_a": 0.8}} and sel.chosen == "c3"
    assert "    c2   not built: " in status(tf)[1]


def test_a_restart_does_not_ask_again_for_scores_already_recorded(make_federation):
    tf = selective(make_federation, 3)

    class Stop(Exception):
        pass

    def stop_at_first_score(event):
        if event.kind == EventKind.SCORED:
            raise Stop

    with pytest.raises(Stop):
        runner(tf, RecordingGrid(nodes_of(tf)), on_event=stop_at_first_score).run()
    first = status_json(tf)["rounds"][0]
    assert first["status"] == "selecting"
    (scored,) = first["selection"]["scores"]
    built = [c["fingerprint"] for c in first["selection"]["candidates"]]
    calls_before = len(selection_scorers.CALLS)
    grid = RecordingGrid(nodes_of(tf))
    rec = runner(tf, grid).run()[0]
    assert rec.status == "completed" and sorted(rec.selection.scores) == sorted(tf.client_configs)
    node = sorted(tf.client_configs).index(scored) + 1
    assert grid.count("push", node, CANDIDATE_PART) == 0 and grid.count("push", node, SCORE_CANDIDATES) == 0
    for other in {1, 2, 3} - {node}:
        assert grid.count("push", other, SCORE_CANDIDATES) == 1 and grid.count("push", other, CANDIDATE_PART) > 0
    for n in (1, 2, 3):  # contributions were settled: nobody is asked to contribute again
        assert grid.count("push", n, OPEN_ROUND) == 0 and grid.count("push", n, FETCH_PART) == 0
    # over both runs each hospital scored each candidate once: the in-process grid delivered every
    # question before the fault, and a hospital asked again answers from the scores it kept
    assert calls_before == len(selection_scorers.CALLS) == 3 * 3
    assert rec.selection.scores[scored] == first["selection"]["scores"][scored]
    assert [c.fingerprint for c in rec.selection.candidates] == built
    assert [e.kind for e in rec.events].count(EventKind.CANDIDATE) == 3  # not built again


def test_with_reference_global_the_next_rounds_candidates_are_deltas_from_the_published_model(make_federation):
    tf = selective(make_federation, 2, rule="worst", keep=False)
    edit_yaml(tf.federation_config, rounds=2, reference="global")
    r1, r2 = runner(tf, RecordingGrid(nodes_of(tf))).run()
    assert r1.selection.chosen == r2.selection.chosen == "c2"  # worst of hospital-a and -b: 0.55
    assert r2.reference.kind == "global" and r2.reference.round == 1 and r2.reference.fingerprint == r1.merge.fingerprint
    # each hospital found round 1's model by its fingerprint and rebuilt round 2's candidates on it
    assert sorted(r2.selection.scores) == ["hospital-a", "hospital-b"] and r2.selection.failures == []
    for n in tf.client_configs:
        hosp = tf.root / "clients" / n
        assert (hosp / "models" / "current").resolve().name == "round-0002"
        assert not (hosp / "candidates" / "round-0001").exists()  # older rounds' candidates are pruned


def test_compressed_candidates_travel_as_int4_deltas_that_hospitals_rebuild(make_federation, tmp_path):
    """``selection.compression: int4``: each candidate package is well under the bf16 one, and what
    each hospital scored is reference + decode(int4(candidate - reference)), close to the candidate."""
    from fedmerge.merging.taskvector import DeltaCheckpoint
    from fedmerge.security.keys import generate_identity
    from fedmerge.security.pack import pack_delta
    from fedmerge.security.trust import TrustStore
    from fedmerge.security.verify import verify_package

    tf = selective(make_federation, 2, compression="int4")
    rec = runner(tf, RecordingGrid(nodes_of(tf))).run()[0]
    assert rec.status == "completed" and rec.selection.failures == []
    me = generate_identity("checker", tmp_path / "keys")
    trust = TrustStore()
    trust.add(me.public)
    base = load_tensors(tf.base)
    scored = 0
    for c in rec.selection.candidates:
        plain = pack_delta(c.model_dir, tf.base, tmp_path / f"{c.id}-bf16", me, 1, dtype="bfloat16")
        plain_bytes = sum(p.stat().st_size for p in plain.rglob("*") if p.is_file())
        assert c.package_bytes < 0.6 * plain_bytes, (c.id, c.package_bytes, plain_bytes)
        # int4 is deterministic: the same encoding of the same delta, made here, gives what hospitals rebuilt
        mine = pack_delta(c.model_dir, tf.base, tmp_path / f"{c.id}-int4", me, 1, dtype="bfloat16", compress="int4")
        verify_package(mine, trust, require_sealed=False, unpack_to=tmp_path / f"{c.id}-delta")
        delta = DeltaCheckpoint(tmp_path / f"{c.id}-delta")
        cand = load_tensors(Path(c.model_dir))
        for call in (x for x in selection_scorers.CALLS if x["candidate"] == c.id):
            scored += 1
            for name, rebuilt in call["tensors"].items():
                expected = (base[name].float() + delta.get_delta(name).float()).to(base[name].dtype)
                assert torch.equal(rebuilt, expected), name
                true, got = (cand[name].float() - base[name].float()).flatten(), (rebuilt.float() - base[name].float()).flatten()
                if rebuilt.ndim == 2 and true.norm() > 0:
                    assert torch.nn.functional.cosine_similarity(true, got, dim=0) > 0.98, name
    assert scored == 2 * len(rec.selection.candidates)


def test_a_chosen_candidate_is_published_as_the_compressed_delta_hospitals_rebuild(make_federation, tmp_path):
    """``publish_compression: int4`` with selection: the chosen candidate is re-encoded against the
    round's reference; the coordinator's model, its signed fingerprint and every hospital's
    installed model are reference + decode(int4(candidate - reference)), close to the candidate."""
    from fedmerge.checkpoints.rebuild import read_model_delta

    tf = selective(make_federation, 3, rule="worst")
    edit_yaml(tf.federation_config, publish_compression="int4")
    rec = runner(tf, RecordingGrid(nodes_of(tf))).run()[0]
    sel = rec.selection
    assert rec.status == "completed" and sel.chosen == "c2"
    published = Path(rec.merge.model_dir)
    assert published == tf.root / "coordinator" / "models" / "round-0001"
    with CheckpointReader(published) as r:
        assert rec.merge.fingerprint == model_fingerprint(r) != sel.candidate("c2").fingerprint
    # the encoded delta beside it is int4, and decoding it onto the base gives the published weights
    delta, meta = read_model_delta(published.with_name("round-0001.delta"))
    assert meta["compression"]["spec"] == "int4"
    offline = load_tensors(offline_merge(tf.base, [tf.finetunes[n] for n in sorted(tf.client_configs)], tmp_path / "off", CANDIDATES[1]))
    base, pub = load_tensors(tf.base), load_tensors(published)
    for name, w in pub.items():
        true, got = (offline[name].float() - base[name].float()).flatten(), (w.float() - base[name].float()).flatten()
        if w.ndim == 2 and true.norm() > 0:
            assert not torch.equal(true, got) and torch.nn.functional.cosine_similarity(true, got, dim=0) > 0.98, name
    for n in tf.client_configs:
        assert_same_tensors(tf.root / "clients" / n / "models" / "current", published)
