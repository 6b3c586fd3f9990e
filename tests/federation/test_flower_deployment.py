"""A real federation on loopback: `fedmerge client` daemons (Flower SuperNodes) started *before* the
coordinator, and a coordinator whose SuperLink serves the Fleet API on the "public" interface
127.0.0.2 and everything else on 127.0.0.1 only.

One deployment serves every test of this module (Flower processes take seconds to start here);
tests run in file order and the last ones stop hospitals. The coordinator runs in this process
(``CoordinatorDaemon``) with a SuperLink that also runs one probe bundle nobody else pinned, as a
careless coordinator would, so that the hospitals' own refusal can be seen.
"""

from __future__ import annotations

import json
import signal
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from deployment_helpers import (
    PUBLIC_HOST,
    ProbePinningSuperLink,
    flwr_cli,
    kill_leftovers,
    make_layout,
    outsider_flwr_home,
    port_is_free,
    process_tree,
    processes_mentioning,
    start_client,
    survivors,
    train_hook,
    wait_until_gone,
)
from fedtest_helpers import assert_same_tensors
from probe_app import write_probe_app
from roundkit import edit_yaml, status, status_json

from fedmerge.cli import main as fedmerge_main
from fedmerge import flower_internals
from fedmerge.federation import flower
from fedmerge.federation.coordinator_daemon import CoordinatorDaemon
from fedmerge.federation.supervision import free_port
from fedmerge.server.app import PINNED_CONFIG_ENV, PINNED_CONFIG_SHA256_ENV, file_sha256
from fedmerge.server.directory import load_node_key

pytestmark = pytest.mark.slow


class Deployment:
    def __init__(self, root: Path, toy_models):
        self.root = root
        self.layout = make_layout(root, toy_models, 3, extra_keys=("intruder",), rounds=1)
        self.names = self.layout.names
        self.probe = write_probe_app(root / "probe-app")
        ProbePinningSuperLink.extra_pins = [flower.app_hash(self.probe)]
        self.clients = {}
        self.coordinator: CoordinatorDaemon | None = None
        self.records: list = []

    def start(self) -> None:
        # Hospitals first: nothing listens on the public address yet.
        for name in self.names:
            self.clients[name] = start_client(self.layout, name)
        for name in self.names:
            self.clients[name].wait_for("waiting for the SuperLink", 120)
        self.coordinator = CoordinatorDaemon(self.layout.toy.federation_config, superlink_class=ProbePinningSuperLink)
        self.coordinator.start()
        self.coordinator.submit()
        self.records = self.coordinator.wait(timeout=400, poll_s=1.0)
        deadline = time.monotonic() + 120  # Flower marks the run finished once the ServerApp returned
        while not self.coordinator.run_finished() and time.monotonic() < deadline:
            time.sleep(1.0)

    def stop(self) -> None:
        for daemon in self.clients.values():
            daemon.stop()
        if self.coordinator is not None:
            self.coordinator.stop()

    @property
    def superlink(self) -> flower.SuperLink:
        return self.coordinator.superlink


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, toy_models):
    root = tmp_path_factory.mktemp("flower")
    d = Deployment(root, toy_models)
    try:
        d.start()
        yield d
        d.stop()
        # Every Flower process of the coordinator and the hospitals is gone, and the ports are free.
        assert wait_until_gone(root, 30) == {}
        assert port_is_free(PUBLIC_HOST, d.layout.public_port)
        assert port_is_free("127.0.0.1", d.superlink.loopback.port)
    finally:
        d.stop()
        kill_leftovers(root)


def _offline_fedmerge_merge(d: Deployment, names: list[str], out: Path) -> Path:
    """`fedmerge merge` on the same inputs: the hospitals' fine-tunes against the base."""
    toy = d.layout.toy
    cfg = {"method": "task_arithmetic", "base": str(toy.base), "models": [{"path": str(toy.finetunes[n])} for n in names], "dtype": "float32"}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert fedmerge_main(["merge", str(path), str(out), "--no-progress"]) == 0
    return out


