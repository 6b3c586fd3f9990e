"""Reading and writing HF folders: round trips, atomicity, and errors that name the file or tensor."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmerge.checkpoints import (
    INDEX_NAME,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    MissingTensor,
    PickledWeightsRefused,
    model_fingerprint,
    safetensors_dtype,
)

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.weight": torch.linspace(-1, 1, 10).to(torch.bfloat16),
    "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "d.scalar": torch.tensor(3.5),
}


def _write(folder, planned: bool, shard_bytes: int = 60, order=None):
    with CheckpointWriter(folder, max_shard_bytes=shard_bytes) as w:
        if planned:
            w.plan([(n, t.shape, safetensors_dtype(t.dtype)) for n, t in TENSORS.items()])
        for n in order or TENSORS:
            w.add(n, TENSORS[n])
        w.commit(metadata={"why": "test"})
    return folder


@pytest.mark.parametrize("planned", [False, True])
def test_sharded_round_trip(tmp_path, planned):
    out = _write(tmp_path / "m", planned, order=["b.weight", "a.weight", "d.scalar", "c.ids"])
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"]) == set(TENSORS)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    r = CheckpointReader(out)
    for n, t in TENSORS.items():
        assert r.get(n).dtype == t.dtype and torch.equal(r.get(n), t)
    # every shard is a valid safetensors file for the reference implementation too
    loaded = {}
    for s in shards:
        loaded.update(load_file(str(out / s)))
    assert set(loaded) == set(TENSORS) and all(torch.equal(loaded[n], TENSORS[n]) for n in TENSORS)
    assert json.loads((out / "fedmerge.json").read_text()) == {"why": "test"}
    assert not list(tmp_path.glob(".m.partial-*"))


def test_single_file_and_fingerprint_independent_of_sharding(tmp_path):
    one = _write(tmp_path / "one", planned=True, shard_bytes=10**9)
    many = _write(tmp_path / "many", planned=False, shard_bytes=60)
    assert sorted(p.name for p in one.iterdir()) == ["fedmerge.json", "model.safetensors"]
    assert model_fingerprint(CheckpointReader(one)) == model_fingerprint(CheckpointReader(many))
    other = tmp_path / "other"
    with CheckpointWriter(other) as w:
        for n, t in TENSORS.items():
            w.add(n, t + 1 if n == "a.weight" else t)
        w.commit()
    assert model_fingerprint(CheckpointReader(other)) != model_fingerprint(CheckpointReader(one))


def test_row_ranges(tmp_path):
    r = CheckpointReader(_write(tmp_path / "m", planned=True))
    assert torch.equal(r.get("a.weight", rows=(1, 3)), TENSORS["a.weight"][1:3])
    assert r.get("a.weight", rows=(2, 2)).shape == (0, 4)
    with pytest.raises(CheckpointError, match="out of range"):
        r.get("a.weight", rows=(2, 5))


def test_writer_is_atomic_on_failure(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, max_shard_bytes=40) as w:
            w.add("a.weight", TENSORS["a.weight"])
            w.add("b.weight", TENSORS["b.weight"])
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = _write(tmp_path / "m", planned=True)
    with pytest.raises(CheckpointError, match="already exists"):
        CheckpointWriter(out)
    with CheckpointWriter(out, overwrite=True) as w:
        w.add("x", torch.ones(2))
        w.commit()
    assert CheckpointReader(out).names() == ["x"]


def test_planned_writer_checks_shape_dtype_and_completeness(tmp_path):
    with pytest.raises(CheckpointError, match="'a.weight' is \\[3, 4\\] F32, planned \\[4, 3\\] F32"):
        with CheckpointWriter(tmp_path / "m") as w:
            w.plan([("a.weight", (4, 3), "F32")])
            w.add("a.weight", TENSORS["a.weight"])
    with pytest.raises(CheckpointError, match="'b' was never written"):
        with CheckpointWriter(tmp_path / "m2") as w:
            w.plan([("a", (2,), "F32"), ("b", (2,), "F32")])
            w.add("a", torch.ones(2))
            w.commit()
    assert not (tmp_path / "m").exists() and not (tmp_path / "m2").exists()


def test_pickled_weights_refused_with_conversion_hint(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(PickledWeightsRefused, match="pytorch_model.bin.*never unpickles.*safe_serialization=True"):
        CheckpointReader(tmp_path)
    with pytest.raises(PickledWeightsRefused):
        CheckpointReader(tmp_path / "pytorch_model.bin")


def _sharded(tmp_path):
    return _write(tmp_path / "m", planned=True, shard_bytes=60)


def test_missing_shard_is_named(tmp_path):
    m = _sharded(tmp_path)
    victim = sorted(m.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{INDEX_NAME}: names shard {victim.name}, which is missing"):
        CheckpointReader(m)


def test_corrupt_header_is_named(tmp_path):
    m = _sharded(tmp_path)
    victim = sorted(m.glob("model-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[0:8] = struct.pack("<Q", 10**12)
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim.name}: corrupt safetensors header"):
        CheckpointReader(m)
    data[0:8] = struct.pack("<Q", 16)
    data[8:24] = b"{not json at all"
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim.name}: corrupt safetensors header"):
        CheckpointReader(m)


def test_truncated_file_names_tensor(tmp_path):
    save_file({"w": torch.ones(100)}, str(tmp_path / "model.safetensors"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="model.safetensors: tensor 'w' declares bytes .* truncated or corrupt"):
        CheckpointReader(tmp_path)


def test_duplicate_tensor_across_shards_is_named(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "part-a.safetensors"))
    save_file({"w": torch.zeros(2), "v": torch.ones(1)}, str(tmp_path / "part-b.safetensors"))
    with pytest.raises(CheckpointError, match="part-b.safetensors: tensor 'w' also appears in part-a.safetensors"):
        CheckpointReader(tmp_path)


def test_index_naming_a_missing_tensor(tmp_path):
    m = _sharded(tmp_path)
    index = json.loads((m / INDEX_NAME).read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["ghost.weight"] = shard
    (m / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(MissingTensor, match=f"{INDEX_NAME}: lists tensor 'ghost.weight' in {shard}, which does not hold it"):
        CheckpointReader(m)


def test_index_pointing_to_the_wrong_shard(tmp_path):
    m = _sharded(tmp_path)
    index = json.loads((m / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    # c.ids and d.scalar share the last shard; claim one of them lives in the first
    assert index["weight_map"]["c.ids"] == index["weight_map"]["d.scalar"] == shards[-1]
    index["weight_map"]["d.scalar"] = shards[0]
    (m / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"lists tensor 'd.scalar' in {shards[0]}, but it is stored in {shards[-1]}"):
        CheckpointReader(m)


def test_unknown_tensor_is_named(tmp_path):
    r = CheckpointReader(_sharded(tmp_path))
    with pytest.raises(MissingTensor, match="no tensor named 'nope'"):
        r.get("nope")


def test_a_reader_that_failed_to_open_closes_quietly(recwarn):
    # A path of the wrong type fails before any file is opened; the half-built reader's close
    # (called again by its finalizer) must neither raise nor print "Exception ignored".
    import gc

    with pytest.raises(TypeError):
        CheckpointReader(["not", "a", "path"])
    gc.collect()
    half = CheckpointReader.__new__(CheckpointReader)
    half.close()
    assert not [w for w in recwarn.list if issubclass(w.category, pytest.PytestUnraisableExceptionWarning)]


def test_a_tensor_added_ahead_of_the_plan_is_held_until_its_turn(tmp_path):
    a, b = torch.arange(4, dtype=torch.float32), torch.arange(4, 8, dtype=torch.float32)
    with CheckpointWriter(tmp_path / "m") as w:
        w.plan([("a", (4,), "F32"), ("b", (4,), "F32")])
        w.add("b", b)
        assert w.holds("b")  # its memory is still read: not to be reused by the caller yet
        w.add("a", a)
        assert not w.holds("a") and not w.holds("b")  # both written once "a" arrived
        b.fill_(-1.0)  # changing it now changes nothing on disk
        w.commit()
    got = CheckpointReader(tmp_path / "m")
    assert torch.equal(got.get("b"), torch.arange(4, 8, dtype=torch.float32))
