"""The round loop as a whole: the strategy checked when the config loads, restarts after faults
injected through on_event, the typed record on disk, `fedmerge status --watch`, the node
directory that reads SuperNode keys from the Grid, and `fedmerge simulate --overwrite`."""

from __future__ import annotations

import json

import pytest
import yaml
from fedtest_helpers import assert_same_tensors, offline_merge
from roundkit import RecordingGrid, edit_yaml, runner, status, status_json

from fedmerge.configfile import ConfigError
from fedmerge.protocol import FETCH_PART, OPEN_ROUND
from fedmerge.server.config import load_federation_config
from fedmerge.server.errors import NodeDirectoryError, RecordFormatError
from fedmerge.server.record import EventKind


# -- the config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy, message",
    [
        ({"method": "tiez"}, "strategy.method: unknown merge method 'tiez'; valid methods:"),
        ({"method": "ties", "parameters": {"densty": 0.5}}, "strategy: ties parameters: parameters.densty: Extra inputs are not permitted"),
        ({"method": "ties", "parameters": {"density": 1.5}}, "strategy: ties model #0: models[0].parameters.density: Input should be less than or equal to 1"),
        ({"method": "ties", "paramters": {"density": 0.5}}, "strategy: paramters: Extra inputs are not permitted"),
    ],
)
def test_a_wrong_strategy_fails_when_the_config_loads(make_federation, strategy, message):
    tf = make_federation(2)
    edit_yaml(tf.federation_config, strategy=strategy)
    with pytest.raises(ConfigError) as err:
        load_federation_config(tf.federation_config)
    assert str(tf.federation_config) in str(err.value) and message in str(err.value)


def test_a_quorum_the_method_cannot_merge_fails_when_the_config_loads(make_federation):
    tf = make_federation(2)
    edit_yaml(tf.federation_config, min_clients=1, strategy={"method": "iso_c"})
    with pytest.raises(ConfigError, match="strategy.method iso_c merges at least 2 contributions; min_clients is 1"):
        load_federation_config(tf.federation_config)
    edit_yaml(tf.federation_config, min_clients=2, clients_per_round=3, strategy={"method": "slerp", "parameters": {"t": 0.5}})
    with pytest.raises(ConfigError, match="slerp merges at most 2 contributions; clients_per_round is 3"):
        load_federation_config(tf.federation_config)


def test_node_keys_must_be_bound_to_institutions(make_federation):
    tf = make_federation(2)
    edit_yaml(tf.federation_config, superlink={"ca_cert": "ca.pem", "server_cert": "s.pem", "server_key": "s.key", "supernode_public_keys": ["a.pub", "b.pub"]})
    with pytest.raises(ConfigError, match="superlink.supernode_public_keys: must map each institution to its node's public key file"):
        load_federation_config(tf.federation_config)
    edit_yaml(tf.federation_config, superlink={"ca_cert": "ca.pem", "server_cert": "s.pem", "server_key": "s.key", "supernode_public_keys": {"hospital-a": "keys/a.pub"}})
    cfg = load_federation_config(tf.federation_config)
    assert cfg.superlink.supernode_public_keys == {"hospital-a": str(tf.federation_config.parent / "keys" / "a.pub")}


# -- restarts ---------------------------------------------------------------------------------------
def test_a_fault_after_an_acceptance_resumes_without_asking_again(make_federation, tmp_path):
    tf = make_federation(3, rounds=1)

    class Fault(Exception):
        pass

    def fail_on_second_acceptance(event):
        if event.kind == EventKind.ACCEPTED and sum(e.kind == EventKind.ACCEPTED for e in events) == 1:
            raise Fault("injected")
        events.append(event)

    events: list = []
    nodes = {i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}
    with pytest.raises(Fault):
        runner(tf, RecordingGrid(nodes), on_event=fail_on_second_acceptance).run()
    first = status_json(tf)["rounds"][0]
    assert first["status"] == "open" and sorted(first["contributions"]) == ["hospital-a", "hospital-b"]
    assert first["institutions"]["hospital-c"]["state"] == "pending"
    grid = RecordingGrid(nodes)
    rec = runner(tf, grid).run()[0]
    assert rec.status == "completed" and rec.contributors == ["hospital-a", "hospital-b", "hospital-c"]
    for node in (1, 2):  # accepted before the fault: neither opened again nor fetched
        assert grid.count("push", node, OPEN_ROUND) == 0 and grid.count("push", node, FETCH_PART) == 0
    assert grid.count("push", 3, OPEN_ROUND) == 1
    # hospital-b's record entry is the one written before the fault, not a second one
    assert rec.contributions["hospital-b"].accepted_at == pytest.approx(first["contributions"]["hospital-b"]["accepted_at"])
    offline = offline_merge(tf.base, [tf.finetunes[n] for n in sorted(tf.client_configs)], tmp_path / "off", {"method": "task_arithmetic"})
    assert_same_tensors(tf.root / "clients" / "hospital-c" / "models" / "current", offline)
    assert "round 1: completed" in status(tf)[1]


