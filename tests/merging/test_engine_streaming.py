"""Whole-tensor methods on tensors too large to hold: streamed in passes, same results, bounded reads.

The checkpoints here hold one tensor larger than the methods' chunk (``CHUNK`` elements, 4 Mi),
with rows that do not divide it, so a chunk boundary falls inside a row; merging with
``stream_elements`` below every tensor's size streams every tensor the method can stream.
"""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import tensors

from fedmerge.checkpoints import CheckpointReader, CheckpointWriter, model_fingerprint
from fedmerge.merging.engine import MergeSpec, merge, merge_layout
from fedmerge.merging.layout import identity_layout
from fedmerge.merging.source import DeltaSource
from fedmerge.merging.strategies.sparsify import CHUNK
from fedmerge.merging.taskvector import TaskVector

BIG = "model.embed_tokens.weight"
BIG_SHAPE = (2500, 1700)  # 4.25 Mi elements: two chunks, the boundary inside row 2467
SHAPES = {
    BIG: BIG_SHAPE,
    "model.layers.0.mlp.up_proj.weight": (96, 64),
    "model.layers.0.mlp.down_proj.weight": (64, 96),
    "model.norm.weight": (64,),
}


def _write(folder, seed: int, base: dict | None = None) -> dict:
    """The base (``base=None``) or a fine-tune of it: a shared update plus its own noise."""
    gen, shared = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(99)
    out = {}
    with CheckpointWriter(folder) as w:
        for name, shape in SHAPES.items():
            if base is None:
                t = torch.randn(shape, generator=gen) * 0.02
            else:
                t = base[name].float() + 0.002 * (torch.randn(shape, generator=shared) + torch.randn(shape, generator=gen))
            out[name] = t.bfloat16()
            w.add(name, out[name])
        w.commit()
    return out


@pytest.fixture(scope="module")
def big_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    base = _write(root / "base", 0)
    for i in (1, 2, 3):
        _write(root / f"ft{i}", i, base)
    assert BIG_SHAPE[0] * BIG_SHAPE[1] > CHUNK and CHUNK % BIG_SHAPE[1]
    return root / "base", [root / f"ft{i}" for i in (1, 2, 3)]


