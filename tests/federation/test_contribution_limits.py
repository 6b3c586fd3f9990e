"""What the coordinator refuses of a contribution, and what it leaves on disk: part plans checked
against the package limits before a byte is written, nothing left of stalled or rejected nodes,
unsealed packages refused when sealing is required. In-process grid; `status` after each."""

from __future__ import annotations

import json
import re

import pytest
from roundkit import RecordingGrid, edit_yaml, runner, status, status_json

from fedmerge.federation.inprocess import LocalGrid
from fedmerge.protocol import FETCH_PART, OPEN_ROUND, FileEntry, PartPlan, PlanLimits, PlanRefused, Segment, plan_folder, scrub_paths
from fedmerge.server.errors import RoundFailed


def _forging(node_id: int, forge):
    """A ClientApp that runs the real one, then rewrites node ``node_id``'s open reply meta with ``forge``."""
    from flwr.app import ConfigRecord

    from fedmerge.client.app import app
    from fedmerge.protocol import META

    def client_app(message, context):
        reply = app(message=message, context=context)
        if context.node_id == node_id and message.metadata.message_type == OPEN_ROUND:
            meta = dict(reply.content.config_records[META])
            forge(meta)
            reply.content.config_records[META] = ConfigRecord(meta)
        return reply

    return client_app


def _spool(tf):
    return tf.root / "coordinator" / "rounds" / "round-0001"


def _files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_plan_naming_a_path_outside_the_package_is_refused_before_any_write(make_federation):
    tf = make_federation(3, rounds=1, min_clients=2)

    def escape(meta):
        plan = json.loads(meta["plan"])
        plan["files"][0]["path"] = "../x"
        plan["parts"][0][0][0] = "../x"
        meta["plan"] = json.dumps(plan)

    grid = RecordingGrid({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}, client_app=_forging(3, escape))
    rec = runner(tf, grid).run()[0]
    assert rec.contributors == ["hospital-a", "hospital-b"]
    assert [(r.institution, r.error) for r in rec.rejections] == [("hospital-c", "ProtocolError")]
    assert "'../x' is not a plain relative path" in rec.rejections[0].reason
    # the first part rode on the open reply: neither it nor anything else of node 3 was written
    assert not (_spool(tf) / "incoming" / "x").exists() and not (_spool(tf) / "x").exists()
    assert _files_under(_spool(tf) / "incoming") == []
    assert grid.count("push", 3, FETCH_PART) == 0
    assert status_json(tf)["rounds"][0]["institutions"]["hospital-c"]["state"] == "rejected"


def test_a_plan_declaring_more_than_the_package_limit_is_refused_before_any_write(make_federation):
    tf = make_federation(3, rounds=1, min_clients=2)
    tebibyte = 1 << 40

    def huge(meta):  # a well-formed plan of one 1 TiB data file, in one part
        meta["plan"] = PartPlan(files=[FileEntry("data-00000.bin", tebibyte, "0" * 64)], parts=[[Segment("data-00000.bin", 0, tebibyte)]],
                                part_bytes=tebibyte).to_json()  # fmt: skip
        meta.pop("part", None)

    grid = RecordingGrid({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}, client_app=_forging(3, huge))
    rec = runner(tf, grid).run()[0]
    assert rec.contributors == ["hospital-a", "hospital-b"]
    (rej,) = rec.rejections
    assert (rej.institution, rej.error) == ("hospital-c", "PlanRefused")
    # the limit is what an honest package of this base can be: far below a tebibyte, above the real ones
    limit = int(re.search(r"more than the (\d+) allowed", rej.reason).group(1))
    assert max(c.bytes for c in rec.contributions.values()) < limit < tebibyte
    assert _files_under(_spool(tf) / "incoming") == []
    rc, text = status(tf)
    assert "PlanRefused" in text


def test_configured_max_package_bytes_is_what_a_plan_is_held_to(make_federation):
    tf = make_federation(2, rounds=1, federation_overrides={"max_package_bytes": 10_000})
    grid = LocalGrid({1: str(tf.client_configs["hospital-a"]), 2: str(tf.client_configs["hospital-b"])})
    with pytest.raises(RoundFailed, match="quorum not met: 0 verified"):
        runner(tf, grid).run()
    rec = status_json(tf)["rounds"][0]
    assert sorted((r["institution"], r["error"]) for r in rec["rejections"]) == [("hospital-a", "PlanRefused"), ("hospital-b", "PlanRefused")]
    assert all("more than the 10000 allowed" in r["reason"] for r in rec["rejections"])
    assert _files_under(_spool(tf) / "incoming") == []


