"""Delta sources: full models, delta folders, and how an input folder's kind is told."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import tensors, tiny_set

from fedmerge.checkpoints import CheckpointError, CheckpointReader, IncompatibleCheckpoint, model_fingerprint
from fedmerge.merging.taskvector import DeltaCheckpoint, TaskVector, open_delta_source, write_delta_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory)


def test_task_vector_is_model_minus_base(tiny):
    base, (ft1, *_) = tiny
    tv = TaskVector(ft1, base)
    b, m = tensors(base), tensors(ft1)
    assert tv.names() == CheckpointReader(base).names()
    for n in tv.names():
        d = tv.get_delta(n)
        assert d.dtype == torch.float32 and torch.equal(d, m[n].float() - b[n].float())
    n = "model.embed_tokens.weight"
    assert torch.equal(tv.get_delta(n, rows=(5, 9)), (m[n] - b[n])[5:9])
    assert torch.equal(tv.get_delta(n, base=b[n].float()), m[n] - b[n])


def test_bf16_model_delta_is_taken_in_float32(tmp_path):
    base = tmp_path / "b"
    ft = tmp_path / "f"
    from fedmerge.checkpoints import CheckpointWriter

    for folder, value in ((base, 1.0), (ft, 1.0078125)):  # one bf16 ulp above 1
        with CheckpointWriter(folder) as w:
            w.add("w", torch.full((4,), value, dtype=torch.bfloat16))
            w.commit()
    d = TaskVector(ft, base).get_delta("w")
    assert d.dtype == torch.float32 and torch.equal(d, torch.full((4,), 0.0078125))


def test_streamed_fingerprint_equals_model_fingerprint(tiny):
    base, (ft1, *_) = tiny
    tv = TaskVector(ft1, base)
    assert tv.fingerprint() is None  # nothing read yet
    tv.digests.enabled = True
    for n in tv.names():
        info = tv.info(n)
        if len(info.shape) == 2:  # read the matrices in row chunks, the rest whole
            for a in range(0, info.shape[0], 7):
                tv.get_delta(n, rows=(a, min(info.shape[0], a + 7)))
        else:
            tv.get_delta(n)
    assert tv.fingerprint() == model_fingerprint(CheckpointReader(ft1))


def test_delta_checkpoint_round_trip_and_kind_detection(tiny, tmp_path):
    base, (ft1, *_) = tiny
    tv = TaskVector(ft1, base)
    out = write_delta_checkpoint(tv, tmp_path / "delta", metadata={"round": 3})
    meta = json.loads((out / "fedmerge.json").read_text())
    assert meta["kind"] == "delta" and meta["round"] == 3 and meta["label"] == ft1.name
    dc = open_delta_source(out, base)
    assert isinstance(dc, DeltaCheckpoint) and dc.label == ft1.name
    for n in tv.names():
        assert torch.equal(dc.get_delta(n), tv.get_delta(n))
    assert isinstance(open_delta_source(ft1, base), TaskVector)
    assert dc.get_delta("not.in.the.folder") is None


def test_delta_checkpoint_may_omit_tensors(tiny, tmp_path):
    base, (ft1, *_) = tiny
    from fedmerge.checkpoints import CheckpointWriter

    with CheckpointWriter(tmp_path / "d") as w:
        w.add("model.norm.weight", torch.full((32,), 0.5))
        w.commit(metadata={"kind": "delta"})
    dc = open_delta_source(tmp_path / "d", None)
    assert dc.names() == ["model.norm.weight"]
    assert dc.get_delta("lm_head.weight") is None
    assert torch.equal(dc.get_delta("model.norm.weight"), torch.full((32,), 0.5))


def test_open_errors(tiny, tmp_path):
    base, (ft1, *_) = tiny
    with pytest.raises(CheckpointError, match="no such model, adapter or delta folder"):
        open_delta_source(tmp_path / "nowhere", base)
    with pytest.raises(IncompatibleCheckpoint, match="needs a base model"):
        open_delta_source(ft1, None)
    with pytest.raises(CheckpointError, match="unknown input kind 'weights'"):
        open_delta_source(ft1, base, kind="weights")
