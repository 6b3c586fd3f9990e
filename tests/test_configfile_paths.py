"""One rule for a path written in a config file: relative to the file's folder, ``~`` expanded,
absolute kept; the same for ``ConfigPath`` fields, merge configs and local task data files."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from fedmerge.configfile import ConfigError, ConfigPath, ConfigPathObj, load_config, resolve_relative


def test_relative_paths_join_the_config_folder_and_absolute_ones_stay(tmp_path):
    assert resolve_relative("data/x.jsonl", tmp_path) == tmp_path / "data" / "x.jsonl"
    assert resolve_relative(Path("../y"), tmp_path / "cfg") == tmp_path / "cfg" / ".." / "y"
    assert resolve_relative("/abs/z", tmp_path) == Path("/abs/z")


def test_home_is_expanded_before_joining(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_relative("~/models/m", tmp_path / "cfg") == tmp_path / "home" / "models" / "m"


class _Paths(BaseModel):
    data: ConfigPath
    model: ConfigPathObj
    absolute: ConfigPath
    empty: ConfigPath = ""


def test_config_path_fields_follow_the_same_rule(tmp_path):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    f = cfg_dir / "c.yaml"
    f.write_text("data: d/train.jsonl\nmodel: ../models/base\nabsolute: /srv/x\n")
    cfg = load_config(f, _Paths, ConfigError)
    root = cfg_dir.resolve()
    assert cfg.data == str(resolve_relative("d/train.jsonl", root)) == str(root / "d" / "train.jsonl")
    assert cfg.model == resolve_relative("../models/base", root) == root / ".." / "models" / "base"
    assert cfg.absolute == "/srv/x" and cfg.empty == ""


def test_a_model_built_in_code_keeps_its_paths():
    assert _Paths(data="d", model=Path("m"), absolute="a").data == "d"


@pytest.mark.parametrize("value", ["rel", "~/x", "/abs"])
def test_merge_config_and_task_files_use_the_rule(tmp_path, value, monkeypatch):
    # The merge config's and the task file's resolvers name the path they looked in: it is the rule's.
    from fedmerge.eval.errors import TaskFileError
    from fedmerge.eval.tasks import _resolve_data_files
    from fedmerge.merging.mergeconfig import MergeConfigError, _resolve
    from fedmerge.merging.mergekit_format import _local_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    want = resolve_relative(value, tmp_path)
    with pytest.raises(MergeConfigError, match=f"looked in {want}"):
        _resolve(value, tmp_path, "base")
    with pytest.raises(MergeConfigError, match=f"looked in {want}"):
        _local_path(value, tmp_path, "base_model")
    with pytest.raises(TaskFileError, match=f"data file {want} not found"):
        _resolve_data_files(value, tmp_path, tmp_path / "task.yaml")
    want.parent.mkdir(parents=True, exist_ok=True)
    if value != "/abs":
        want.write_text("{}\n")
        assert _resolve(value, tmp_path, "base") == want == _local_path(value, tmp_path, "base_model")
        assert _resolve_data_files({"test": [value]}, tmp_path, tmp_path / "task.yaml") == {"test": [str(want.resolve())]}