class Stalls(RecordingGrid):
    """Node 2 answers its first two part requests, then never again (alive, but silent)."""

    def __init__(self, node_configs, spool):
        super().__init__(node_configs)
        self.spool, self.seen_on_disk = spool, []

    def pull_messages(self, message_ids):
        out = []
        for mid in message_ids:
            reply = self.replies.get(mid)
            if reply is not None and reply.metadata.src_node_id == 2 and reply.metadata.message_type == FETCH_PART and self.count("reply", 2, FETCH_PART) >= 2:
                if not self.seen_on_disk:
                    self.seen_on_disk = _files_under(self.spool / "incoming")
                continue
            out.extend(super().pull_messages([mid]))
        return out


def test_a_stalled_nodes_incoming_files_are_deleted(make_federation):
    tf = make_federation(3, rounds=1, min_clients=2, part_bytes=16 * 1024, federation_overrides={"straggler_grace_s": 0.5})
    grid = Stalls({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}, _spool(tf))
    rec = runner(tf, grid).run()[0]
    assert rec.contributors == ["hospital-a", "hospital-c"]
    assert [(d.institution, d.stage) for d in rec.drops] == [("hospital-b", "transfer")] and "timed out" in rec.drops[0].reason
    # while it stalled, its parts were in the spool; once dropped, nothing of it is left
    assert "node-2.json" in grid.seen_on_disk and any(p.startswith("node-2/") for p in grid.seen_on_disk)
    assert _files_under(_spool(tf) / "incoming") == []
    assert rec.bytes_received["hospital-b"] == 3 * 16 * 1024  # the part on the open reply and two fetched
    assert status_json(tf)["rounds"][0]["institutions"]["hospital-b"]["state"] == "dropped"


def test_an_unsealed_contribution_is_refused_when_sealing_is_required(make_federation, tmp_path):
    from fedtest_helpers import assert_same_tensors, offline_merge

    tf = make_federation(3, rounds=1, min_clients=2, seal=True)
    edit_yaml(tf.client_configs["hospital-c"], seal=False)
    rec = runner(tf, LocalGrid({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))})).run()[0]
    assert rec.contributors == ["hospital-a", "hospital-b"]
    assert all(c.sealed for c in rec.contributions.values())
    assert [(r.institution, r.error) for r in rec.rejections] == [("hospital-c", "UnsealedPackage")]
    assert _files_under(_spool(tf) / "incoming") == [] and not (_spool(tf) / "unpacking" / "node-3").exists()
    offline = offline_merge(tf.base, [tf.finetunes["hospital-a"], tf.finetunes["hospital-b"]], tmp_path / "off", {"method": "task_arithmetic"})
    assert_same_tensors(tf.root / "clients" / "hospital-c" / "models" / "current", offline)
    rc, text = status(tf)
    assert "UnsealedPackage" in text


def test_require_sealed_is_the_default(make_federation):
    import yaml

    tf = make_federation(2, rounds=1)  # hospitals do not seal; the toy layout writes require_sealed: false
    data = yaml.safe_load(tf.federation_config.read_text())
    assert data.pop("require_sealed") is False
    tf.federation_config.write_text(yaml.safe_dump(data))
    with pytest.raises(RoundFailed, match="quorum not met: 0 verified"):
        runner(tf, LocalGrid({1: str(tf.client_configs["hospital-a"]), 2: str(tf.client_configs["hospital-b"])})).run()
    rec = status_json(tf)["rounds"][0]
    assert sorted((r["institution"], r["error"]) for r in rec["rejections"]) == [("hospital-a", "UnsealedPackage"), ("hospital-b", "UnsealedPackage")]


# -- the limits and the scrubbing, as units --------------------------------------------------------
PACKAGE_NAMES = re.compile(r"manifest\.json|signature\.json|data-\d{5}\.bin")