def test_a_contribution_recorded_but_not_stored_is_asked_again(make_federation):
    """A crash between writing the record and moving the delta into accepted/: the restart finds
    the record ahead of the spool, forgets that contribution and asks the hospital again."""
    import shutil

    tf = make_federation(2, rounds=1)
    nodes = {1: str(tf.client_configs["hospital-a"]), 2: str(tf.client_configs["hospital-b"])}

    def stop(event):
        if event.kind == EventKind.ACCEPTED:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner(tf, RecordingGrid(nodes), on_event=stop).run()
    spool = tf.root / "coordinator" / "rounds" / "round-0001"
    (inst,) = [p.name for p in (spool / "accepted").iterdir()]
    shutil.rmtree(spool / "accepted" / inst)  # as if the rename never happened
    grid = RecordingGrid(nodes)
    rec = runner(tf, grid).run()[0]
    assert rec.contributors == ["hospital-a", "hospital-b"]
    node = 1 if inst == "hospital-a" else 2
    assert grid.count("push", node, OPEN_ROUND) == 1


def test_records_of_an_earlier_format_are_refused_by_name(make_federation):
    tf = make_federation(2, rounds=1)
    path = tf.root / "coordinator" / "rounds" / "round-0001" / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"round": 1, "status": "completed", "contributors": [], "rejections": [], "dropped": []}))
    with pytest.raises(RecordFormatError, match="round-0001/record.json: a round record from an earlier fedmerge"):
        runner(tf, RecordingGrid({1: str(tf.client_configs["hospital-a"])})).run()
    rc, _ = status(tf)
    assert rc == 1


# -- status --watch -------------------------------------------------------------------------------
def test_status_watch_follows_the_rounds_until_they_are_done(make_federation):
    from fedmerge.server.status import render_text, watch

    tf = make_federation(2, rounds=2)
    nodes = {1: str(tf.client_configs["hospital-a"]), 2: str(tf.client_configs["hospital-b"])}
    loop = runner(tf, RecordingGrid(nodes))
    loop.run_round(1)
    shown: list[str] = []
    rc = watch(load_federation_config(tf.federation_config), shown.append, render_text, interval=0.0, sleep=lambda _: loop.run_round(2))
    assert rc == 0 and len(shown) == 2
    assert shown[0].startswith("federation toy: 1 of 2 round(s) done") and "round 2" not in shown[0]
    assert shown[1].startswith("federation toy: 2 of 2 round(s) done") and "round 2: completed" in shown[1]


def test_status_before_any_round(make_federation):
    tf = make_federation(2)
    rc, text = status(tf)
    assert rc == 0 and "0 of 1 round(s) done" in text and "no round started yet" in text
    assert status_json(tf)["rounds"] == []


