"""A hospital's side of federated selection, through the calls its ClientApp handlers make: it scores
only candidates signed by its pinned coordinator for that round and slot, verified byte for byte,
within its limits, on its own validation config, and never installs one."""

from __future__ import annotations

import os

import pytest
import selection_scorers
import yaml
from roundkit import edit_yaml

from fedmerge.checkpoints import CheckpointReader, model_fingerprint
from fedmerge.client.candidates import CandidateScoring
from fedmerge.client.config import load_client_config
from fedmerge.client.errors import CandidateRefused, NoValidationData, UnknownReference
from fedmerge.client.node import HospitalNode
from fedmerge.protocol import PlanRefused, candidate_package_label, plan_folder, read_part
from fedmerge.security.errors import DigestMismatch
from fedmerge.security.keys import load_identity
from fedmerge.server.selection.candidates import candidate_package


@pytest.fixture
def hospital(make_federation, tmp_path):
    """hospital-a with a validation config, the coordinator's identity, and the base's fingerprint."""
    selection_scorers.TABLE.clear()
    selection_scorers.TABLE.update({"val_a": {"c1": 0.25, "c2": 0.75, "c3": 0.5}})
    selection_scorers.CALLS.clear()
    tf = make_federation(2)
    cfg_path = tf.client_configs["hospital-a"]
    (cfg_path.parent / "val-a.yaml").write_text(yaml.safe_dump({"tasks": ["val_a"]}))
    edit_yaml(cfg_path, validation="val-a.yaml", validation_scorer="selection_scorers:TableScorer", max_candidates=2)
    with CheckpointReader(tf.base) as r:
        fp = model_fingerprint(r)
    return tf, load_identity(tf.coordinator_key), fp


def _scoring(tf) -> CandidateScoring:
    return CandidateScoring(HospitalNode(load_client_config(tf.client_configs["hospital-a"])))


def _package(tf, identity, fp, out, *, r=1, cid="c1", model="hospital-b"):
    return candidate_package(tf.finetunes[model], tf.base, out, identity, round_id=r, candidate=cid, reference_fingerprint=fp, dtype="bfloat16")


def _send(tf, pkg, *, r=1, cid="c1", part_bytes=64 * 1024):
    scoring = _scoring(tf)
    plan = plan_folder(pkg, part_bytes)
    for i in range(len(plan.parts)):
        assert scoring.receive_part(r, cid, plan.to_json(), i, read_part(pkg, plan, i)) == {"round": r, "candidate": cid, "part": i}
    return scoring


def test_a_candidate_signed_by_the_pinned_coordinator_is_rebuilt_scored_and_never_installed(hospital, tmp_path):
    tf, coordinator, fp = hospital
    scoring = _send(tf, _package(tf, coordinator, fp, tmp_path / "c1"))
    assert scoring.score(1, fp, "bfloat16", ["c1"]) == {"round": 1, "acc/c1/val_a": 0.25}
    (call,) = selection_scorers.CALLS
    assert call["tasks"] == ["val_a"] and call["candidate"] == "c1" and call["round"] == 1
    state = tf.root / "clients" / "hospital-a"
    assert not (state / "models").exists()  # scored, not installed
    assert not os.path.exists(call["model_dir"])  # the rebuilt candidate was scratch
    # asked again (a lost reply, a restarted coordinator): answered from the kept scores
    assert scoring.score(1, fp, "bfloat16", ["c1"]) == {"round": 1, "acc/c1/val_a": 0.25} and len(selection_scorers.CALLS) == 1


def test_a_package_signed_by_anyone_else_is_refused(hospital, tmp_path):
    tf, _, fp = hospital
    forger = load_identity(tf.root / "keys" / "hospital-b.key")  # enrolled, but not the coordinator
    scoring = _send(tf, _package(tf, forger, fp, tmp_path / "forged"))
    with pytest.raises(CandidateRefused, match="candidate c1 of round 1 is signed by 'hospital-b', not by the pinned coordinator 'coordinator'"):
        scoring.score(1, fp, "bfloat16", ["c1"])
    assert selection_scorers.CALLS == []


