"""A real federation on loopback: one SuperLink (TLS, SuperNode authentication, SQLite state) and
three SuperNodes, driven exactly as `fedmerge coordinator` / `fedmerge client` drive them.

One SuperLink and one set of SuperNodes serve every test of this module (Flower processes take
seconds to start here); each test submits its own run with its own coordinator state.
Tests run in file order; the last one kills a node.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml
from fedtest_helpers import assert_same_tensors

from fedmerge.cli import main as fedmerge_main
from fedmerge.federation import flower
from fedmerge.federation.credentials import make_node_key, make_tls
from fedmerge.federation.toy import build_toy_federation
from fedmerge.server.coordinator import Coordinator
from fedmerge.server.ledger import RoundLedger

pytestmark = pytest.mark.slow
NAMES = ["hospital-a", "hospital-b", "hospital-c"]


class Deployment:
    def __init__(self, root: Path, toy_models):
        self.root = root
        self.tls = make_tls(root / "tls", ["127.0.0.1", "localhost"])
        (root / "nodekeys").mkdir(parents=True)
        self.node_keys = {n: make_node_key(root / "nodekeys", n) for n in [*NAMES, "intruder"]}
        # The hospitals' side: identities, trust store, models, client configs (one toy layout).
        self.toy = build_toy_federation(root / "fed", 3, models_from=toy_models)
        self.address = f"127.0.0.1:{flower.free_port()}"
        self.nodes: dict[str, flower.SuperNode] = {}
        self.coordinators: list[Coordinator] = []
        self.superlink: flower.SuperLink | None = None

    def federation_config(self, name: str, **overrides) -> Path:
        """A coordinator config of its own (state dir per test) for the shared SuperLink."""
        fed = yaml.safe_load(self.toy.federation_config.read_text())
        fed.update(
            state_dir=str(self.root / name / "coordinator"),
            part_bytes=384 * 1024,
            wait_for_clients_s=60.0,
            round_timeout_s=90.0,
            superlink={
                "start": False,
                "address": self.address,
                "ca_cert": str(self.tls.ca_cert),
                "supernode_public_keys": {n: str(self.node_keys[n][1]) for n in NAMES},
            },
        )
        fed.update(overrides)
        path = self.root / name / "federation.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(fed, sort_keys=False))
        return path

    def start(self) -> None:
        # The consortium: a SuperLink with TLS, node authentication and a state database,
        # started by the coordinator code, with the three hospitals' node keys registered.
        first = self.federation_config("setup")
        cfg = yaml.safe_load(first.read_text())
        cfg["superlink"].update(
            start=True,
            server_cert=str(self.tls.server_cert),
            server_key=str(self.tls.server_key),
            database_path=str(self.root / "superlink.db"),
            supernode_public_keys={n: str(self.node_keys[n][1]) for n in NAMES},
        )
        first.write_text(yaml.safe_dump(cfg, sort_keys=False))
        coord = Coordinator(first)
        coord.superlink.in_process_cli = True  # `flwr` commands without a new interpreter each
        # An app the hospitals did not pin: the same app plus one file, so its hash differs. The
        # coordinator is told to allow it (as a compromised or careless coordinator would) so
        # that it reaches the hospitals' nodes, which must refuse it themselves.
        self.unpinned_app = flower.write_app_dir(self.root / "unpinned-app")
        (self.unpinned_app / "README.md").write_text("not what the hospitals pinned\n")
        coord.superlink.extra_pins = [flower.app_hash(self.unpinned_app)]
        coord.start()
        self.coordinators.append(coord)
        self.superlink = coord.superlink
        pins = [flower.app_hash()]
        for name in NAMES:
            self.nodes[name] = flower.SuperNode(
                self.root / "nodes" / name, self.address, str(self.tls.ca_cert), str(self.node_keys[name][0]),
                str(self.toy.client_configs[name]), flower.free_port(), pins,
            ).start()  # fmt: skip

    def run(self, config: Path, timeout: float = 200.0) -> list[dict]:
        coord = Coordinator(config)
        coord.superlink = self.superlink  # the shared one, already running
        coord.submit()
        records = coord.wait(timeout=timeout, poll_s=1.0)
        # Flower reports the run finished once the ServerApp returns.
        deadline = time.monotonic() + 30
        while not coord.run_finished() and time.monotonic() < deadline:
            time.sleep(1.0)
        assert self.superlink.run_status(coord.run_id) == "finished:completed"
        return records

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        for c in self.coordinators:
            c.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, toy_models):
    d = Deployment(tmp_path_factory.mktemp("flower"), toy_models)
    try:
        d.start()
        yield d
    finally:
        d.stop()


def _offline_fedmerge_merge(d: Deployment, names: list[str], out: Path) -> Path:
    """`fedmerge merge` on the same inputs: the hospitals' fine-tunes against the base."""
    cfg = {
        "method": "task_arithmetic",
        "base": str(d.toy.base),
        "models": [{"path": str(d.toy.finetunes[n])} for n in names],
        "dtype": "float32",
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert fedmerge_main(["merge", str(path), str(out), "--no-progress"]) == 0
    return out


def test_two_rounds_over_tls_with_node_auth_install_the_offline_merge(deployment, tmp_path):
    d = deployment
    records = d.run(d.federation_config("two-rounds", rounds=2))
    assert [(r.round, r.status) for r in records] == [(1, "completed"), (2, "completed")]
    offline = _offline_fedmerge_merge(d, NAMES, tmp_path / "offline")
    for rec in records:
        assert rec.contributors == NAMES
        assert rec.drops == [] and rec.rejections == []
        assert rec.publication.installed == NAMES
    for name in NAMES:
        current = Path(d.toy.client_configs[name]).parent / name / "models" / "current"
        assert current.resolve().name == "round-0002"
        assert assert_same_tensors(current, offline) == 21
        assert (current.parent / "round-0001").is_dir()  # the previous model is kept
    # The three nodes connected through TLS with their registered keys, each bound to its institution
    # by the key the SuperLink registered for it.
    assert sorted(records[0].sampled) == NAMES and len(set(records[0].sampled.values())) == 3


def test_unregistered_node_is_refused(deployment):
    d = deployment
    intruder = flower.SuperNode(
        d.root / "nodes" / "intruder", d.address, str(d.tls.ca_cert), str(d.node_keys["intruder"][0]),
        str(d.toy.client_configs["hospital-a"]), flower.free_port(), [flower.app_hash()],
    )  # fmt: skip
    intruder.start()
    try:
        deadline = time.monotonic() + 60
        while intruder.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert intruder.proc.poll() is not None, "an unregistered SuperNode kept running"
        assert intruder.proc.returncode != 0
        log = intruder.log_text()
        assert "SuperNode ID" not in log  # it never got a node id from the SuperLink
        assert "Failed to activate SuperNode" in log
        # The SuperLink refused it because its key is not registered (and only that key's node).
        link_log = d.superlink.log_file.read_text(errors="replace")
        refusals = [line for line in link_log.splitlines() if "No SuperNode found with the given public key" in line]
        assert len(refusals) >= 1
        from cryptography.hazmat.primitives import serialization

        pub = serialization.load_ssh_public_key(d.node_keys["intruder"][1].read_bytes())
        pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        body = "".join(pem.strip().splitlines()[1:-1])
        assert any(body in line.replace("\\n", "") for line in refusals)
    finally:
        intruder.stop()


def test_unpinned_app_bundle_is_refused_before_it_runs(deployment):
    d = deployment
    config = d.federation_config("unpinned", rounds=1, wait_for_clients_s=10.0, round_timeout_s=40.0)
    # Anyone reaching the SuperLink's port can submit an app (Control is unauthenticated).
    app = d.unpinned_app
    assert flower.app_hash(app) != flower.app_hash()
    d.superlink.submit(app, config)
    ledger = RoundLedger(d.root / "unpinned" / "coordinator")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(r.status == "failed" for r in ledger.records()):
        time.sleep(1.0)
    rec = ledger.records()[0]
    assert rec.status == "failed" and rec.contributors == []
    assert len(rec.drops) == 3
    assert all("not pinned" in x.reason for x in rec.drops), rec.drops


def test_client_killed_mid_round_round_completes_on_quorum(deployment, tmp_path):
    d = deployment
    config = d.federation_config("kill", rounds=1, min_clients=2, part_bytes=192 * 1024, straggler_grace_s=5.0, round_timeout_s=90.0)
    # A new federation for the same hospitals: the round 2 an earlier test installed would make
    # this run's round 1 a rollback, which hospitals refuse.
    for name in NAMES:
        shutil.rmtree(Path(d.toy.client_configs[name]).parent / name / "models", ignore_errors=True)
    coord = Coordinator(config)
    coord.superlink = d.superlink
    coord.submit()
    # Kill hospital-b's SuperNode once the coordinator holds some, not all, of its parts.
    spool = d.root / "kill" / "coordinator" / "rounds" / "round-0001" / "incoming"
    deadline = time.monotonic() + 120
    killed = False
    while time.monotonic() < deadline and not killed:
        for journal in spool.glob("node-*.json") if spool.exists() else []:
            data = yaml.safe_load(journal.read_text())
            if data["institution"] == "hospital-b" and 0 < len(data["received"]):
                d.nodes["hospital-b"].kill()
                killed = True
                break
        time.sleep(0.2)
    assert killed, "hospital-b never started sending"
    records = coord.wait(timeout=150, poll_s=1.0)
    rec = records[0]
    assert rec.status == "completed"
    assert rec.contributors == ["hospital-a", "hospital-c"]
    assert [x.institution for x in rec.drops] == ["hospital-b"]
    offline = _offline_fedmerge_merge(d, ["hospital-a", "hospital-c"], tmp_path / "offline")
    current = Path(d.toy.client_configs["hospital-a"]).parent / "hospital-a" / "models" / "current"
    assert_same_tensors(current, offline)


def test_guard_refuses_a_bundle_that_is_not_pinned(monkeypatch, tmp_path):
    """The check the SuperLink's and the SuperNodes' launchers run before installing a bundle."""
    from flwr.cli.build import build_fab_from_disk

    from fedmerge.federation.guard import PINNED_ENV, UnpinnedApp, check_bundle

    own = build_fab_from_disk(flower.write_app_dir(tmp_path / "own"))
    other_dir = flower.write_app_dir(tmp_path / "other")
    (other_dir / "extra.py").write_text("print('hello')\n")
    other = build_fab_from_disk(other_dir)
    monkeypatch.setenv(PINNED_ENV, flower.app_hash())
    assert check_bundle(own) == flower.app_hash()
    with pytest.raises(UnpinnedApp, match="is not pinned"):
        check_bundle(other)
    monkeypatch.setenv(PINNED_ENV, "")
    with pytest.raises(UnpinnedApp, match="pinned: none"):
        check_bundle(own)
