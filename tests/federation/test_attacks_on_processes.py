"""Enrolled members who cheat, and a coordinator that is not the one pinned, against a real
deployment on loopback (SuperLink and SuperNodes, "public" interface 127.0.0.2): each attack fails,
and the honest hospitals' rounds still complete with exactly their contributions.

One deployment serves the module: three honest hospitals and four rogue ones, all enrolled and
bound to their own node keys, started before the coordinator. A rogue hospital runs code of its
own on its own machine (``rogue_site``: its processes load a patched ClientApp):

| node           | round 1                                   | round 2                          |
|----------------|-------------------------------------------|----------------------------------|
| hospital-a, -b | honest (hospital-b's trust store is edited by hand after its daemon started) |  |
| hospital-c     | honest                                    | offers its round-1 package again |
| rogue-claim    | says it is hospital-a, signs as hospital-a | the same                        |
| rogue-signer   | signs with hospital-a's key               | the same                         |
| rogue-unsealed | does not seal (require_sealed is on)      | its plan declares 1 TiB          |
| rogue-plans    | its plan names ``../x``                   | stalls after two parts           |

Then an impostor coordinator (its own key and trust store, the consortium's TLS key and address)
publishes a round to the same hospitals. `fedmerge status` (text and JSON) is read after each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from deployment_helpers import (
    Daemon,
    add_institution,
    kill_leftovers,
    make_layout,
    processes_mentioning,
    start_client,
    start_coordinator,
    wait_until_gone,
)
from fedtest_helpers import assert_same_tensors, offline_merge
from roundkit import status, status_json

from fedmerge.server.ledger import RoundLedger

pytestmark = pytest.mark.slow

HONEST = ["hospital-a", "hospital-b", "hospital-c"]
ROGUES = {  # name -> (client config changes, misbehaviour by round)
    "rogue-claim": ({"institution": "hospital-a", "identity_key": "hospital-a"}, None),
    "rogue-signer": ({"identity_key": "hospital-a"}, None),
    "rogue-unsealed": ({"seal": False}, "2:tebibyte"),
    "rogue-plans": ({}, "1:escape,2:stall"),
}
TA = {"method": "task_arithmetic"}


def _enrol_mallory_by_hand(store: Path, keys_dir: Path) -> None:
    from fedmerge.security.keys import generate_identity

    data = json.loads(store.read_text())
    pub = generate_identity("mallory", keys_dir).public.to_dict()
    data["members"]["mallory"] = {"role": "institution", "signing_key": pub["signing_key"], "encryption_key": pub["encryption_key"]}
    store.write_text(json.dumps(data))


class Attacked:
    def __init__(self, root: Path, toy_models):
        self.root = root
        self.layout = make_layout(root, toy_models, 3, seal=True, rounds=2, min_clients=2, straggler_grace_s=5.0, part_bytes=128 * 1024)
        keys = self.layout.toy.root / "keys"
        for name, (changes, _) in ROGUES.items():
            if "identity_key" in changes:
                changes = {**changes, "identity_key": str(keys / f"{changes['identity_key']}.key")}
            add_institution(self.layout, name, **changes)
        # hospital-b keeps a copy of the consortium's signed store, which someone edits by hand.
        self.b_store = keys / "hospital-b-trust.json"
        shutil.copy(self.layout.toy.trust_store, self.b_store)
        b = self.layout.client_config("hospital-b")
        b.write_text(b.read_text().replace(str(self.layout.toy.trust_store), str(self.b_store)))
        self.clients = {}

    def start(self) -> None:
        misbehaviour = {"hospital-c": "2:replay", **{n: r for n, (_, r) in ROGUES.items()}}
        for name in self.layout.names:
            self.clients[name] = start_client(self.layout, name, rogue=misbehaviour.get(name))
        for daemon in self.clients.values():
            daemon.wait_for("waiting for the SuperLink", 300)
        _enrol_mallory_by_hand(self.b_store, self.root / "mallory")  # after its daemon checked it at start
        coordinator = start_coordinator(self.layout)
        assert coordinator.wait(900) == 0, coordinator.text()[-4000:]
        self.coordinator_out = coordinator.text()
        self.records = RoundLedger(self.layout.state, create=False).records()

    def stop(self) -> None:
        Daemon.stop_all(list(self.clients.values()))


@pytest.fixture(scope="module")
def attacked(tmp_path_factory, toy_models):
    root = tmp_path_factory.mktemp("attacks")
    a = Attacked(root, toy_models)
    try:
        a.start()
        yield a
        a.stop()
        assert wait_until_gone(root, 30) == {}
    finally:
        a.stop()
        kill_leftovers(root)


class HospitalNodeState:
    """What a hospital holds, read from its state folder."""

    def __init__(self, a: Attacked, name: str):
        from fedmerge.client.config import load_client_config
        from fedmerge.client.node import HospitalNode

        self.node = HospitalNode(load_client_config(a.layout.client_config(name)))

    def outcome(self, r: int) -> str | None:
        return self.node.outcome(r)

    def current(self) -> str | None:
        return self.node.current.resolve().name if self.node.current.exists() else None


def _rejections(rec) -> dict[str, tuple[str, str]]:
    return {r.institution: (r.error, r.reason) for r in rec.rejections}


def _states(a: Attacked, round_index: int) -> dict[str, dict]:
    return status_json(a.layout.toy)["rounds"][round_index]["institutions"]


def test_the_honest_rounds_complete_with_exactly_the_honest_contributions(attacked, tmp_path):
    a = attacked
    r1, r2 = a.records
    assert (r1.status.value, r2.status.value) == ("completed", "completed")
    assert r1.contributors == HONEST and r2.contributors == ["hospital-a", "hospital-b"]
    toy = a.layout.toy
    merged = toy.root / "coordinator" / "models"
    assert_same_tensors(merged / "round-0001", offline_merge(toy.base, [toy.finetunes[n] for n in HONEST], tmp_path / "r1", TA))
    assert_same_tensors(merged / "round-0002", offline_merge(toy.base, [toy.finetunes[n] for n in HONEST[:2]], tmp_path / "r2", TA))
    assert a.layout.installed("hospital-a").resolve().name == "round-0002"
    assert "all 2 round(s) completed" in a.coordinator_out
    rc, text = status(toy)
    assert rc == 0 and "2 of 2 round(s) done" in text
    assert all(_states(a, 0)[n]["state"] == "contributed" for n in HONEST)


def test_a_node_claiming_another_institution_is_rejected_before_any_transfer(attacked):
    a = attacked
    for rec in a.records:
        error, reason = _rejections(rec)["rogue-claim"]
        assert error == "ClaimMismatch" and "is bound to rogue-claim but says it is 'hospital-a'" in reason
        assert "rogue-claim" not in rec.bytes_received  # nothing of it was fetched
    assert _states(a, 0)["rogue-claim"]["state"] == "rejected"


def test_a_hospital_contributing_through_a_node_bound_to_another_institution_is_rejected(attacked):
    a = attacked
    for rec in a.records:
        error, reason = _rejections(rec)["rogue-signer"]
        assert error == "SignerNotBound" and "bound to rogue-signer but the package is signed by 'hospital-a'" in reason
        assert rec.contributions["hospital-a"].node != rec.sampled["rogue-signer"]  # hospital-a counted once, from its own node
    rc, text = status(a.layout.toy)
    assert "rogue-signer" in text and "SignerNotBound" in text


def test_an_unsealed_contribution_is_refused_when_sealing_is_required(attacked):
    a = attacked
    r1 = a.records[0]
    assert _rejections(r1)["rogue-unsealed"][0] == "UnsealedPackage"
    assert all(c.sealed for rec in a.records for c in rec.contributions.values())
    assert "UnsealedPackage" in _states(a, 0)["rogue-unsealed"]["detail"]


def test_plans_naming_a_path_outside_the_package_or_a_tebibyte_are_refused_before_any_write(attacked):
    a = attacked
    r1, r2 = a.records
    error, reason = _rejections(r1)["rogue-plans"]
    assert error == "ProtocolError" and "'../x' is not a plain relative path" in reason
    error, reason = _rejections(r2)["rogue-unsealed"]
    assert error == "PlanRefused" and f"declares {1 << 40} bytes" in reason
    spool = a.layout.state / "rounds"
    assert not list(spool.rglob("x")) and not (spool / "x").exists()
    for rnd in ("round-0001", "round-0002"):
        assert list((spool / rnd / "incoming").iterdir()) == []
    assert _states(a, 1)["rogue-unsealed"]["state"] == "rejected"


def test_a_stalled_nodes_files_are_deleted(attacked):
    a = attacked
    r2 = a.records[1]
    (drop,) = [d for d in r2.drops if d.institution == "rogue-plans"]
    assert drop.stage == "transfer" and "timed out" in drop.reason
    assert r2.bytes_received["rogue-plans"] >= 2 * 128 * 1024  # it sent parts before it stalled...
    rdir = a.layout.state / "rounds" / "round-0002"
    assert list((rdir / "incoming").iterdir()) == [] and not any((rdir / "unpacking").glob("*"))  # ...and nothing of it is left
    assert _states(a, 1)["rogue-plans"] == {"state": "dropped", "detail": f"transfer: {drop.reason}"}


def test_a_hospital_offering_its_previous_rounds_package_again_is_refused(attacked):
    a = attacked
    error, reason = _rejections(a.records[1])["hospital-c"]
    assert error == "StaleRound" and "round 1" in reason
    assert a.records[0].contributions["hospital-c"].package_id not in {c.package_id for c in a.records[1].contributions.values()}
    c_state = HospitalNodeState(a, "hospital-c")
    assert c_state.outcome(2) == "rejected" and c_state.current() == "round-0002"  # told, and given the model all the same


def test_a_hospital_whose_trust_store_was_edited_installs_nothing(attacked):
    a = attacked
    for rec in a.records:
        assert "hospital-b" in rec.contributors  # it still contributes: packing needs no trust store
        (failure,) = [f for f in rec.publication.failures if f.institution == "hospital-b"]
        assert "TrustStoreSignatureInvalid" in failure.reason
        assert "hospital-b" not in rec.publication.installed
    assert not a.layout.installed("hospital-b").exists()
    rc, text = status(a.layout.toy)
    assert "not installed by hospital-b: the hospital refused the model: TrustStoreSignatureInvalid" in text


def test_an_edited_trust_store_stops_the_coordinator_before_it_starts_flower(attacked, tmp_path):
    a = attacked
    store = a.layout.toy.trust_store
    genuine = store.read_bytes()
    _enrol_mallory_by_hand(store, tmp_path / "mallory")
    try:
        coordinator = start_coordinator(a.layout)
        assert coordinator.wait(120) == 1
        assert f"fedmerge coordinator: error: {store}" in coordinator.text() and "signature" in coordinator.text()
        assert processes_mentioning(a.layout.state / "superlink") == {}
    finally:
        store.write_bytes(genuine)


def test_an_impostor_coordinators_publication_is_installed_nowhere(attacked, tmp_path):
    """Holding the SuperLink's address and TLS key but not the coordinator's identity, an impostor
    gets only the one unsealed contribution, merges it and publishes round 1 under the coordinator's
    name. Hospitals holding round 2 refuse it as an older round before writing a byte; hospital-b,
    which holds no model (its store restored), receives it all and refuses its signature."""
    from fedmerge.security.keys import PublicIdentity, generate_identity
    from fedmerge.security.trust import TrustStore

    a = attacked
    toy = a.layout.toy
    shutil.copy(toy.trust_store, a.b_store)  # hospital-b gets the genuine store back
    impostor = generate_identity("coordinator", tmp_path / "keys")  # the genuine coordinator's name, another key
    store = TrustStore(path=tmp_path / "keys" / "trust.json", consortium="toy")
    store.add(impostor.public, role="coordinator")
    for name in a.layout.names:
        store.add(PublicIdentity.load(toy.root / "keys" / f"{name}.pub.json"), role="institution")
    store.sign(impostor)
    store.save()
    fed = yaml.safe_load(toy.federation_config.read_text())
    fed.update(coordinator_key=str(tmp_path / "keys" / "coordinator.key"), trust_store=str(store.path), state_dir=str(tmp_path / "state"),
               rounds=1, min_clients=1, require_sealed=False, straggler_grace_s=None)  # fmt: skip
    config = tmp_path / "impostor.yaml"
    config.write_text(yaml.safe_dump(fed))
    run = Daemon(["coordinator", "--config", str(config)], a.root / "impostor.out")
    assert run.wait(900) == 0, run.text()[-4000:]
    (rec,) = RoundLedger(tmp_path / "state", create=False).records()
    assert rec.contributors == ["rogue-unsealed"]
    # Sealed to the pinned coordinator, every other package is unreadable to it (rogue-claim and
    # rogue-plans are refused on their plans before that).
    assert {r.institution: r.error for r in rec.rejections} == {
        **dict.fromkeys(["hospital-a", "hospital-b", "hospital-c", "rogue-signer"], "NotSealedForYou"),
        "rogue-claim": "ClaimMismatch", "rogue-plans": "ProtocolError"}  # fmt: skip
    reasons = {f.institution: f.reason for f in rec.publication.failures}
    assert rec.publication.installed == [] and set(reasons) == set(a.layout.names)
    assert "StalePublication" in reasons["hospital-a"] and "round 2 is installed" in reasons["hospital-a"]
    # Under the pinned coordinator's name, with another key: its signature does not verify.
    assert "SignatureInvalid" in reasons["hospital-b"] and "signed with another key" in reasons["hospital-b"]
    for name in ["hospital-a", "hospital-c"]:
        assert HospitalNodeState(a, name).current() == "round-0002"
    assert HospitalNodeState(a, "hospital-b").current() is None
    rc, text = status(SimpleNamespace(federation_config=config))
    assert rc == 0 and "installed by 0 of 7" in text and "not installed by hospital-b: the hospital refused the model: SignatureInvalid" in text