def _https_status(url: str, ca_cert: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    req = urllib.request.Request(url, data=b"", method="POST", headers={"content-type": "application/protobuf"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_clients_started_first_wait_then_install_the_offline_merge(deployment, tmp_path):
    d = deployment
    assert [(r.round, r.status.value) for r in d.records] == [(1, "completed")]
    offline = _offline_fedmerge_merge(d, d.names, tmp_path / "offline")
    for rec in d.records:
        assert rec.contributors == d.names
        assert rec.drops == [] and rec.rejections == []
    for name in d.names:
        current = d.layout.installed(name)
        assert current.resolve().name == "round-0001"
        assert assert_same_tensors(current, offline) == 21
        out = d.clients[name].text()
        # each hospital said what it waited for, then that it was in
        assert out.index("waiting for the SuperLink") < out.index("connected to the SuperLink")
    log = (d.layout.state / "superlink" / "superlink.log").read_text(errors="replace")
    assert "Fleet API only on 127.0.0.2" in log
    (st,) = status_json(d.layout.toy)["rounds"]
    assert st["status"] == "completed" and st["expected"] == d.names and st["late"] == []
    assert {n: s["state"] for n, s in st["institutions"].items()} == dict.fromkeys(d.names, "contributed")
    rc, text = status(d.layout.toy)
    assert rc == 0 and "1 of 1 round(s) done" in text and f"installed by 3 of 3: {', '.join(d.names)}" in text


def test_an_outsider_holding_the_ca_can_neither_list_register_stop_nor_run(deployment, tmp_path):
    d = deployment
    ca = d.layout.tls.ca_cert
    home = outsider_flwr_home(tmp_path / "outsider", d.layout.public_address, ca)
    run_id = str(d.coordinator.run_id)
    attacker_config = tmp_path / "attacker.yaml"
    attacker_config.write_text("state_dir: loot\n")
    attacks = {
        "list runs": ["ls", "target"],
        "list nodes": ["supernode", "list", "target"],
        "register a node": ["supernode", "register", str(d.layout.node_keys["intruder"][1]), "target"],
        "stop the run": ["stop", run_id, "target"],
        "run the pinned app with its own config": ["run", str(flower.write_app_dir(tmp_path / "app")), "target", "--run-config", f'federation-config="{attacker_config}"'],
    }
    for what, args in attacks.items():
        code, out = flwr_cli(args, home)
        assert code != 0, f"{what} succeeded from the public address:\n{out}"
        assert f"404 Not Found' for url 'https://{d.layout.public_address}/v1/control/" in out, out  # refused by the listener itself
    # The same requests, raw: every Control and runtime path is 404 on the public listener.
    base = f"https://{d.layout.public_address}"
    for path in ["/v1/control/list-runs", "/v1/control/register-node", "/v1/control/stop-run", "/v1/control/start-run",
                 "/v1/runtime/acquire-task", "/health", "/docs", "/openapi.json", "/v1/fleet/../control/list-runs"]:  # fmt: skip
        assert _https_status(base + path, ca) == 404, path
    assert _https_status(base + "/v1/fleet/get-run", ca) != 404  # the Fleet API is served there
    # Nothing changed: the same three nodes (the intruder's key was not registered), our run finished.
    nodes = flower_internals.list_supernodes(d.superlink.control)
    intruder = load_node_key(d.layout.node_keys["intruder"][1], "intruder")
    assert len(nodes) == 3 and intruder not in {n.public_key for n in nodes}
    assert d.superlink.run_status(d.coordinator.run_id) == "finished:completed"
    assert not (tmp_path / "loot").exists()


def test_the_coordinators_control_calls_go_to_loopback(deployment):
    d = deployment
    flwr_home = d.layout.state / "superlink" / "flwr-home"
    toml = (flwr_home / "config.toml").read_text()
    assert f'address = "127.0.0.1:{d.superlink.loopback.port}"' in toml
    assert d.superlink.loopback.port != d.layout.public_port
    code, out = flwr_cli(["ls", "fedmerge", "--format", "json"], flwr_home)
    assert code == 0, out
    assert str(d.coordinator.run_id) in out
    # The loopback listener is not on the public interface.
    assert _connect_refused(PUBLIC_HOST, d.superlink.loopback.port)


def _connect_refused(host: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_each_contribution_came_through_its_institutions_registered_node(deployment):
    """The round loop's binding (keys read from the ServerApp's Grid) agrees with what the SuperLink
    registered, as its Control API lists it on loopback."""
    d = deployment
    nodes = {n.node_id: n.public_key for n in flower_internals.list_supernodes(d.superlink.control)}
    rec = d.records[0]
    assert sorted(c.node for c in rec.contributions.values()) == sorted(nodes)
    for name in d.names:
        key = load_node_key(d.layout.node_keys[name][1], name)
        (node,) = [nid for nid, k in nodes.items() if k == key]
        assert rec.contributions[name].node == node


def test_an_unregistered_node_is_refused_and_its_daemon_keeps_waiting(deployment):
    d = deployment
    config = yaml.safe_load(d.layout.client_config("hospital-a").read_text())
    config.update(supernode_key=str(d.layout.node_keys["intruder"][0]), runtime_port=free_port(), state_dir=str(d.root / "intruder-state"))
    path = d.root / "intruder.yaml"
    path.write_text(yaml.safe_dump(config))
    intruder = start_client(d.layout, "intruder", path)
    try:
        # Flower's SuperNode gives up (exit 305) and the daemon starts it again, saying why.
        intruder.wait_for("SuperNode stopped with exit code 305 (Failed to initialize the connection to the SuperLink.", 120)
        assert "registered this node's public key" in intruder.text()
        assert "connected to the SuperLink" not in intruder.text()
        log = (d.layout.state / "superlink" / "superlink.log").read_text(errors="replace")
        refusals = [line for line in log.splitlines() if "No SuperNode found with the given public key" in line]
        from cryptography.hazmat.primitives import serialization

        pub = serialization.load_ssh_public_key(d.layout.node_keys["intruder"][1].read_bytes())
        pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        body = "".join(pem.strip().splitlines()[1:-1])
        assert any(body in line.replace("\\n", "") for line in refusals)
    finally:
        intruder.signal(signal.SIGTERM)
        assert intruder.wait(60) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in intruder.text()
    assert wait_until_gone(d.root / "intruder-state", 30) == {}


def test_a_run_naming_another_federation_config_is_refused(deployment, tmp_path):
    """Defence in depth: even through Control (here on loopback), the ServerApp runs only the
    coordinator's own config, pinned by path and SHA-256 in its environment."""
    d = deployment
    other = tmp_path / "other.yaml"
    other.write_text(d.layout.toy.federation_config.read_text().replace(str(d.layout.state), str(tmp_path / "other-state")))
    app = flower.write_app_dir(tmp_path / "app")
    run_id = d.superlink.submit(app, other)
    deadline = time.monotonic() + 180
    while not d.superlink.run_status(run_id).startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
    assert d.superlink.run_status(run_id) == "finished:failed"
    assert not (tmp_path / "other-state").exists()
    log = (d.layout.state / "superlink" / "superlink.log").read_text(errors="replace")
    assert f"names federation config {other}" in log and "UnpinnedFederationConfig" in log
    # The pin travels in the environment of the processes the coordinator started, not in the run.
    env = Path(f"/proc/{d.superlink.launcher.pid}/environ").read_bytes().split(b"\0")
    assert f"{PINNED_CONFIG_ENV}={d.layout.toy.federation_config.resolve()}".encode() in env
    assert f"{PINNED_CONFIG_SHA256_ENV}={file_sha256(d.layout.toy.federation_config)}".encode() in env


def test_an_unpinned_app_bundle_is_refused_by_every_hospital(deployment, tmp_path):
    d = deployment
    out = tmp_path / "probe.json"
    run_id = flower_internals.start_run(d.superlink.control, d.probe, {"out": str(out)})
    deadline = time.monotonic() + 180
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(1.0)
    result = json.loads(out.read_text())
    assert len(result["nodes"]) == 3 and len(result["replies"]) == 3
    assert all(r["error"] and "not pinned" in r["error"] for r in result["replies"]), result
    deadline = time.monotonic() + 120
    while not d.superlink.run_status(run_id).startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
    assert d.superlink.run_status(run_id) == "finished:completed"  # the probe itself ran, at the coordinator only


def test_a_second_hospital_on_the_same_runtime_port_is_refused_before_flower_starts(deployment):
    d = deployment
    config = yaml.safe_load(d.layout.client_config("hospital-b").read_text())
    config.update(runtime_port=d.layout.runtime_ports["hospital-a"], state_dir=str(d.root / "clash-state"))
    path = d.root / "clash.yaml"
    path.write_text(yaml.safe_dump(config))
    clash = start_client(d.layout, "clash", path)
    assert clash.wait(60) == 1
    text = clash.text()
    assert f"runtime_port: port {d.layout.runtime_ports['hospital-a']} on 127.0.0.1 is already in use, held by pid" in text
    assert not (d.root / "clash-state" / "supernode" / "supernode.log").exists()  # no Flower process was started


def test_a_client_daemon_killed_mid_round_is_dropped_and_the_round_completes_on_quorum(deployment, tmp_path):
    """The coordinator restarts with a second round (a changed config needs a restart: it is pinned);
    hospital-b's daemon is SIGKILLed once it is sending its parts."""
    d = deployment
    d.coordinator.stop()
    config = d.layout.set_federation(rounds=2, min_clients=2, straggler_grace_s=5.0, part_bytes=128 * 1024)
    d.coordinator = CoordinatorDaemon(config, superlink_class=ProbePinningSuperLink)
    victim = d.layout.root / "fed" / "clients" / "hospital-b"
    log = victim / "supernode" / "supernode.log"
    offset = log.stat().st_size
    d.coordinator.start()
    d.coordinator.submit()
    deadline = time.monotonic() + 300
    while log.read_bytes()[offset:].count(b"Receiving: query.") < 2:  # the round's open request, then a part request
        assert time.monotonic() < deadline, "hospital-b was never asked for a part"
        time.sleep(0.1)
    tree = process_tree(d.clients["hospital-b"].pid)
    assert "flower-supernode" in " ".join(c for _, c in tree.values()) and "guard --serve clientapp" in " ".join(c for _, c in tree.values())
    d.clients["hospital-b"].signal(signal.SIGKILL)
    assert d.clients["hospital-b"].wait(30) == -signal.SIGKILL
    assert survivors(tree, 30) == {}  # every process below the daemon: SuperNode, SuperExec, launcher, ClientApps
    assert wait_until_gone(victim, 30) == {}  # and none that left its tree
    assert port_is_free("127.0.0.1", d.layout.runtime_ports["hospital-b"])

    rec = d.coordinator.wait(timeout=400, poll_s=1.0)[1]
    assert rec.status.value == "completed"
    assert rec.contributors == ["hospital-a", "hospital-c"]
    assert [x.institution for x in rec.drops] == ["hospital-b"]
    offline = _offline_fedmerge_merge(d, ["hospital-a", "hospital-c"], tmp_path / "offline")
    current = d.layout.installed("hospital-a")
    assert current.resolve().name == "round-0002"
    assert_same_tensors(current, offline)
    assert (current.parent / "round-0001").is_dir()  # the previous model is kept
    st = status_json(d.layout.toy)["rounds"][1]
    assert st["institutions"]["hospital-b"]["state"] == "dropped" and st["drops"][0]["stage"] in ("open", "transfer")
    rc, text = status(d.layout.toy)
    assert rc == 0 and "2 of 2 round(s) done" in text and "hospital-b" in text and "dropped" in text


def test_a_hospital_15_s_late_is_recorded_late_and_told_it_did_not_contribute(deployment, tmp_path):
    """hospital-b (killed in the test before) is back; hospital-c stops. Round 3 waits 5 s for every
    bound hospital, then opens without hospital-c, whose daemon starts again 15 s after the round
    opened. hospital-a's train_hook holds its package until hospital-c is in, so the round is still
    on when it arrives: it is asked for nothing and sent the model."""
    from fedmerge.client.config import load_client_config
    from fedmerge.client.node import HospitalNode
    from fedmerge.server.record import EventKind

    d = deployment
    d.clients["hospital-b"] = start_client(d.layout, "hospital-b")
    d.clients["hospital-b"].wait_for("connected to the SuperLink", 300)
    # A SuperNode that stops cleanly tells the SuperLink it is gone (one killed counts as connected
    # until its heartbeats are missed, and is then dropped from the round it was asked into).
    d.clients["hospital-c"].signal(signal.SIGTERM)
    assert d.clients["hospital-c"].wait(60) == 128 + signal.SIGTERM
    d.coordinator.stop()
    flag = tmp_path / "hospital-c-connected"
    edit_yaml(d.layout.client_config("hospital-a"), train_hook=train_hook("wait", str(flag)))
    config = d.layout.set_federation(rounds=3, wait_for_clients_s=5.0)
    d.coordinator = CoordinatorDaemon(config, superlink_class=ProbePinningSuperLink)
    d.coordinator.start()
    # hospital-a and hospital-b reconnect to the new SuperLink on their own back-off: only once both
    # are online may the round open (it waits 5 s for the bound hospitals still missing).
    deadline = time.monotonic() + 300
    while sum(n.status == "online" for n in flower_internals.list_supernodes(d.coordinator.superlink.control)) < 2:
        assert time.monotonic() < deadline, "hospital-a and hospital-b did not reconnect to the restarted coordinator"
        time.sleep(0.5)
    d.coordinator.submit()
    deadline = time.monotonic() + 300
    while not any(e.kind == EventKind.OPENED for e in (d.coordinator.ledger.load(3).events if d.coordinator.ledger.load(3) else [])):
        assert time.monotonic() < deadline, "round 3 never opened"
        time.sleep(0.5)
    opened = time.monotonic()
    time.sleep(15)
    late = d.clients["hospital-c"] = start_client(d.layout, "hospital-c")
    late.wait_for("connected to the SuperLink", 300)
    flag.touch()
    try:
        rec = d.coordinator.wait(timeout=400, poll_s=1.0)[2]
    finally:
        edit_yaml(d.layout.client_config("hospital-a"), train_hook=None)
    assert time.monotonic() - opened > 15
    assert rec.status.value == "completed" and rec.contributors == ["hospital-a", "hospital-b"]  # not silently short:
    assert rec.expected == d.names and [x.institution for x in rec.late] == ["hospital-c"]  # expected, and recorded late
    assert "not connected when the round opened (waited up to 5 s)" in rec.late[0].reason
    assert rec.publication.installed == d.names  # it was sent the model all the same...
    c = HospitalNode(load_client_config(d.layout.client_config("hospital-c")))
    assert c.outcome(3) == "late" and c.installed_round() == 3  # ...and told it did not contribute
    assert "round 3's model installed, but this hospital did not contribute to it (late)" in (c.state / "supernode" / "supernode.log").read_text(errors="replace")
    st = status_json(d.layout.toy)["rounds"][2]
    assert st["institutions"]["hospital-c"]["state"] == "late" and st["late"][0]["institution"] == "hospital-c"
    rc, text = status(d.layout.toy)
    assert rc == 0 and "3 of 3 round(s) done" in text
    assert any(line.split()[:2] == ["hospital-c", "late"] for line in text.splitlines()), text


def test_stopping_a_client_daemon_leaves_no_flower_process(deployment):
    d = deployment
    daemon = d.clients["hospital-c"]
    state = d.layout.root / "fed" / "clients" / "hospital-c"
    kinds = " ".join(processes_mentioning(state).values())
    assert "flower-supernode" in kinds and "guard --serve clientapp" in kinds and "flower-superexec" in kinds
    tree = process_tree(daemon.pid)
    assert len(tree) >= 3
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 128 + signal.SIGTERM
    assert survivors(tree, 30) == {}
    assert wait_until_gone(state, 30) == {}
    assert port_is_free("127.0.0.1", d.layout.runtime_ports["hospital-c"])
    assert f"stopped by SIGTERM; the SuperNode and its ClientApps are stopped (log: {state / 'supernode' / 'supernode.log'})" in daemon.text()
