"""Fresh, bound publications: the coordinator signs each model with its round and fingerprint; a
hospital installs only a newer round, signed by the coordinator it pinned, checked against a
trust store that coordinator signed, and records the fingerprint the signature vouches for."""

from __future__ import annotations

import shutil

import pytest
from roundkit import edit_yaml, status, status_json

from fedmerge.client.config import load_client_config
from fedmerge.security.errors import StalePublication, WrongPublisher
from fedmerge.client.node import HospitalNode
from fedmerge.federation.inprocess import run_simulation
from fedmerge.protocol import plan_folder, read_part
from fedmerge.security.errors import ModelVerificationFailed, SignatureInvalid


def _push(node: HospitalNode, model_dir, r: int, extra: dict | None = None) -> dict:
    """What the coordinator's push does, message by message, straight into the hospital's handlers."""
    plan = plan_folder(model_dir, 256 * 1024, extra=extra)
    for i in range(len(plan.parts)):
        node.install_part(r, plan.to_json(), i, read_part(model_dir, plan, i))
    return node.install_commit(r, plan.to_json(), "contributed")


@pytest.fixture
def two_rounds(make_federation):
    tf = make_federation(2, rounds=2)
    report = run_simulation(tf.federation_config, list(tf.client_configs.values()))
    assert [r.status for r in report.rounds] == ["completed", "completed"]
    return tf, report


def _node(tf, name="hospital-a") -> HospitalNode:
    return HospitalNode(load_client_config(tf.client_configs[name]))


def test_the_coordinator_signs_each_publication_with_its_round_and_fingerprint(two_rounds):
    from fedmerge.security.keys import PublicIdentity
    from fedmerge.security.model_sign import verify_model
    from fedmerge.security.trust import TrustStore

    tf, report = two_rounds
    trust = TrustStore.load(tf.trust_store, PublicIdentity.load(tf.coordinator_public))
    for rr in report.rounds:
        pub = verify_model(rr.model_dir, trust, expected_round=rr.round, expected_fingerprint=rr.record.merge.fingerprint, check_fingerprint=True)
        assert (pub.signer, pub.round) == ("coordinator", rr.round)
        assert rr.record.publication.fingerprint == pub.fingerprint and rr.record.publication.round == rr.round
    with pytest.raises(ModelVerificationFailed, match="published for round 1, expected round 2"):
        verify_model(report.rounds[0].model_dir, trust, expected_round=2)


def test_an_older_round_is_refused_before_anything_is_written(two_rounds):
    tf, report = two_rounds
    node = _node(tf)
    assert node.installed_round() == 2
    with pytest.raises(StalePublication, match="round 1 was pushed, but round 2 is installed"):
        _push(node, report.rounds[0].model_dir, 1)
    assert not (node.state / "incoming" / "round-0001").exists()
    assert node.current.resolve().name == "round-0002"


def test_a_replayed_model_under_a_new_round_number_is_refused(two_rounds):
    tf, report = two_rounds
    node = _node(tf)
    # round 1's genuine, signed model pushed as if it were round 3
    with pytest.raises(ModelVerificationFailed, match="published for round 1, expected round 3"):
        _push(node, report.rounds[0].model_dir, 3)
    assert not (node.models / "round-0003").exists() and node.current.resolve().name == "round-0002"


def test_a_model_signed_by_another_coordinator_is_refused(two_rounds, tmp_path):
    from fedmerge.security.keys import generate_identity, load_identity
    from fedmerge.security.keys import PublicIdentity
    from fedmerge.security.model_sign import sign_model
    from fedmerge.security.trust import TrustStore

    tf, report = two_rounds
    # A second coordinator, even one the consortium's store enrols (and the real coordinator signed).
    other = generate_identity("coordinator-b", tmp_path / "keys")
    trust = TrustStore.open_for_editing(tf.trust_store)
    trust.add(other.public, role="coordinator")
    trust.sign(load_identity(tf.coordinator_key))
    trust.save()
    trust = TrustStore.load(tf.trust_store, PublicIdentity.load(tf.coordinator_public))
    model = shutil.copytree(report.rounds[1].model_dir, tmp_path / "model")
    sign_model(model, other, round_id=3, fingerprint=report.rounds[1].record.merge.fingerprint, trust=trust)
    node = _node(tf)
    with pytest.raises(WrongPublisher, match="published by 'coordinator-b' .*not by the pinned coordinator 'coordinator'"):
        _push(node, model, 3)
    assert node.current.resolve().name == "round-0002"


def test_the_fingerprint_recorded_is_the_signed_one_not_the_plans(two_rounds, tmp_path):
    from fedmerge.security.keys import load_identity
    from fedmerge.security.model_sign import sign_model

    tf, report = two_rounds
    genuine = report.rounds[1].record.merge.fingerprint
    model = shutil.copytree(report.rounds[1].model_dir, tmp_path / "model")
    sign_model(model, load_identity(tf.coordinator_key), round_id=3, fingerprint=genuine)
    node = _node(tf)
    # the plan travels unsigned: whatever fingerprint it names is not what the hospital keeps
    _push(node, model, 3, extra={"round": 3, "fingerprint": "sha256:" + "0" * 64})
    assert node.current.resolve().name == "round-0003"
    assert node._fp_cache()[str((node.models / "round-0003").resolve())] == genuine
    assert node.find_reference(genuine) == node.models / "round-0003"