# -- the node directory of a real SuperLink -----------------------------------------------------
def test_key_bound_directory_binds_nodes_by_the_key_the_superlink_registered(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.node_pb2 import NodeInfo

    from fedmerge.federation.credentials import make_node_key
    from fedmerge.server.directory import KeyBoundDirectory

    keys = {n: make_node_key(tmp_path, n) for n in ("hospital-a", "hospital-b", "stranger")}

    def registered(name: str) -> bytes:  # what the SuperLink stores: PEM SubjectPublicKeyInfo
        pub = serialization.load_ssh_public_key(keys[name][1].read_bytes())
        return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    class SuperLinkGrid:
        looked = 0

        def get_nodes(self):
            SuperLinkGrid.looked += 1
            return [NodeInfo(node_id=11, public_key=registered("hospital-b")), NodeInfo(node_id=12, public_key=registered("stranger")),
                    NodeInfo(node_id=13, public_key=registered("hospital-a")), NodeInfo(node_id=14)]  # fmt: skip

    d = KeyBoundDirectory.from_files(SuperLinkGrid(), {"hospital-a": keys["hospital-a"][1], "hospital-b": keys["hospital-b"][1]})
    assert d.institutions() == ["hospital-a", "hospital-b"]
    assert [d.institution_of(n) for n in (11, 12, 13, 14)] == ["hospital-b", None, "hospital-a", None]
    assert SuperLinkGrid.looked == 1  # learned once, for every node then connected
    with pytest.raises(NodeDirectoryError, match="hospital-b and hospital-a are bound to the same SuperNode key"):
        KeyBoundDirectory.from_files(SuperLinkGrid(), {"hospital-a": keys["hospital-a"][1], "hospital-b": keys["hospital-a"][1]})
    with pytest.raises(NodeDirectoryError, match="cannot read hospital-a's SuperNode public key"):
        KeyBoundDirectory.from_files(SuperLinkGrid(), {"hospital-a": tmp_path / "missing.pub"})


def test_without_bindings_the_coordinator_does_not_start(make_federation):
    from fedmerge.server.rounds import RoundRunner

    tf = make_federation(2)
    with pytest.raises(NodeDirectoryError, match="list each one's node key under superlink.supernode_public_keys"):
        RoundRunner(RecordingGrid({1: str(tf.client_configs["hospital-a"])}), load_federation_config(tf.federation_config))


# -- simulate --overwrite ---------------------------------------------------------------------------
def test_simulate_reruns_on_its_work_dir_only_with_overwrite(tmp_path, capsys):
    from fedmerge.cli import main

    sim = tmp_path / "simulate.yaml"
    sim.write_text(yaml.safe_dump({"engine": "inprocess", "work_dir": str(tmp_path / "work"), "institutions": 2, "rounds": 1}))
    assert main(["simulate", str(sim), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["rounds"][0]["status"] == "completed" and first["rounds"][0]["record"]["format"] == "fedmerge-round/2"
    assert main(["simulate", str(sim)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["simulate", str(sim), "--overwrite", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["rounds"][0]["record"]["merge"]["fingerprint"] == first["rounds"][0]["record"]["merge"]["fingerprint"]
    assert again["rounds"][0]["record"]["started_at"] > first["rounds"][0]["record"]["finished_at"]
    (tmp_path / "work" / "notes.txt").write_text("mine")
    assert main(["simulate", str(sim), "--overwrite"]) == 1
    assert "holds 'notes.txt'" in capsys.readouterr().err and (tmp_path / "work" / "notes.txt").exists()


def test_status_events_lists_each_decision_in_order(make_federation):
    tf = make_federation(2, rounds=1)
    runner(tf, RecordingGrid({1: str(tf.client_configs["hospital-a"]), 2: str(tf.client_configs["hospital-b"])})).run()
    rc, text = status(tf, "--events")
    kinds = [line.split()[1] for line in text.splitlines() if line.startswith("    ")]
    assert rc == 0 and kinds == ["opened", "accepted", "accepted", "merged", "signed", "installed", "installed", "completed"]
    assert "accepted   hospital-a" in text or "accepted   hospital-b" in text
    assert "events" not in status_json(tf)["rounds"][0]


def test_simulate_on_an_existing_federation_resumes_or_starts_over_with_overwrite(make_federation, tmp_path, capsys):
    from fedmerge.cli import main

    tf = make_federation(2, rounds=1)
    sim = tmp_path / "simulate.yaml"
    sim.write_text(yaml.safe_dump({"engine": "inprocess", "federation_config": str(tf.federation_config),
                                   "client_configs": [str(p) for p in tf.client_configs.values()]}))  # fmt: skip
    assert main(["simulate", str(sim), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["rounds"][0]["record"]
    assert main(["simulate", str(sim), "--json"]) == 0  # resumes: the round is done, nothing runs again
    assert json.loads(capsys.readouterr().out)["rounds"][0]["record"]["started_at"] == first["started_at"]
    assert main(["simulate", str(sim), "--overwrite", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["rounds"][0]["record"]
    assert again["started_at"] > first["finished_at"] and again["merge"]["fingerprint"] == first["merge"]["fingerprint"]
    assert (tf.root / "clients" / "hospital-a" / "models" / "current").resolve().name == "round-0001"
