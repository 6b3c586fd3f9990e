"""The coordinator's round loop and the hospital's handlers, run in one process over LocalGrid.

Same ServerApp logic and same ClientApp as under Flower; faults are injected at the grid.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from fedtest_helpers import assert_same_tensors, offline_merge

from fedmerge.federation.inprocess import LocalGrid, bindings_of, run_simulation
from fedmerge.protocol import FETCH_PART, INSTALL_PART, OPEN_ROUND, plan_folder
from fedmerge.server.directory import MappingDirectory
from fedmerge.server.errors import RoundFailed


def _installed(tf, name):
    return tf.root / "clients" / name / "models" / "current"


def test_two_rounds_install_the_offline_merge(make_federation, tmp_path):
    strategy = {"method": "task_arithmetic", "parameters": {"lambda": 0.7}, "seed": 3}
    tf = make_federation(3, rounds=2, strategy=strategy)
    report = run_simulation(tf.federation_config, list(tf.client_configs.values()))

    assert [r.status for r in report.rounds] == ["completed", "completed"]
    offline = offline_merge(tf.base, [tf.finetunes[n] for n in sorted(tf.client_configs)], tmp_path / "offline", strategy)
    for name in tf.client_configs:
        assert report.installed[name] == [1, 2]
        assert _installed(tf, name).resolve().name == "round-0002"
        assert assert_same_tensors(_installed(tf, name), offline) == 21
        # the previous round is kept beside the current one
        assert (tf.root / "clients" / name / "models" / "round-0001").is_dir()
    rec = report.rounds[0].record
    assert rec.contributors == sorted(tf.client_configs)
    assert rec.strategy["method"] == "task_arithmetic" and rec.strategy["parameters"] == {"lambda": 0.7}
    assert rec.reference.fingerprint.startswith("sha256:")
    assert rec.merge.fingerprint.startswith("sha256:")
    assert set(rec.contributions) == set(tf.client_configs)
    # the report hands out the verified deltas and the base, so any strategy can be re-run offline
    assert report.rounds[0].reference_dir == str(tf.base)
    assert sorted(report.rounds[0].delta_dirs) == sorted(tf.client_configs)
    # every byte a client sent is its package, cut into parts of at most part_bytes
    pkg_bytes = rec.contributions["hospital-a"].bytes
    assert report.bytes_sent["hospital-a"] == 2 * pkg_bytes


def test_client_killed_mid_round_completes_on_quorum(make_federation, tmp_path):
    tf = make_federation(3, rounds=1, min_clients=2)
    fetches = {"n": 0}

    def kill_node_2_mid_transfer(node, msg):
        if node == 2 and msg.metadata.message_type == FETCH_PART:
            fetches["n"] += 1
            return fetches["n"] < 3  # the third part request finds the node gone
        return True

    report = run_simulation(tf.federation_config, list(tf.client_configs.values()), hooks=[kill_node_2_mid_transfer])
    rec = report.rounds[0].record
    assert rec.status == "completed"
    assert rec.contributors == ["hospital-a", "hospital-c"]
    assert [(d.institution, d.node, d.stage) for d in rec.drops] == [("hospital-b", 2, "transfer")]
    assert "disconnected" in rec.drops[0].reason
    offline = offline_merge(tf.base, [tf.finetunes["hospital-a"], tf.finetunes["hospital-c"]], tmp_path / "offline", {"method": "task_arithmetic"})
    assert_same_tensors(_installed(tf, "hospital-a"), offline)
    assert report.installed["hospital-b"] == []


def test_quorum_not_met_fails_the_round_with_its_reason(make_federation):
    tf = make_federation(2, rounds=1, min_clients=2)
    hooks = [lambda node, msg: not (node == 1 and msg.metadata.message_type == OPEN_ROUND)]
    with pytest.raises(RoundFailed, match="quorum not met: 1 verified"):
        run_simulation(tf.federation_config, list(tf.client_configs.values()), hooks=hooks)
    rec = json.loads((tf.root / "coordinator" / "rounds" / "round-0001" / "record.json").read_text())
    assert rec["status"] == "failed" and sorted(rec["contributions"]) == ["hospital-b"]


def test_tampered_contribution_is_rejected_and_the_others_merged(make_federation, tmp_path):
    from fedmerge.client.config import load_client_config
    from fedmerge.client.node import HospitalNode

    tf = make_federation(3, rounds=1, min_clients=2)
    # hospital-c's package is built, then one byte of one tensor is flipped and the part plan
    # recomputed, as a compromised node (or a disk fault before sending) would.
    node = HospitalNode(load_client_config(tf.client_configs["hospital-c"]))
    ref_fp = node.fingerprint(tf.base)
    node.open_round(1, ref_fp, 64 * 1024)
    pkg = node.round_dir(1) / "package"
    data_file = max((p for p in pkg.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(bytes(raw))
    plan_file = node.round_dir(1) / "plan.json"
    cached = json.loads(plan_file.read_text())
    cached["plan"] = plan_folder(pkg, 64 * 1024).to_json()
    plan_file.write_text(json.dumps(cached))

    report = run_simulation(tf.federation_config, list(tf.client_configs.values()))
    rec = report.rounds[0].record
    assert rec.contributors == ["hospital-a", "hospital-b"]
    assert len(rec.rejections) == 1
    rej = rec.rejections[0]
    assert rej.institution == "hospital-c" and rej.error == "DigestMismatch"
    offline = offline_merge(tf.base, [tf.finetunes["hospital-a"], tf.finetunes["hospital-b"]], tmp_path / "offline", {"method": "task_arithmetic"})
    for name in tf.client_configs:  # every node, the rejected one too, installs the merged model
        assert_same_tensors(_installed(tf, name), offline)


def test_coordinator_crash_after_accepting_resumes_without_losing_contributions(make_federation, tmp_path):
    tf = make_federation(3, rounds=1)
    clients = list(tf.client_configs.values())
    # The coordinator process dies (no cleanup, no flush) right after its second acceptance was
    # recorded: the fault is injected through on_event, as any caller could.
    code = (
        "import os\n"
        "from fedmerge.federation.inprocess import run_simulation\n"
        "accepted = []\n"
        "def crash(event):\n"
        "    if event.kind == 'accepted':\n"
        "        accepted.append(event.institution)\n"
        "        if len(accepted) == 2:\n"
        "            os.kill(os.getpid(), 9)\n"
        f"run_simulation({str(tf.federation_config)!r}, {[str(c) for c in clients]!r}, on_event=crash)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    spool = tf.root / "coordinator" / "rounds" / "round-0001"
    accepted = sorted(p.name for p in (spool / "accepted").iterdir())
    assert accepted == ["hospital-a", "hospital-b"]
    assert json.loads((spool / "record.json").read_text())["status"] == "open"

    # Restart: a new coordinator process (new grid, same disk).
    counted: dict[int, list[str]] = {}

    def count(node, msg):
        counted.setdefault(node, []).append(msg.metadata.message_type)
        return True

    report = run_simulation(tf.federation_config, clients, hooks=[count])
    rec = report.rounds[0].record
    assert rec.status == "completed"
    assert rec.contributors == ["hospital-a", "hospital-b", "hospital-c"]
    # nodes 1 and 2 were not asked to open the round again, nor for a part: nothing re-sent
    assert OPEN_ROUND not in counted[1] and OPEN_ROUND not in counted[2]
    assert FETCH_PART not in counted[1] and FETCH_PART not in counted[2]
    assert FETCH_PART in counted[3]
    offline = offline_merge(tf.base, [tf.finetunes[n] for n in sorted(tf.client_configs)], tmp_path / "offline", {"method": "task_arithmetic"})
    assert_same_tensors(_installed(tf, "hospital-c"), offline)


def test_sealed_packages_merge_the_same(make_federation, tmp_path):
    tf = make_federation(2, rounds=1, seal=True)
    run_simulation(tf.federation_config, list(tf.client_configs.values()))
    pkg = tf.root / "clients" / "hospital-a" / "rounds" / "round-0001" / "package"
    manifest_text = "".join(p.read_text(errors="ignore") for p in pkg.glob("*.json"))
    assert "seal" in manifest_text
    offline = offline_merge(tf.base, [tf.finetunes["hospital-a"], tf.finetunes["hospital-b"]], tmp_path / "offline", {"method": "task_arithmetic"})
    assert_same_tensors(_installed(tf, "hospital-b"), offline)


def test_install_refuses_a_model_not_signed_by_the_consortium(make_federation):
    from fedmerge.client.config import load_client_config
    from fedmerge.client.node import HospitalNode
    from fedmerge.errors import FedmergeError
    from fedmerge.protocol import read_part

    tf = make_federation(2, rounds=1)
    run_simulation(tf.federation_config, list(tf.client_configs.values()))
    model = tf.root / "coordinator" / "models" / "round-0001"
    (model / "config.json").write_text((model / "config.json").read_text().replace("}", ', "x": 1}', 1))
    plan = plan_folder(model, 1 << 20)
    node = HospitalNode(load_client_config(tf.client_configs["hospital-a"]))
    for i in range(len(plan.parts)):
        node.install_part(5, plan.to_json(), i, read_part(model, plan, i))
    with pytest.raises(FedmergeError):
        node.install_commit(5, plan.to_json())
    assert not (node.models / "round-0005").exists()
    assert node.current.resolve().name == "round-0001"


def test_local_grid_is_a_flower_grid(make_federation):
    from flwr.serverapp import Grid

    tf = make_federation(2)
    grid = LocalGrid({1: str(tf.client_configs["hospital-a"])})
    assert isinstance(grid, Grid) and list(grid.get_node_ids()) == [1]


def test_train_hook_output_is_what_the_hospital_contributes(make_federation, tmp_path):
    import yaml

    tf = make_federation(2, rounds=1)
    # hospital-a fine-tunes further before the round: its hook writes a new checkpoint.
    hook = [
        sys.executable, "-c",
        "import os; from fedmerge.toymodels import perturb_checkpoint; "
        "perturb_checkpoint(os.environ['FEDMERGE_FINETUNED'], os.environ['FEDMERGE_OUTPUT'], seed=7, scale=0.05)",
    ]  # fmt: skip
    cfg_path = tf.client_configs["hospital-a"]
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["train_hook"] = hook
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_simulation(tf.federation_config, list(tf.client_configs.values()))
    trained = tf.root / "clients" / "hospital-a" / "trained" / "round-0001"
    assert trained.is_dir()
    offline = offline_merge(tf.base, [trained, tf.finetunes["hospital-b"]], tmp_path / "offline", {"method": "task_arithmetic"})
    assert_same_tensors(_installed(tf, "hospital-b"), offline)
    # ...and it differs from merging the untrained fine-tune (the hook's output really was used)
    stale = offline_merge(tf.base, [tf.finetunes["hospital-a"], tf.finetunes["hospital-b"]], tmp_path / "stale", {"method": "task_arithmetic"})
    with pytest.raises(AssertionError):
        assert_same_tensors(_installed(tf, "hospital-b"), stale)


def test_evaluator_failure_is_recorded_and_does_not_lose_the_round(make_federation, tmp_path):
    # publish_if_evaluation_fails: without it the gate refuses a model it could not score (see test_gate.py)
    evaluator = {"config_path": str(tmp_path / "missing-eval.yaml"), "publish_if_evaluation_fails": True}
    tf = make_federation(2, rounds=1, federation_overrides={"evaluator": evaluator})
    report = run_simulation(tf.federation_config, list(tf.client_configs.values()))
    rec = report.rounds[0].record
    assert rec.status == "completed"
    assert "missing-eval.yaml" in rec.evaluation.error
    assert report.installed["hospital-a"] == [1]


def test_a_reply_lost_in_transit_is_asked_again_not_dropped(make_federation, tmp_path):
    """Flower answers MESSAGE_UNAVAILABLE for a reply whose upload to the SuperLink did not
    complete (the SuperNode's push failed while the state database was busy); the part is
    requested again and the node stays in the round."""
    from flwr.app import Error, Metadata
    from flwr.app.message import make_message
    from flwr.common.constant import ErrorCode

    from fedmerge.server.config import load_federation_config
    from fedmerge.server.rounds import RoundRunner

    tf = make_federation(3, rounds=1, min_clients=3)

    class LossyGrid(LocalGrid):
        lost: list[str] = []

        def pull_messages(self, message_ids):
            out = []
            for reply in super().pull_messages(message_ids):
                md = reply.metadata
                if md.src_node_id == 2 and md.message_type == FETCH_PART and len(self.lost) < 2:
                    self.lost.append(md.reply_to_message_id)
                    meta = Metadata(run_id=md.run_id, message_id="", src_node_id=0, dst_node_id=0, reply_to_message_id=md.reply_to_message_id,
                                    group_id="", created_at=md.created_at, ttl=0, message_type="system")  # fmt: skip
                    reply = make_message(metadata=meta, error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="reply objects are unavailable"))
                out.append(reply)
            return out

    clients = list(tf.client_configs.values())
    grid = LossyGrid({i + 1: str(p) for i, p in enumerate(clients)})
    records = RoundRunner(grid, load_federation_config(tf.federation_config), directory=MappingDirectory(bindings_of(clients))).run()
    rec = records[0]
    assert len(LossyGrid.lost) == 2
    assert rec.status == "completed"
    assert rec.contributors == ["hospital-a", "hospital-b", "hospital-c"]
    assert rec.drops == []
    assert grid.sent[2] == grid.sent[1] + 2  # the two lost parts were asked again
    offline = offline_merge(tf.base, [tf.finetunes[n] for n in ["hospital-a", "hospital-b", "hospital-c"]], tmp_path / "offline", {"method": "task_arithmetic"})
    assert_same_tensors(_installed(tf, "hospital-b"), offline)


def test_parts_in_flight_are_capped_across_clients_and_shared_fairly(make_federation, tmp_path):
    """With 4 clients, 2 parts each in flight would be 8; a federation-wide cap of 3 holds the
    SuperLink (and the coordinator) to 3 outstanding parts whatever N, and every client still
    finishes both directions."""
    from fedmerge.server.config import load_federation_config
    from fedmerge.server.rounds import RoundRunner

    strategy = {"method": "task_arithmetic", "parameters": {"lambda": 0.5}}
    tf = make_federation(4, rounds=1, strategy=strategy, part_bytes=16 * 1024, federation_overrides={"parts_in_flight": 2, "parts_in_flight_total": 3})

    class CountingGrid(LocalGrid):
        peak = 0
        parts_pushed: dict[int, int] = {}

        def push_messages(self, messages):
            for msg in messages:
                if msg.metadata.message_type in (FETCH_PART, INSTALL_PART):
                    # replies not yet pulled are the requests still outstanding
                    self.peak = max(self.peak, len(self.replies) + 1)
                    self.parts_pushed[msg.metadata.dst_node_id] = self.parts_pushed.get(msg.metadata.dst_node_id, 0) + 1
            return super().push_messages(messages)

    clients = [tf.client_configs[n] for n in sorted(tf.client_configs)]
    grid = CountingGrid({i + 1: str(p) for i, p in enumerate(clients)})
    records = RoundRunner(grid, load_federation_config(tf.federation_config), directory=MappingDirectory(bindings_of(clients))).run()
    assert records[0].status == "completed" and records[0].contributors == sorted(tf.client_configs)
    assert grid.peak == 3
    # many parts per client each way, so the cap was exercised, and every client got the same share
    assert len(set(grid.parts_pushed.values())) == 1 and min(grid.parts_pushed.values()) > 10
    offline = offline_merge(tf.base, [tf.finetunes[n] for n in sorted(tf.client_configs)], tmp_path / "offline", strategy)
    for name in tf.client_configs:
        assert_same_tensors(_installed(tf, name), offline)
