"""Files written whole or not at all, with the mode asked for from the first byte."""

from __future__ import annotations

import json
import stat

import pytest

from fedmerge.checkpoints.atomic import write_bytes_atomic, write_json_atomic, write_private_atomic


def test_private_file_is_0600_and_replaces_atomically(tmp_path):
    p = tmp_path / "keys" / "node.key"
    write_private_atomic(p, "first")
    write_private_atomic(p, b"second")
    assert p.read_bytes() == b"second"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert [x.name for x in p.parent.iterdir()] == ["node.key"]  # no temporary left behind


def test_public_file_mode_and_json(tmp_path):
    p = write_json_atomic(tmp_path / "r.json", {"b": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "r.json"
    write_json_atomic(p, {"v": 1})

    with pytest.raises(TypeError):
        write_bytes_atomic(p, object())  # type: ignore[arg-type]
    assert json.loads(p.read_text()) == {"v": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]