EXACT = [
    ("ties", {"density": 0.4}),
    ("ties", {"density": 0.4, "consensus": "count", "rescale": True, "rescale_mode": "l1"}),
    ("dare_ties", {"density": 0.5}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("model_stock", {"filter_wise": True}),
    ("slerp", {"t": 0.3}),
    ("hierarchical", {"alignment": "none", "mode": "symmetric"}),
]


@pytest.mark.parametrize("method,params", EXACT, ids=[f"{m}-{i}" for i, (m, _) in enumerate(EXACT)])
def test_streamed_tensors_give_the_bytes_of_whole_ones(big_set, tmp_path, method, params):
    base, fts = big_set
    inputs = fts[:2] if method == "slerp" else fts
    spec = MergeSpec(method=method, parameters=params, seed=5, device="cpu")
    whole = merge(base, inputs, tmp_path / "whole", spec, progress=False)
    streamed = merge(base, inputs, tmp_path / "streamed", spec.model_copy(update={"stream_elements": 1000, "prefetch_bytes": 1}), progress=False)
    got_w, got_s = tensors(whole.out_dir), tensors(streamed.out_dir)
    assert set(got_w) == set(got_s) == set(SHAPES)
    for name in SHAPES:
        assert torch.equal(got_w[name], got_s[name]), f"{method}: {name}"
    b = tensors(base)
    assert not torch.equal(got_s[BIG], b[BIG])  # the merge did change the large tensor
    # the statistics passes read every input again; each is still fingerprinted once, correctly
    meta = json.loads((streamed.out_dir / "fedmerge.json").read_text())
    assert [i["fingerprint"] for i in meta["inputs"]] == [model_fingerprint(CheckpointReader(f)) for f in inputs]
    assert meta["base"]["fingerprint"] == model_fingerprint(CheckpointReader(base))


@pytest.mark.parametrize("method", ["iso_c", "tsv_m"])
def test_streamed_spectral_matrices_match_the_whole_ones(big_set, tmp_path, method):
    """The large tall matrix goes through its Gram matrices either way (same bytes); the small tall
    one is decomposed directly when held and through its Gram matrices when streamed (equal within
    float tolerance); the wide one is always held."""
    base, fts = big_set
    spec = MergeSpec(method=method, device="cpu")
    whole = tensors(merge(base, fts, tmp_path / "whole", spec, progress=False).out_dir)
    streamed = tensors(merge(base, fts, tmp_path / "streamed", spec.model_copy(update={"stream_elements": 1000}), progress=False).out_dir)
    b = tensors(base)
    assert torch.equal(whole[BIG], streamed[BIG])
    assert torch.equal(whole["model.layers.0.mlp.down_proj.weight"], streamed["model.layers.0.mlp.down_proj.weight"])
    up = "model.layers.0.mlp.up_proj.weight"
    change = (whole[up].float() - b[up].float()).abs().max()
    assert change > 0
    torch.testing.assert_close(streamed[up].float(), whole[up].float(), rtol=0, atol=float(change) * 2e-2)


class _CountingReference:
    """A reference model that records the bytes of every read (the engine's TensorReader)."""

    def __init__(self, folder):
        self.reader = CheckpointReader(folder)
        self.folder, self.config = self.reader.folder, self.reader.config
        self.reads: list[tuple[str, int]] = []

    def names(self):
        return self.reader.names()

    def info(self, name):
        return self.reader.info(name)

    def file_of(self, name):
        return self.reader.file_of(name)

    def get(self, name, rows=None):
        t = self.reader.get(name, rows=rows)
        self.reads.append((name, t.numel() * t.element_size()))
        return t


class _CountingSource(DeltaSource):
    """A fine-tune's task vector that records the bytes of every delta it hands out."""

    kind = "model"
    complete = True

    def __init__(self, folder, base):
        self.tv = TaskVector(folder, base)
        self.label, self.folder, self.config = self.tv.label, self.tv.folder, self.tv.config
        self.given: list[tuple[str, int]] = []

    def names(self):
        return self.tv.names()

    def info(self, name):
        return self.tv.info(name)

    def file_of(self, name):
        return self.tv.file_of(name)

    def get_delta(self, name, *, rows=None, base=None):
        d = self.tv.get_delta(name, rows=rows, base=base)
        self.given.append((name, d.numel() * d.element_size()))
        return d


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("iso_c", {})])
def test_a_streamed_tensor_is_never_materialised_whole(big_set, tmp_path, method, params):
    base, fts = big_set
    reference = _CountingReference(base)
    sources = [_CountingSource(f, CheckpointReader(base)) for f in fts]
    layout = identity_layout(reference, len(sources), params, [{}] * len(sources))
    spec = MergeSpec(method=method, parameters=params, device="cpu", stream_elements=1 << 20, prefetch_bytes=64 << 20)
    merge_layout(layout, sources, tmp_path / "out", spec, progress=False)
    numel = BIG_SHAPE[0] * BIG_SHAPE[1]
    # every read of the large tensor covers at most one chunk plus the row it ends in
    bound = (CHUNK + BIG_SHAPE[1]) * 4
    deltas = [n for s in sources for name, n in s.given if name == BIG]
    reads = [n for name, n in reference.reads if name == BIG]
    assert deltas and reads
    assert max(deltas) <= bound < numel * 4
    assert max(reads) <= bound // 2  # the reference is read as stored (bf16)
    # and every element was read (2 bytes each): at least once for the statistics, once for the output
    assert sum(reads) >= 2 * numel * 2
    same = merge(base, fts, tmp_path / "plain", MergeSpec(method=method, parameters=params, device="cpu"), progress=False)
    assert torch.equal(tensors(tmp_path / "out")[BIG], tensors(same.out_dir)[BIG])
