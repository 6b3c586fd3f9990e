"""The trust anchor and the bound publications inside a real (in-process) federation round."""

from __future__ import annotations

import json
import shutil

import pytest

from fedmerge.cli import main
from fedmerge.security import errors as E


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """One sealed round over two hospitals, run once for the module."""
    from fedmerge.federation.inprocess import run_simulation
    from fedmerge.federation.toy import build_toy_federation
    from fedmerge.toymodels import TinyMistralSpec

    tf = build_toy_federation(tmp_path_factory.mktemp("fed"), 2, rounds=1, seal=True, spec=TinyMistralSpec(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    report = run_simulation(tf.federation_config, list(tf.client_configs.values()))
    assert [r.status for r in report.rounds] == ["completed"]
    return tf, report


def _edited_store(tf, tmp_path):
    """A copy of the federation's signed store with mallory enrolled by hand (signature kept)."""
    from fedmerge.security.keys import generate_identity

    data = json.loads(tf.trust_store.read_text())
    pub = generate_identity("mallory", tmp_path / "mallory").public.to_dict()
    data["members"]["mallory"] = {"role": "institution", "signing_key": pub["signing_key"], "encryption_key": pub["encryption_key"]}
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(data))
    return path


def test_verify_model_round_1_passes_on_the_genuine_round_1_model(fed, capsys):
    tf, report = fed
    model = tf.root / "coordinator" / "models" / "round-0001"
    args = ["verify-model", str(model), "--trust", str(tf.trust_store), "--coordinator-pub", str(tf.coordinator_public)]
    assert main([*args, "--round", "1"]) == 0
    out = capsys.readouterr().out
    assert "round 1" in out and report.rounds[0].record.publication.fingerprint in out
    assert main([*args, "--newer-than", "1"]) == 1
    assert "not newer" in capsys.readouterr().err


def test_the_installed_model_carries_the_signed_round_and_fingerprint(fed):
    from fedmerge.checkpoints import CheckpointReader, model_fingerprint
    from fedmerge.security.keys import PublicIdentity
    from fedmerge.security.model_sign import verify_model
    from fedmerge.security.trust import TrustStore

    tf, report = fed
    pinned = PublicIdentity.load(tf.coordinator_public)
    trust = TrustStore.load(tf.trust_store, pinned)
    for name in tf.client_configs:
        installed = tf.root / "clients" / name / "models" / "current"
        pub = verify_model(installed, trust, coordinator=pinned, expected_round=1)
        assert pub.fingerprint == report.rounds[0].record.publication.fingerprint == model_fingerprint(CheckpointReader(installed))


def test_the_coordinator_refuses_a_trust_store_edited_after_signing(fed, tmp_path):
    from fedmerge.federation.inprocess import LocalGrid
    from fedmerge.server.config import load_federation_config
    from fedmerge.server.rounds import RoundRunner

    tf, _ = fed
    cfg = load_federation_config(tf.federation_config)
    cfg = cfg.model_copy(update={"trust_store": str(_edited_store(tf, tmp_path)), "state_dir": str(tmp_path / "state")})
    with pytest.raises(E.TrustStoreSignatureInvalid) as exc:
        RoundRunner(LocalGrid({}), cfg)
    assert str(tmp_path / "trust.json") in str(exc.value)
    # allow_unsigned_trust does not excuse a broken signature
    with pytest.raises(E.TrustStoreSignatureInvalid):
        RoundRunner(LocalGrid({}), cfg.model_copy(update={"allow_unsigned_trust": True}))


def test_the_coordinator_takes_an_unsigned_store_only_with_the_flag(fed, tmp_path):
    from fedmerge.federation.inprocess import LocalGrid
    from fedmerge.security.trust import TrustStore
    from fedmerge.server.config import load_federation_config
    from fedmerge.server.directory import MappingDirectory
    from fedmerge.server.rounds import RoundRunner, load_coordinator_trust

    tf, _ = fed
    store = TrustStore.open_for_editing(tf.trust_store)
    store.signature = None
    store.save(tmp_path / "unsigned.json")
    cfg = load_federation_config(tf.federation_config).model_copy(update={"trust_store": str(tmp_path / "unsigned.json"), "state_dir": str(tmp_path / "state")})
    with pytest.raises(E.TrustStoreUnverified, match="allow-unsigned-trust"):
        RoundRunner(LocalGrid({}), cfg)
    allowed = cfg.model_copy(update={"allow_unsigned_trust": True})
    runner = RoundRunner(LocalGrid({}), allowed, directory=MappingDirectory({}))
    assert load_coordinator_trust(allowed, runner.identity).status.state == "unsigned"


def test_a_hospital_refuses_to_install_through_an_edited_trust_store(fed, tmp_path):
    from fedmerge.client.config import load_client_config
    from fedmerge.client.node import HospitalNode
    from fedmerge.protocol import plan_folder, read_part

    tf, _ = fed
    cfg = load_client_config(tf.client_configs["hospital-a"])
    state = tmp_path / "state"
    shutil.copytree(cfg.state, state, symlinks=True)
    node = HospitalNode(cfg.model_copy(update={"trust_store": str(_edited_store(tf, tmp_path)), "state_dir": str(state)}))
    model = tf.root / "coordinator" / "models" / "round-0001"
    plan = plan_folder(model, 1 << 20)
    for i in range(len(plan.parts)):
        node.install_part(2, plan.to_json(), i, read_part(model, plan, i))
    with pytest.raises(E.TrustStoreSignatureInvalid):
        node.install_commit(2, plan.to_json())
    assert not (node.models / "round-0002").exists() and node.current.resolve().name == "round-0001"


def test_client_config_pins_the_coordinator_and_seals_by_default(tmp_path):
    import yaml

    from fedmerge.client.config import load_client_config
    from fedmerge.configfile import ConfigError

    base = {"institution": "h", "identity_key": "h.key", "trust_store": "t.json", "base_model": "b", "finetuned": "f", "state_dir": "s"}

    def load(**kw):
        p = tmp_path / "client.yaml"
        p.write_text(yaml.safe_dump({**base, **kw}))
        return load_client_config(p)

    # The pinned coordinator is required even for an unsigned store: it alone signs published models.
    for flags in ({}, {"allow_unsigned_trust": True}):
        with pytest.raises(ConfigError, match="coordinator_public_file: Field required"):
            load(**flags)
    assert load(coordinator_public_file="c.pub.json").seal is True
    assert load(coordinator_public_file="c.pub.json", seal=False).seal is False