def test_plan_limits_refuse_names_sizes_part_sizes_and_part_floods(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "manifest.json").write_bytes(b"m" * 100)
    (tmp_path / "pkg" / "data-00000.bin").write_bytes(b"d" * 1000)
    plan = plan_folder(tmp_path / "pkg", 256)
    PlanLimits(PACKAGE_NAMES, max_total_bytes=1100, part_bytes=256).check(plan)
    with pytest.raises(PlanRefused, match="declares 1100 bytes, more than the 1099 allowed"):
        PlanLimits(PACKAGE_NAMES, max_total_bytes=1099, part_bytes=256).check(plan)
    with pytest.raises(PlanRefused, match="parts of 256 bytes, larger than the 128 asked for"):
        PlanLimits(PACKAGE_NAMES, max_total_bytes=1100, part_bytes=128).check(plan)
    (tmp_path / "pkg" / "notes.txt").write_bytes(b"x")
    with pytest.raises(PlanRefused, match="'notes.txt' is not one this folder may hold"):
        PlanLimits(PACKAGE_NAMES, max_total_bytes=2000, part_bytes=256).check(plan_folder(tmp_path / "pkg", 256))
    # 1100 bytes in 1-byte parts would be 1100 messages where 5 of 256 bytes hold them
    flood = PartPlan(plan.files, [[Segment(f.path, i, 1)] for f in plan.files for i in range(f.size)], 256)
    flood.validate()
    with pytest.raises(PlanRefused, match="1100 parts where 5 of 256 bytes"):
        PlanLimits(PACKAGE_NAMES, max_total_bytes=1100, part_bytes=256).check(flood)


def test_scrub_paths_removes_local_paths_and_keeps_the_rest():
    text = "CheckpointError: /srv/hospital/models/ft: no such folder; see ~/keys/a.key, or '/data/x y'."
    assert scrub_paths(text) == "CheckpointError: <local path>: no such folder; see <local path>, or '<local path> y'."
    assert scrub_paths("round 3 of 5, ratio 1/2, sha256:ab/cd") == "round 3 of 5, ratio 1/2, sha256:ab/cd"


def test_a_malformed_reply_drops_its_node_not_the_round(make_federation):
    from flwr.app import Message, RecordDict

    from fedmerge.client.app import app

    tf = make_federation(3, rounds=1, min_clients=2)

    def garbles_its_parts(message, context):
        if context.node_id == 3 and message.metadata.message_type == FETCH_PART:
            return Message(RecordDict(), reply_to=message)  # no fedmerge record at all
        return app(message=message, context=context)

    grid = RecordingGrid({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}, client_app=garbles_its_parts)
    rec = runner(tf, grid).run()[0]
    assert rec.status == "completed" and rec.contributors == ["hospital-a", "hospital-b"]
    assert [(d.institution, d.stage) for d in rec.drops] == [("hospital-c", "transfer")]
    assert rec.drops[0].reason.startswith("malformed reply (ProtocolError: message carries no fedmerge record")
    assert _files_under(_spool(tf) / "incoming") == []


def test_a_part_longer_than_its_plan_says_rejects_its_node_not_the_round(make_federation):
    """A node whose part carries more bytes than its own plan (with a digest that matches them):
    before, writing the part raised out of the round loop and ended every round."""
    from fedmerge.client.app import app
    from fedmerge.protocol import make_content, part_digest, read_meta, read_payload

    tf = make_federation(3, rounds=1, min_clients=2, part_bytes=16 * 1024)

    def overlong_parts(message, context):
        reply = app(message=message, context=context)
        if context.node_id == 3 and message.metadata.message_type == FETCH_PART:
            from flwr.app import Message

            meta, data = dict(read_meta(reply.content)), bytes(read_payload(reply.content)) + b"\0" * 4096
            meta["sha256"] = part_digest(data)
            return Message(make_content(meta, data), reply_to=message)
        return reply

    grid = RecordingGrid({i + 1: str(tf.client_configs[n]) for i, n in enumerate(sorted(tf.client_configs))}, client_app=overlong_parts)
    rec = runner(tf, grid).run()[0]
    assert rec.status == "completed" and rec.contributors == ["hospital-a", "hospital-b"]
    assert [(r.institution, r.error) for r in rec.rejections] == [("hospital-c", "ProtocolError")]
    assert "carries 20480 bytes, the plan says 16384" in rec.rejections[0].reason
    assert _files_under(_spool(tf) / "incoming") == []
    assert grid.count("push", 3, FETCH_PART) <= 2  # parts_in_flight: nothing was asked of it after the bad part
    assert status_json(tf)["rounds"][0]["institutions"]["hospital-c"]["state"] == "rejected"