def test_a_trust_store_not_signed_by_the_pinned_coordinator_is_refused(two_rounds, tmp_path):
    import json

    from fedmerge.security.errors import TrustStoreUnverified
    from fedmerge.security.keys import generate_identity

    tf, _ = two_rounds
    node = _node(tf)
    # mallory edits the store to enrol herself as a coordinator; the signature no longer matches
    data = json.loads(tf.trust_store.read_text())
    mallory = generate_identity("mallory", tmp_path / "keys")
    keys = mallory.public.to_dict()
    data["members"]["mallory"] = {**data["members"]["coordinator"], "signing_key": keys["signing_key"], "encryption_key": keys["encryption_key"]}
    tf.trust_store.write_text(json.dumps(data))
    with pytest.raises(SignatureInvalid, match="does not match its members"):
        node.trust()
    # unsigned: refused too, unless the hospital says explicitly that it accepts that
    del data["signature"]
    tf.trust_store.write_text(json.dumps(data))
    with pytest.raises(TrustStoreUnverified, match="the trust store is not signed"):
        node.trust()
    edit_yaml(tf.client_configs["hospital-a"], allow_unsigned_trust=True)
    assert "mallory" in _node(tf).trust()


def test_the_coordinator_refuses_an_unsigned_trust_store_unless_told(make_federation):
    import json

    from fedmerge.federation.inprocess import LocalGrid
    from fedmerge.security.errors import TrustStoreUnverified
    from fedmerge.server.config import load_federation_config
    from fedmerge.server.directory import MappingDirectory
    from fedmerge.server.rounds import RoundRunner

    tf = make_federation(2, rounds=1)
    data = json.loads(tf.trust_store.read_text())
    del data["signature"]
    tf.trust_store.write_text(json.dumps(data))
    grid = LocalGrid({1: str(tf.client_configs["hospital-a"])})
    with pytest.raises(TrustStoreUnverified, match="the trust store is not signed"):
        RoundRunner(grid, load_federation_config(tf.federation_config), directory=MappingDirectory({1: "hospital-a"}))
    edit_yaml(tf.federation_config, allow_unsigned_trust=True)
    RoundRunner(grid, load_federation_config(tf.federation_config), directory=MappingDirectory({1: "hospital-a"}))


def test_a_coordinator_rolled_back_to_an_old_state_cannot_push_an_old_round(two_rounds):
    """The coordinator's state is lost (restored from an old backup): it runs round 1 again and
    pushes it. Every hospital, which holds round 2, refuses; the refusals, scrubbed, are recorded."""
    tf, report = two_rounds
    shutil.rmtree(tf.root / "coordinator")
    edit_yaml(tf.federation_config, rounds=1)
    again = run_simulation(tf.federation_config, list(tf.client_configs.values()))
    rec = again.rounds[0].record
    assert rec.status == "completed" and rec.publication.installed == []
    assert sorted(d.institution for d in rec.publication.failures) == ["hospital-a", "hospital-b"]
    for d in rec.publication.failures:
        assert "StalePublication" in d.reason and str(tf.root) not in d.reason
    for name in tf.client_configs:
        assert (tf.root / "clients" / name / "models" / "current").resolve().name == "round-0002"
    assert "not installed by hospital-a: the hospital refused the model: StalePublication" in status(tf)[1]
    assert status_json(tf)["rounds"][0]["publication"]["installed"] == []


def test_the_push_waits_no_longer_once_every_contributor_installed_or_refused(make_federation, tmp_path):
    """hospital-b contributes but refuses the model (its trust store was edited); hospital-c, which
    contributed nothing, never answers an install. The push gives hospital-c the straggler grace once
    hospital-a installed and hospital-b refused, not the round's hour-long timeout."""
    import json

    from roundkit import RecordingGrid, runner

    from fedmerge.protocol import INSTALL_PART, OPEN_ROUND

    tf = make_federation(3, rounds=1, min_clients=2, federation_overrides={"round_timeout_s": 3600.0, "straggler_grace_s": 0.5})
    store = tmp_path / "b-trust.json"
    data = json.loads(tf.trust_store.read_text())
    data["members"]["hospital-c"]["role"] = "coordinator"  # an edit the signature does not cover
    store.write_text(json.dumps(data))
    edit_yaml(tf.client_configs["hospital-b"], trust_store=str(store))

    class Silent(RecordingGrid):
        """Node 3 refuses to open the round and never answers an install."""

        def pull_messages(self, message_ids):
            out = []
            for reply in super().pull_messages(message_ids):
                if reply.metadata.src_node_id == 3 and reply.metadata.message_type == INSTALL_PART:
                    continue
                out.append(reply)
            return out

    def no_contribution_from_c(message, context):
        from fedmerge.client.app import app

        if context.node_id == 3 and message.metadata.message_type == OPEN_ROUND:
            raise RuntimeError("no package this round")
        return app(message=message, context=context)

    grid = Silent({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}, client_app=no_contribution_from_c)
    rec = runner(tf, grid).run()[0]
    assert rec.status == "completed" and rec.contributors == ["hospital-a", "hospital-b"]
    assert rec.publication.installed == ["hospital-a"]
    failures = {f.institution: f.reason for f in rec.publication.failures}
    assert "TrustStoreSignatureInvalid" in failures["hospital-b"] and "timed out" in failures["hospital-c"]
