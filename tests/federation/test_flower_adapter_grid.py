"""The adapter functions an in-process Grid uses: what they set, and the version check on each."""

from __future__ import annotations

import importlib.metadata

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedmerge import flower_internals
from fedmerge.flower_internals import UnsupportedFlower


def test_task_identity_message_id_and_run_are_what_a_superlink_would_give():
    flower_internals.set_task_identity(7, node_id=0, task_id=0)
    msg = Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=3, message_type="query.x", group_id="g")
    assert (msg.metadata.run_id, msg.metadata.src_node_id, msg.metadata.dst_node_id) == (7, 0, 3)
    flower_internals.set_message_id(msg, "local-42")
    assert msg.metadata.message_id == "local-42"
    reply = Message(RecordDict(), reply_to=msg)
    assert reply.metadata.reply_to_message_id == "local-42" and reply.metadata.dst_node_id == 0
    assert flower_internals.empty_run(7).run_id == 7
    assert set(flower_internals.lost_in_transit_error_codes()) and 0 not in flower_internals.lost_in_transit_error_codes()


@pytest.mark.parametrize("call", [
    lambda: flower_internals.empty_run(1),
    lambda: flower_internals.set_task_identity(1),
    lambda: flower_internals.set_message_id(object(), "m"),
    lambda: flower_internals.lost_in_transit_error_codes(),
])  # fmt: skip
def test_each_refuses_an_untested_flower(call, monkeypatch):
    flower_internals.require_supported.cache_clear()
    try:
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.42.0")
        with pytest.raises(UnsupportedFlower, match=r"flwr 1\.42\.0 is installed, fedmerge supports flwr 1\.41\.x only"):
            call()
    finally:
        monkeypatch.undo()
        flower_internals.require_supported.cache_clear()
    assert flower_internals.require_supported().startswith("1.41.")
