"""A model sent as an encoded delta is rebuilt byte for byte, and refused when it does not fit."""

from __future__ import annotations

import filecmp
import json

import pytest
import torch

from fedmerge.checkpoints import CheckpointReader, IncompatibleCheckpoint
from fedmerge.checkpoints.codecs import TensorCodec, parse_compression
from fedmerge.checkpoints.rebuild import encode_and_rebuild, encode_model_delta, rebuild_model
from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral, perturb_checkpoint

SPEC = TinyMistralSpec(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("rebuild")
    base = build_tiny_mistral(root / "base", SPEC, seed=0, tokenizer=False)
    return base, perturb_checkpoint(base, root / "ft", seed=1, scale=0.05)


def test_two_rebuilds_are_the_same_files(pair, tmp_path):
    base, ft = pair
    delta = encode_model_delta(ft, base, tmp_path / "delta", parse_compression("int4"), 11)
    a = rebuild_model(base, delta, tmp_path / "a", sidecars_from=ft)
    b = rebuild_model(base, delta, tmp_path / "b", sidecars_from=ft)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert "config.json" in names and "model.safetensors" in names
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def test_a_rebuild_is_the_reference_plus_the_decoded_delta(pair, tmp_path):
    base, ft = pair
    comp = parse_compression("int4")
    out = rebuild_model(base, encode_model_delta(ft, base, tmp_path / "delta", comp, 11), tmp_path / "m")
    ref, got, fine = CheckpointReader(base), CheckpointReader(out), CheckpointReader(ft)
    for name in ref.names():
        true = fine.get(name).float() - ref.get(name).float()
        assert got.info(name) == fine.info(name)
        if comp.applies_to(tuple(true.shape)):
            codec = TensorCodec(comp, name, tuple(true.shape), 11, "F32")
            want = (ref.get(name).float() + codec.decode(codec.encode(true, 0), 0)).to(fine.get(name).dtype)
        else:
            want = fine.get(name)  # vectors: an exact float32 delta on a float32 model
        assert torch.equal(got.get(name), want), name


def test_a_delta_that_does_not_fit_the_reference_is_refused(pair, tmp_path):
    base, ft = pair
    delta = encode_model_delta(ft, base, tmp_path / "delta", parse_compression("int8"), 3)
    meta = json.loads((delta / "fedmerge.json").read_text())
    meta["model"][0][2] = [7, 7]  # another shape than the reference's
    (delta / "fedmerge.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleCheckpoint):
        rebuild_model(base, delta, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_model_with_a_tensor_the_reference_lacks_is_not_sent_as_a_delta(pair, tmp_path):
    from fedmerge.checkpoints import CheckpointWriter

    base, ft = pair
    r = CheckpointReader(ft)
    with CheckpointWriter(tmp_path / "extra") as w:
        for n in r.names():
            w.add(n, r.get(n))
        w.add("extra.weight", torch.zeros(4, 4))
        w.commit()
    with pytest.raises(IncompatibleCheckpoint) as exc:
        encode_model_delta(tmp_path / "extra", base, tmp_path / "delta", parse_compression("int4"), 1)
    assert "extra.weight" in str(exc.value)


@pytest.mark.parametrize("spec", ["int4", "sparse:0.5+int8"])
def test_encoding_and_rebuilding_in_one_pass_writes_the_same_folders(spec, pair, tmp_path):
    """What the coordinator publishes (one pass) is what a hospital rebuilds from the delta it receives."""
    base, ft = pair
    comp = parse_compression(spec)
    delta, published = encode_and_rebuild(ft, base, tmp_path / "delta", tmp_path / "published", comp, 5, sidecars_from=ft)
    hospital = rebuild_model(base, delta, tmp_path / "hospital", sidecars_from=ft)
    assert sorted(p.name for p in published.iterdir()) == sorted(p.name for p in hospital.iterdir())
    assert all(filecmp.cmp(published / p.name, hospital / p.name, shallow=False) for p in published.iterdir())
    separate = encode_model_delta(ft, base, tmp_path / "delta2", comp, 5)
    assert all(filecmp.cmp(delta / p.name, separate / p.name, shallow=False) for p in delta.iterdir())
