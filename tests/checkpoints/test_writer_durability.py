"""``CheckpointWriter(durable=False)``: the same folder, whole, with nothing forced to disk."""

from __future__ import annotations

import os

import pytest
import torch

from fedmerge.checkpoints import CheckpointReader, CheckpointWriter


def _write(out, durable: bool):
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}
    with CheckpointWriter(out, max_shard_bytes=40, durable=durable) as w:  # two shards and an index
        w.plan([(n, tuple(t.shape), "F32" if t.dtype == torch.float32 else "BF16") for n, t in tensors.items()])
        for n, t in tensors.items():
            w.add(n, t)
        w.commit(metadata={"k": "v"})
    return tensors


@pytest.mark.parametrize("durable", [True, False])
def test_scratch_folders_skip_fsync_and_are_otherwise_identical(tmp_path, monkeypatch, durable):
    synced: list[str] = []
    real = os.fsync

    def counting_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    tensors = _write(tmp_path / "out", durable)
    monkeypatch.setattr(os, "fsync", real)
    _write(tmp_path / "ref", True)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "ref").iterdir()) and len([f for f in files if f.endswith(".safetensors")]) == 2
    for f in files:
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes()
    shards = [s for s in synced if s.endswith(".safetensors")]
    assert (len(shards) >= 2) if durable else (synced == [])
    with CheckpointReader(tmp_path / "out") as r:
        assert torch.equal(r.get("a"), tensors["a"]) and torch.equal(r.get("b"), tensors["b"])
