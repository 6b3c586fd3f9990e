"""Who a round is made of: bindings of nodes to institutions, waiting for every hospital, late and
excluded hospitals, drops by institution with reasons that name no hospital path, and a slow
first reply that holds up nobody. In-process grid; `fedmerge status` checked after each."""

from __future__ import annotations

import time

import pytest
from fedtest_helpers import assert_same_tensors, offline_merge
from roundkit import RecordingGrid, client_config_copy, runner, status, status_json

from fedmerge.client.config import load_client_config
from fedmerge.client.node import HospitalNode
from fedmerge.federation.inprocess import LocalGrid
from fedmerge.protocol import FETCH_PART, INSTALL_PART, OPEN_ROUND
from fedmerge.server.errors import RoundFailed
from fedmerge.server.record import EventKind

TA = {"method": "task_arithmetic"}


def _current(tf, name: str) -> str | None:
    cur = tf.root / "clients" / name / "models" / "current"
    return cur.resolve().name if cur.exists() else None


def test_a_node_claiming_another_institution_is_rejected_before_any_transfer(make_federation, tmp_path):
    tf = make_federation(3, rounds=1, min_clients=2)
    # Node 3 is bound to hospital-c but runs with hospital-a's identity and says it is hospital-a:
    # a stolen key, a copied config. Before, its package was taken as hospital-a's.
    rogue = client_config_copy(tf, "hospital-a", "rogue")
    grid = RecordingGrid({1: str(tf.client_configs["hospital-a"]), 2: str(tf.client_configs["hospital-b"]), 3: str(rogue)})
    records = runner(tf, grid, {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}).run()
    rec = records[0]
    assert rec.status == "completed" and rec.contributors == ["hospital-a", "hospital-b"]
    assert [(r.institution, r.node, r.error) for r in rec.rejections] == [("hospital-c", 3, "ClaimMismatch")]
    assert "bound to hospital-c but says it is 'hospital-a'" in rec.rejections[0].reason
    assert grid.count("push", 3, FETCH_PART) == 0  # refused on its open reply, nothing fetched
    assert not any((tf.root / "coordinator" / "rounds" / "round-0001" / "incoming").iterdir())
    # hospital-a's genuine contribution is the one merged, once
    offline = offline_merge(tf.base, [tf.finetunes["hospital-a"], tf.finetunes["hospital-b"]], tmp_path / "off", TA)
    assert_same_tensors(tf.root / "coordinator" / "models" / "round-0001", offline)
    st = status_json(tf)["rounds"][0]["institutions"]
    assert st["hospital-c"]["state"] == "rejected" and "ClaimMismatch" in st["hospital-c"]["detail"]
    assert st["hospital-a"]["state"] == "contributed"
    rc, text = status(tf)
    assert rc == 0 and "hospital-c" in text and "rejected" in text and "ClaimMismatch" in text


def test_a_package_signed_by_another_institution_than_the_nodes_is_rejected(make_federation):
    tf = make_federation(3, rounds=1, min_clients=2)
    # Node 3 says it is hospital-c (as bound) but signs with hospital-a's key.
    rogue = client_config_copy(tf, "hospital-a", "rogue", institution="hospital-c")
    grid = LocalGrid({1: str(tf.client_configs["hospital-a"]), 2: str(tf.client_configs["hospital-b"]), 3: str(rogue)})
    rec = runner(tf, grid, {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}).run()[0]
    assert rec.contributors == ["hospital-a", "hospital-b"]
    assert [(r.institution, r.error) for r in rec.rejections] == [("hospital-c", "SignerNotBound")]
    assert "signed by 'hospital-a'" in rec.rejections[0].reason
    spool = tf.root / "coordinator" / "rounds" / "round-0001"
    assert sorted(p.name for p in (spool / "accepted").iterdir()) == ["hospital-a", "hospital-b"]
    assert not any((spool / "incoming").iterdir()) and not (spool / "unpacking" / "node-3").exists()
    assert status_json(tf)["rounds"][0]["institutions"]["hospital-c"]["state"] == "rejected"


