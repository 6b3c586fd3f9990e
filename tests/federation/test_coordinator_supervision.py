"""`fedmerge coordinator` owns its Flower processes: it refuses what it did not start, leaves nothing
behind when stopped or killed, a restart after SIGKILL resumes the rounds, and its gate keeps a
regressed round from the hospitals. `fedmerge status` (text and JSON) is read after each.

Two `fedmerge client` daemons run for the whole module and wait through every coordinator
restart; the coordinator runs as its command, in a process of its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
from deployment_helpers import (
    PUBLIC_HOST,
    kill_leftovers,
    make_layout,
    port_is_free,
    process_tree,
    processes_mentioning,
    start_client,
    start_coordinator,
    survivors,
    train_hook,
    wait_until_gone,
    write_gate_eval,
)
from fedtest_helpers import assert_same_tensors, offline_merge
from roundkit import edit_yaml, status, status_json

from fedmerge.federation import flower
from fedmerge.server.app import pinned_config_env
from fedmerge.server.ledger import RoundLedger

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def layout(tmp_path_factory, toy_models):
    root = tmp_path_factory.mktemp("supervision")
    layout = make_layout(root, toy_models, 2, rounds=1, part_bytes=128 * 1024)
    clients = {name: start_client(layout, name) for name in layout.names}
    try:
        yield layout
        for daemon in clients.values():
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(60) == 128 + signal.SIGTERM
        assert wait_until_gone(root, 30) == {}
    finally:
        for daemon in clients.values():
            daemon.stop()
        kill_leftovers(root)


def _superlink_processes(layout) -> dict[int, str]:
    return processes_mentioning(layout.state / "superlink")


def test_a_port_held_by_another_process_is_refused(layout):
    with socket.socket() as holder:
        holder.bind((PUBLIC_HOST, layout.public_port))
        holder.listen(1)
        coordinator = start_coordinator(layout)
        assert coordinator.wait(120) == 1
    text = coordinator.text()
    assert f"superlink.address: port {layout.public_port} on {PUBLIC_HOST} is already in use, held by pid {os.getpid()}" in text
    assert _superlink_processes(layout) == {}
    assert not (layout.state / "superlink" / "superlink.log").exists()  # no Flower process was started
    assert status(layout.toy) == (0, f"federation toy: 0 of 1 round(s) done (state {layout.state})\nno round started yet\n")


def test_a_superlink_it_did_not_start_is_never_attached_to(layout):
    sl = layout.toy.federation_config
    cfg = flower.SuperLink(
        layout.state / "superlink", layout.public_address, layout.tls.ca_cert, layout.tls.server_cert, layout.tls.server_key,
        layout.state / "superlink.db", serverapp_env=pinned_config_env(sl),
    )  # fmt: skip
    leftover = cfg.start()
    try:
        coordinator = start_coordinator(layout)
        assert coordinator.wait(120) == 1
        text = coordinator.text()
        assert f"a SuperLink (pid {leftover.proc.pid}" in text and "never attaches to a process it did not start" in text
        assert leftover.proc.poll() is None  # left alone, not taken over or stopped
    finally:
        leftover.stop()
    assert wait_until_gone(layout.state / "superlink", 30) == {}


def test_sigkill_mid_round_leaves_no_process_and_a_restart_resumes(layout, tmp_path):
    coordinator = start_coordinator(layout)
    accepted = layout.state / "rounds" / "round-0001" / "accepted"
    deadline = time.monotonic() + 300
    while not (accepted.is_dir() and any(accepted.iterdir())):
        assert coordinator.proc.poll() is None, coordinator.text()[-3000:]
        assert time.monotonic() < deadline, "no contribution was accepted"
        time.sleep(0.1)
    before = {p.name: p.stat().st_ino for p in accepted.iterdir()}
    listening = json.loads((layout.state / "superlink" / "superlink.json").read_text())
    loopback_port = int(listening["loopback"].rsplit(":", 1)[1])
    tree = " ".join(_superlink_processes(layout).values())
    assert "superlink_main" in tree and "flower-superexec" in tree and "guard --serve serverapp" in tree
    below = process_tree(coordinator.pid)
    assert "superlink_main" in " ".join(c for _, c in below.values())

    coordinator.signal(signal.SIGKILL)
    assert coordinator.wait(30) == -signal.SIGKILL
    assert survivors(below, 30) == {}  # every process below the daemon
    assert wait_until_gone(layout.state, 30) == {}  # SuperLink, SuperExec, launcher, ServerApp, wherever they ended up
    assert port_is_free(PUBLIC_HOST, layout.public_port) and port_is_free("127.0.0.1", loopback_port)
    # What the operator sees of the killed round: still open, with what was accepted before the kill.
    (killed,) = status_json(layout.toy)["rounds"]
    assert killed["status"] == "open" and set(before) <= set(killed["contributions"])
    assert {n for n, s in killed["institutions"].items() if s["state"] == "contributed"} == set(killed["contributions"])
    rc, text = status(layout.toy)
    assert rc == 0 and "0 of 1 round(s) done" in text and "round 1: open" in text

    restarted = start_coordinator(layout)
    assert restarted.wait(600) == 0, restarted.text()[-3000:]
    record = RoundLedger(layout.state, create=False).records()[0]
    assert record.status.value == "completed" and record.contributors == layout.names
    # what was accepted before the kill was kept, not asked for again
    assert {name: (accepted / name).stat().st_ino for name in before} == before
    offline = offline_merge(layout.toy.base, [layout.toy.finetunes[n] for n in layout.names], tmp_path / "offline", {"method": "task_arithmetic"})
    for name in layout.names:
        assert layout.installed(name).resolve().name == "round-0001"
        assert_same_tensors(layout.installed(name), offline)
    (done,) = status_json(layout.toy)["rounds"]
    assert done["status"] == "completed" and done["attempts"] == 1 and done["publication"]["installed"] == layout.names
    accepted_events = [e.institution for e in record.events if e.kind.value == "accepted"]
    assert all(accepted_events.count(name) == 1 for name in before)  # accepted before the kill: never again
    rc, text = status(layout.toy)
    assert "1 of 1 round(s) done" in text and f"installed by 2 of 2: {', '.join(layout.names)}" in text


def test_sigterm_stops_the_coordinator_and_frees_its_ports(layout):
    coordinator = start_coordinator(layout, "--keep-running")
    coordinator.wait_for("keeping the SuperLink up", 300)
    listening = json.loads((layout.state / "superlink" / "superlink.json").read_text())
    loopback_port = int(listening["loopback"].rsplit(":", 1)[1])
    below = process_tree(coordinator.pid)
    assert "superlink_main" in " ".join(c for _, c in below.values())
    coordinator.signal(signal.SIGTERM)
    assert coordinator.wait(60) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM; the SuperLink and its ServerApp are stopped" in coordinator.text()
    assert survivors(below, 30) == {}
    assert wait_until_gone(layout.state, 30) == {}
    assert port_is_free(PUBLIC_HOST, layout.public_port) and port_is_free("127.0.0.1", loopback_port)
    assert [(r["round"], r["status"]) for r in status_json(layout.toy)["rounds"]] == [(1, "completed")]  # nothing was redone


def test_the_gate_keeps_a_regressed_round_from_every_hospital(layout, tmp_path):
    """Round 2: hospital-a sends a scaled-up update (norm weights x 1e30: finite, so it is signed,
    sealed or not, and verified like any other). The evaluator scores the merged model 0 where the
    base scores 1; the gate refuses it: neither signed nor pushed, round 1 stays current everywhere."""
    from fedmerge.eval.store import ResultsStore
    from fedmerge.security.model_sign import PUBLICATION_NAME

    eval_config = write_gate_eval(tmp_path / "eval")
    layout.set_federation(rounds=2, evaluator={"config_path": str(eval_config), "gate_compare_to": "base", "gate_metric": "acc"})
    edit_yaml(layout.client_config("hospital-a"), train_hook=train_hook("poison", "2"))
    coordinator = start_coordinator(layout)
    assert coordinator.wait(900) == 0, coordinator.text()[-4000:]
    assert "all 2 round(s) done: 1 published, 1 refused by the gate" in coordinator.text()
    r2 = RoundLedger(layout.state, create=False).records()[1]
    assert r2.status.value == "refused" and r2.contributors == layout.names
    assert r2.evaluation.scores == {"one_word": {"acc": 0.0, "acc_norm": 0.0}}
    assert (r2.gate.publish, r2.gate.reference_kind, r2.gate.score, r2.gate.reference) == (False, "base", 0.0, 1.0)
    model = layout.state / "models" / "round-0002"
    assert model.is_dir() and not (model / PUBLICATION_NAME).exists() and r2.publication is None  # merged, never signed
    for name in layout.names:  # never pushed: every hospital still holds round 1
        assert layout.installed(name).resolve().name == "round-0001"
        assert not (layout.installed(name).parent / "round-0002").exists()
    (decision,) = [d for d in ResultsStore(tmp_path / "eval" / "results.db").gate_decisions() if d.round == 2]
    assert decision.published is False
    st = status_json(layout.toy)["rounds"][1]
    assert st["status"] == "refused" and st["gate"]["publish"] is False and st["publication"] is None
    rc, text = status(layout.toy)
    assert "round 2: refused" in text and "gate          REFUSED: " in text
    assert "publication   none: the gate refused the model; the previous one stays current" in text
