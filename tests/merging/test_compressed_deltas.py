"""The engine merges compressed deltas from their encoded rows: the same result as decoding them
first, and never more float32 at once than the rows it works on."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import tensors, tiny_set

from fedmerge.checkpoints import CheckpointReader, model_fingerprint
from fedmerge.merging.engine import MergeSpec, merge
from fedmerge.merging.taskvector import DeltaCheckpoint, write_delta_checkpoint

CHUNK_ELEMENTS = 1024  # the engine's smallest row chunk: the ~300 x 32 embedding takes ~10 chunks


@pytest.fixture(scope="module")
def compressed_deltas(tmp_path_factory):
    """Two fine-tunes' deltas, packed as sparse:0.5+int4 and unpacked by the verifier (still encoded)."""
    from fedmerge.security.keys import generate_identity
    from fedmerge.security.pack import pack_delta
    from fedmerge.security.trust import TrustStore
    from fedmerge.security.verify import verify_package

    base, fts = tiny_set(tmp_path_factory)
    root = tmp_path_factory.mktemp("compressed-deltas")
    fp = model_fingerprint(CheckpointReader(base))
    trust = TrustStore(path=root / "trust.json")
    out = []
    for i, ft in enumerate(fts[:2]):
        ident = generate_identity(f"hosp-{i}", root / "keys")
        trust.add(ident.public)
        pkg = pack_delta(ft, base, root / f"pkg{i}", ident, 1, fp, chunk_bytes=4096, compress="sparse:0.5+int4", compress_seed=i)
        verify_package(pkg, trust, require_sealed=False, unpack_to=root / f"delta{i}")
        out.append(root / f"delta{i}")
    return base, out


def _decoded_copies(dirs, root):
    """The same deltas decoded once into plain float32 delta folders (what a merge must equal)."""
    return [write_delta_checkpoint(DeltaCheckpoint(d), root / f"decoded{i}") for i, d in enumerate(dirs)]


@pytest.mark.parametrize("method, params", [("task_arithmetic", {"lambda": 0.8}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.7})])
def test_merging_compressed_deltas_equals_decoding_them_first(method, params, compressed_deltas, tmp_path):
    base, dirs = compressed_deltas
    spec = MergeSpec(method=method, parameters=params, seed=4, chunk_elements=CHUNK_ELEMENTS, fingerprints=False)
    merge(base, [DeltaCheckpoint(d) for d in dirs], tmp_path / "from-encoded", spec, progress=False)
    merge(base, [DeltaCheckpoint(d) for d in _decoded_copies(dirs, tmp_path)], tmp_path / "from-decoded", spec, progress=False)
    a, b = tensors(tmp_path / "from-encoded"), tensors(tmp_path / "from-decoded")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


class CountingDeltas(DeltaCheckpoint):
    """A compressed delta folder that records every float32 block it hands the engine."""

    def __init__(self, folder):
        super().__init__(folder)
        self.handed: list[tuple[str, tuple[int, int] | None, int]] = []

    def get_delta(self, name, *, rows=None, base=None):
        d = super().get_delta(name, rows=rows, base=base)
        if d is not None:
            self.handed.append((name, rows, d.numel()))
        return d


def test_an_elementwise_merge_decodes_row_chunks_only(compressed_deltas, tmp_path, monkeypatch):
    base, dirs = compressed_deltas
    read: list[tuple[str, tuple[int, int] | None]] = []
    real_get = CheckpointReader.get

    def recording_get(self, name, rows=None):
        if self.folder in dirs:
            read.append((name, rows))
        return real_get(self, name, rows=rows)

    monkeypatch.setattr(CheckpointReader, "get", recording_get)
    sources = [CountingDeltas(d) for d in dirs]
    merge(base, sources, tmp_path / "out", MergeSpec(method="task_arithmetic", chunk_elements=CHUNK_ELEMENTS, fingerprints=False), progress=False)
    reader = CheckpointReader(base)
    largest = max(i.numel for i in reader.infos())
    for src in sources:
        assert src.handed, "nothing was decoded"
        # no block is larger than one row chunk (or one small tensor): never a whole large tensor, let alone a model
        assert max(n for _, _, n in src.handed) <= max(CHUNK_ELEMENTS, max(i.numel for i in reader.infos() if i.numel <= CHUNK_ELEMENTS))
        assert max(n for _, _, n in src.handed) < largest
        vocab, width = reader.info("model.embed_tokens.weight").shape
        emb = [rows for name, rows, _ in src.handed if name == "model.embed_tokens.weight"]
        step = CHUNK_ELEMENTS // width
        assert emb == [(a, min(vocab, a + step)) for a in range(0, vocab, step)]
    # and the encoded bytes were read the same way: only the rows of each chunk
    emb_reads = [rows for name, rows in read if name == "model.embed_tokens.weight"]
    assert len(emb_reads) == 2 * len(emb) and None not in emb_reads


def test_a_compressed_delta_folder_reports_the_deltas_shapes(compressed_deltas):
    base, dirs = compressed_deltas
    dc, ref = DeltaCheckpoint(dirs[0]), CheckpointReader(base)
    for name in ref.names():
        assert dc.info(name).shape == ref.info(name).shape
    assert dc.compression == "sparse:0.5+int4"
    # what the folder stores for a matrix is its encoded rows
    assert CheckpointReader(dirs[0]).info("model.embed_tokens.weight").dtype == "U8"


def test_a_compression_record_that_does_not_fit_the_files_is_refused(compressed_deltas, tmp_path):
    import json
    import shutil

    from fedmerge.checkpoints import CheckpointError

    base, dirs = compressed_deltas
    bad = tmp_path / "bad"
    shutil.copytree(dirs[0], bad)
    meta = json.loads((bad / "fedmerge.json").read_text())
    meta["compression"]["spec"] = "int4"  # another layout than the stored rows
    (bad / "fedmerge.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as exc:
        DeltaCheckpoint(bad)
    assert "is stored as U8" in str(exc.value)