@pytest.mark.parametrize("signed_as, sent_as", [((1, "c2"), (1, "c1")), ((1, "c1"), (2, "c1"))])
def test_a_candidate_signed_for_another_slot_or_round_is_refused(hospital, tmp_path, signed_as, sent_as):
    tf, coordinator, fp = hospital
    pkg = _package(tf, coordinator, fp, tmp_path / "pkg", r=signed_as[0], cid=signed_as[1])
    scoring = _send(tf, pkg, r=sent_as[0], cid=sent_as[1])
    with pytest.raises(CandidateRefused) as err:
        scoring.score(sent_as[0], fp, "bfloat16", [sent_as[1]])
    assert f"is signed as {candidate_package_label(*signed_as)!r}" in str(err.value)
    assert selection_scorers.CALLS == []


def test_altered_bytes_are_caught_before_anything_is_scored(hospital, tmp_path):
    tf, coordinator, fp = hospital
    pkg = _package(tf, coordinator, fp, tmp_path / "c1")
    data = sorted(pkg.glob("data-*.bin"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))  # a plan made after the change: the transfer itself is faithful
    scoring = _send(tf, pkg)
    with pytest.raises(DigestMismatch, match="does not match its SHA-256 in the signed manifest"):
        scoring.score(1, fp, "bfloat16", ["c1"])
    assert selection_scorers.CALLS == []


def test_limits_round_and_configuration_are_checked(hospital, tmp_path):
    tf, coordinator, fp = hospital
    scoring = _scoring(tf)
    # a file a package never holds
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "run.sh").write_text("echo hi")
    plan = plan_folder(tmp_path / "odd", 1024)
    with pytest.raises(PlanRefused, match="file name 'run.sh' is not one this folder may hold"):
        scoring.receive_part(1, "c1", plan.to_json(), 0, read_part(tmp_path / "odd", plan, 0))
    # at most max_candidates (2 here) per round
    for cid in ("c1", "c2"):
        _send(tf, _package(tf, coordinator, fp, tmp_path / cid, cid=cid), cid=cid)
    with pytest.raises(CandidateRefused, match="round 1 already has 2 candidates, max_candidates is 2"):
        _send(tf, _package(tf, coordinator, fp, tmp_path / "c3", cid="c3"), cid="c3")
    with pytest.raises(CandidateRefused, match="asked to score 3 candidates, max_candidates is 2"):
        scoring.score(1, fp, "bfloat16", ["c1", "c2", "c3"])
    with pytest.raises(CandidateRefused, match="'x1' is not a candidate id"):
        scoring.score(1, fp, "bfloat16", ["x1"])
    # a reference it does not hold
    with pytest.raises(UnknownReference, match="no local model has fingerprint sha256:0000"):
        scoring.score(1, "sha256:" + "0" * 64, "bfloat16", ["c1"])
    # both scored, in the order asked
    assert scoring.score(1, fp, "bfloat16", ["c2", "c1"]) == {"round": 1, "acc/c2/val_a": 0.75, "acc/c1/val_a": 0.25}
    # a round not newer than the installed model's
    models = tf.root / "clients" / "hospital-a" / "models"
    (models / "round-0003").mkdir(parents=True)
    os.symlink("round-0003", models / "current")  # as if round 3 were installed
    with pytest.raises(CandidateRefused, match="candidates for round 3, but round 3 is installed"):
        _send(tf, _package(tf, coordinator, fp, tmp_path / "r3", r=3), r=3)
    # no validation config: declines
    edit_yaml(tf.client_configs["hospital-a"], validation=None)
    with pytest.raises(NoValidationData, match="hospital-a: no validation eval config"):
        _scoring(tf).score(4, fp, "bfloat16", ["c1"])


def test_a_validation_scorer_that_cannot_be_loaded_is_a_typed_refusal(hospital, tmp_path):
    from fedmerge.client.candidates import EvaluatorScorer, scorer_factory
    from fedmerge.client.errors import ScorerFailed
    from fedmerge.configfile import ConfigError

    assert scorer_factory(None) is EvaluatorScorer
    with pytest.raises(ScorerFailed, match="validation_scorer 'no_such_module:make' cannot be loaded \\(ModuleNotFoundError"):
        scorer_factory("no_such_module:make")
    with pytest.raises(ScorerFailed, match="validation_scorer 'selection_scorers:TABLE' is not callable"):
        scorer_factory("selection_scorers:TABLE")
    tf, _, _ = hospital
    edit_yaml(tf.client_configs["hospital-a"], validation_scorer="just a name")
    with pytest.raises(ConfigError, match="validation_scorer: String should match pattern"):
        load_client_config(tf.client_configs["hospital-a"])