def test_unbound_and_revoked_nodes_are_asked_nothing_and_get_no_model(make_federation):
    from fedmerge.security.keys import load_identity
    from fedmerge.security.trust import TrustStore

    tf = make_federation(4, rounds=1, min_clients=2)
    trust = TrustStore.open_for_editing(tf.trust_store)
    trust.revoke("hospital-c", reason="left the consortium")
    trust.sign(load_identity(tf.coordinator_key))
    trust.save()
    grid = RecordingGrid({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))})
    # node 4 (hospital-d's machine) registered a key bound to no institution
    rec = runner(tf, grid, {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}).run()[0]
    assert rec.status == "completed" and rec.contributors == ["hospital-a", "hospital-b"]
    assert rec.expected == ["hospital-a", "hospital-b"]
    assert {(e.node, e.institution, e.reason) for e in rec.excluded} == {
        (3, "hospital-c", "revoked in the trust store"), (4, None, "its key is bound to no institution")}
    for node in (3, 4):
        assert grid.sent[node] == 0, f"node {node} was sent something"
    assert rec.publication.targets == ["hospital-a", "hospital-b"] and rec.publication.installed == ["hospital-a", "hospital-b"]
    assert _current(tf, "hospital-c") is None and _current(tf, "hospital-d") is None
    assert _current(tf, "hospital-a") == "round-0001"
    st = status_json(tf)["rounds"][0]["institutions"]
    assert st["hospital-c"] == {"state": "excluded", "detail": "revoked in the trust store"}
    rc, text = status(tf)
    assert "node 4" in text and "bound to no institution" in text and "installed by 2 of 2" in text


class JoinsLater(RecordingGrid):
    """Node 3 connects only after the coordinator looked for nodes ``after`` times, or when ``join`` is called."""

    def __init__(self, node_configs, after: int | None):
        super().__init__(node_configs)
        self.after, self.looks = after, 0
        self.alive.discard(3)

    def join(self) -> None:
        self.alive.add(3)

    def get_node_ids(self):
        self.looks += 1
        if self.after is not None and self.looks > self.after:
            self.join()
        return super().get_node_ids()


def test_clients_per_round_null_waits_for_every_bound_institution(make_federation):
    tf = make_federation(3, rounds=1, min_clients=2)  # clients_per_round: null (the default)
    grid = JoinsLater({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}, after=3)
    rec = runner(tf, grid).run()[0]
    # Two hospitals (the quorum) were there at once; the round still waited for the third.
    assert grid.looks > 3
    assert rec.sampled == {"hospital-a": 1, "hospital-b": 2, "hospital-c": 3}
    assert rec.contributors == ["hospital-a", "hospital-b", "hospital-c"] and rec.late == []
    assert all(s["state"] == "contributed" for s in status_json(tf)["rounds"][0]["institutions"].values())


def test_a_late_hospital_is_recorded_and_told_it_did_not_contribute(make_federation, tmp_path):
    from fedmerge.server.config import load_federation_config

    tf = make_federation(3, rounds=1, min_clients=2, federation_overrides={"wait_for_clients_s": 1.0})
    grid = JoinsLater({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}, after=None)

    def joins_during_the_round(event):
        if event.kind == EventKind.ACCEPTED:
            grid.join()

    rec = runner(tf, grid, on_event=joins_during_the_round).run()[0]
    assert load_federation_config(tf.federation_config).wait_for_clients_s == 1.0
    assert rec.contributors == ["hospital-a", "hospital-b"]
    assert [a.institution for a in rec.late] == ["hospital-c"] and "not connected when the round opened" in rec.late[0].reason
    # it was asked for nothing, and sent the model
    assert grid.count("push", 3, OPEN_ROUND) == 0 and grid.count("push", 3, FETCH_PART) == 0
    assert grid.count("push", 3, INSTALL_PART) > 0
    assert rec.publication.installed == ["hospital-a", "hospital-b", "hospital-c"]
    node_c = HospitalNode(load_client_config(tf.client_configs["hospital-c"]))
    assert node_c.outcome(1) == "late" and node_c.installed_round() == 1
    assert HospitalNode(load_client_config(tf.client_configs["hospital-a"])).outcome(1) == "contributed"
    offline = offline_merge(tf.base, [tf.finetunes["hospital-a"], tf.finetunes["hospital-b"]], tmp_path / "off", TA)
    assert_same_tensors(tf.root / "clients" / "hospital-c" / "models" / "current", offline)
    assert status_json(tf)["rounds"][0]["institutions"]["hospital-c"]["state"] == "late"
    rc, text = status(tf)
    assert "hospital-c" in text and "late" in text


def test_drops_are_recorded_by_institution_without_the_hospitals_paths(make_federation):
    tf = make_federation(3, rounds=1, min_clients=2)
    # hospital-b's fine-tune went missing: its open fails with an error naming its own files.
    missing = tf.root / "private" / "secret-ward" / "finetune"
    cfg = tf.client_configs["hospital-b"]
    cfg.write_text(cfg.read_text().replace(str(tf.finetunes["hospital-b"]), str(missing)))

    def raise_with_path(message, context):  # a ClientApp crash the way Flower reports it: the exception text
        if context.node_id == 3 and message.metadata.message_type == FETCH_PART:
            raise RuntimeError(f"disk error reading {tf.root}/clients/hospital-c/rounds/round-0001/package/data-00000.bin")
        from fedmerge.client.app import app

        return app(message=message, context=context)

    grid = LocalGrid({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}, client_app=raise_with_path)
    with pytest.raises(RoundFailed, match="quorum not met: 1 verified"):
        runner(tf, grid).run()
    rec = status_json(tf)["rounds"][0]
    drops = {d["institution"]: d for d in rec["drops"]}
    assert set(drops) == {"hospital-b", "hospital-c"}
    assert drops["hospital-b"]["stage"] == "open" and drops["hospital-c"]["stage"] == "transfer"
    for d in drops.values():
        assert str(tf.root) not in d["reason"] and "secret-ward" not in d["reason"], d["reason"]
        assert "<local path>" in d["reason"]
    assert "refused" in drops["hospital-b"]["reason"]
    assert rec["institutions"]["hospital-b"]["state"] == "dropped"
    rc, text = status(tf)
    assert rc == 0 and str(tf.root / "clients") not in text and "quorum not met" in text


class SlowFirstReply(RecordingGrid):
    """Node 3 takes long to answer open_round: its reply is held until the others are accepted."""

    def __init__(self, node_configs, accepted: list[str]):
        super().__init__(node_configs)
        self.accepted = accepted
        self.give_up_at = time.monotonic() + 60  # a loop that waits for node 3 first would end here

    def pull_messages(self, message_ids):
        out = []
        for mid in message_ids:
            reply = self.replies.get(mid)
            slow = reply is not None and reply.metadata.src_node_id == 3 and reply.metadata.message_type == OPEN_ROUND
            if slow and len(self.accepted) < 2 and time.monotonic() < self.give_up_at:
                continue
            out.extend(super().pull_messages([mid]))
        return out


def test_a_slow_first_reply_does_not_hold_up_the_other_transfers(make_federation):
    tf = make_federation(3, rounds=1, part_bytes=16 * 1024)
    accepted: list[str] = []
    grid = SlowFirstReply({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}, accepted)
    rec = runner(tf, grid, on_event=lambda e: accepted.append(e.institution) if e.kind == EventKind.ACCEPTED else None).run()[0]
    assert rec.contributors == ["hospital-a", "hospital-b", "hospital-c"]
    log = grid.log
    slow_reply = log.index(("reply", 3, OPEN_ROUND))
    for node in (1, 2):
        fetches = [i for i, e in enumerate(log) if e == ("push", node, FETCH_PART)]
        assert len(fetches) > 3 and max(fetches) < slow_reply, f"node {node}'s parts waited for node 3"
    assert accepted[:2] == ["hospital-a", "hospital-b"] and accepted[2] == "hospital-c"
    # and nothing was pushed to install before every contribution was in
    first_install = next(i for i, e in enumerate(log) if e[0] == "push" and e[2] == INSTALL_PART)
    assert first_install > slow_reply
    assert status_json(tf)["rounds"][0]["status"] == "completed"
