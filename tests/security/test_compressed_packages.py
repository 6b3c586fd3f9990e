"""Compressed delta packages: what is signed, sent and checked is the encoded form, and the
deltas a merge reads back are exactly the codec's decoding of the true delta."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from sec_helpers import load_manifest_dict, resign

from fedmerge.checkpoints import CheckpointReader
from fedmerge.checkpoints.codecs import TensorCodec, parse_compression
from fedmerge.merging.taskvector import DeltaCheckpoint, TaskVector
from fedmerge.security import errors as E
from fedmerge.security.pack import pack_delta
from fedmerge.security.verify import verify_package

CHUNK = 2048
SPECS = ["int8", "int4", "sparse:0.25", "sparse:0.25+int4"]


@pytest.fixture(scope="module")
def compressed(models, fingerprint, ids, tmp_path_factory):
    """hosp-a's round-3 package under each spec, plain and sealed to coord, with seed 77."""
    base, ft = models
    root = tmp_path_factory.mktemp("compressed")
    out = {}
    for spec in SPECS:
        for sealed in (False, True):
            out[spec, sealed] = pack_delta(ft, base, root / f"{spec}-{sealed}", ids["hosp-a"], 3, fingerprint, chunk_bytes=CHUNK,
                                           seal_to=ids["coord"].public if sealed else None, compress=spec, compress_seed=77)  # fmt: skip
    return out


def _true_deltas(models) -> dict[str, torch.Tensor]:
    tv = TaskVector(models[1], models[0])
    return {n: tv.get_delta(n) for n in tv.names()}


@pytest.mark.parametrize("sealed", [False, True])
@pytest.mark.parametrize("spec", SPECS)
def test_unpacked_deltas_are_the_codec_of_the_true_delta(spec, sealed, compressed, models, trust, ids, fingerprint, tmp_path):
    v = verify_package(compressed[spec, sealed], trust, expected_round=3, expected_reference=fingerprint, opener=ids["coord"],
                       expected_tensors=CheckpointReader(models[0]), expected_compression=spec, require_sealed=sealed,
                       unpack_to=tmp_path / "delta")  # fmt: skip
    assert v.compression == spec and v.manifest.compression.seed == 77
    dc = DeltaCheckpoint(tmp_path / "delta")
    assert dc.compression == spec
    comp = parse_compression(spec)
    for name, true in _true_deltas(models).items():
        got = dc.get_delta(name)
        assert got.dtype == torch.float32 and got.shape == true.shape, name
        if comp.applies_to(tuple(true.shape)):
            codec = TensorCodec(comp, name, tuple(true.shape), 77, "F32")
            assert torch.equal(got, codec.decode(codec.encode(true, 0), 0)), name
            assert dc.info(name).shape == true.shape and CheckpointReader(tmp_path / "delta").info(name).dtype == "U8"
        else:  # vectors travel exactly
            assert torch.equal(got, true), name


def test_int4_keeps_every_tensors_direction(compressed, models, trust, ids, tmp_path):
    verify_package(compressed["int4", True], trust, opener=ids["coord"], unpack_to=tmp_path / "d")
    dc = DeltaCheckpoint(tmp_path / "d")
    flat_true, flat_got = [], []
    for name, true in _true_deltas(models).items():
        got = dc.get_delta(name)
        assert torch.nn.functional.cosine_similarity(got.flatten(), true.flatten(), dim=0) >= 0.99, name
        flat_true.append(true.flatten())
        flat_got.append(got.flatten())
    assert torch.nn.functional.cosine_similarity(torch.cat(flat_got), torch.cat(flat_true), dim=0) >= 0.99


def test_packages_hold_exactly_the_encoded_bytes(compressed, models):
    """Per matrix of rows x n values: int8 n + 4 bytes a row; int4 ceil(n/2) nibble bytes + 2 per
    group of 64; sparse:0.25 keeps 16 of each 64-block (a block is the row when n < 64: 8 of 32
    here); vectors stay float32."""
    infos = CheckpointReader(models[0]).infos()
    vectors = sum(i.numel * 4 for i in infos if len(i.shape) < 2)
    matrices = [(i.shape[0], i.numel // i.shape[0]) for i in infos if len(i.shape) >= 2]

    def kept(n: int) -> int:
        b = min(64, n)
        return -(-n // b) * round(0.25 * b)

    want = {
        "int8": sum(r * (n + 4) for r, n in matrices),
        "int4": sum(r * (-(-n // 2) + 2 * -(-n // 64)) for r, n in matrices),
        "sparse:0.25": sum(r * kept(n) * 4 for r, n in matrices),
        "sparse:0.25+int4": sum(r * (-(-kept(n) // 2) + 2 * -(-kept(n) // 64)) for r, n in matrices),
    }
    for spec in SPECS:
        m = load_manifest_dict(compressed[spec, False])
        assert sum(t["nbytes"] for t in m["tensors"]) == vectors + want[spec], spec
    bf16 = sum(r * n * 2 for r, n in matrices)
    assert want["int4"] / bf16 <= 0.29 and want["sparse:0.25+int4"] / bf16 <= 0.1  # rows of 32 to 256 values here


def test_the_manifest_signs_the_spec_and_the_seed(compressed, trust):
    doc = load_manifest_dict(compressed["sparse:0.25+int4", False])
    assert doc["compression"] == {"spec": "sparse:0.25+int4", "seed": 77}


def test_exact_packages_carry_no_compression_field(models, fingerprint, ids, tmp_path):
    pkg = pack_delta(models[1], models[0], tmp_path / "exact", ids["hosp-a"], 3, fingerprint, chunk_bytes=CHUNK)
    assert "compression" not in load_manifest_dict(pkg)


def test_a_changed_seed_breaks_the_signature(compressed, trust, tmp_path):
    pkg = tmp_path / "p"
    shutil.copytree(compressed["sparse:0.25", False], pkg)
    raw = (pkg / "manifest.json").read_bytes()
    (pkg / "manifest.json").write_bytes(raw.replace(b'"seed":77', b'"seed":78'))
    with pytest.raises(E.SignatureInvalid):
        verify_package(pkg, trust, require_sealed=False)


def test_the_mask_comes_from_the_signed_seed(compressed, models, trust, ids, tmp_path):
    """An enrolled sender re-signing another seed over the same bytes gets other positions, not the
    same delta: the seed in the manifest is the one every decoder uses."""
    pkg = tmp_path / "p"
    shutil.copytree(compressed["sparse:0.25", False], pkg)
    doc = load_manifest_dict(pkg)
    doc["compression"]["seed"] = 78
    resign(pkg, doc, ids["hosp-a"])
    verify_package(pkg, trust, require_sealed=False, unpack_to=tmp_path / "d78")
    verify_package(compressed["sparse:0.25", False], trust, require_sealed=False, unpack_to=tmp_path / "d77")
    name = "model.layers.0.mlp.up_proj.weight"
    a, b = DeltaCheckpoint(tmp_path / "d77").get_delta(name), DeltaCheckpoint(tmp_path / "d78").get_delta(name)
    assert not torch.equal(a != 0, b != 0)
    codec = TensorCodec(parse_compression("sparse:0.25"), name, tuple(a.shape), 78, "F32")
    stored = CheckpointReader(tmp_path / "d78").get(name)
    assert torch.equal(b, codec.decode(stored, 0))


@pytest.mark.parametrize("sealed, error", [(False, E.DigestMismatch), (True, E.ChunkAuthenticationFailed)])
def test_a_flipped_byte_of_compressed_data_is_refused(sealed, error, compressed, trust, ids, tmp_path):
    pkg = tmp_path / "p"
    shutil.copytree(compressed["sparse:0.25+int4", sealed], pkg)
    t = next(t for t in load_manifest_dict(pkg)["tensors"] if len(t["shape"]) == 2)
    f = pkg / t["file"]
    data = bytearray(f.read_bytes())
    data[t["offset"] + 5] ^= 0x10
    f.write_bytes(data)
    with pytest.raises(error) as exc:
        verify_package(pkg, trust, opener=ids["coord"], require_sealed=False, unpack_to=tmp_path / "out")
    assert exc.value.tensor == t["name"]
    assert not (tmp_path / "out").exists()


def test_a_nan_scale_signed_by_its_sender_is_refused(compressed, trust, ids, tmp_path):
    pkg = tmp_path / "p"
    shutil.copytree(compressed["int4", False], pkg)
    doc = load_manifest_dict(pkg)
    t = next(t for t in doc["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    codec = TensorCodec(parse_compression("int4"), t["name"], tuple(t["shape"]), 77, "F32")
    nibbles = codec.row_bytes - 2 * -(-codec.n // 64)
    at = t["offset"] + 3 * codec.row_bytes + nibbles  # the first scale of row 3
    data = bytearray((pkg / t["file"]).read_bytes())
    data[at : at + 2] = np.array([0x7FC0], dtype="<u2").tobytes()
    (pkg / t["file"]).write_bytes(data)
    t["sha256"] = hashlib.sha256(bytes(data[t["offset"] : t["offset"] + t["nbytes"]])).hexdigest()
    resign(pkg, doc, ids["hosp-a"])
    with pytest.raises(E.NonFiniteValues) as exc:
        verify_package(pkg, trust, require_sealed=False)
    assert exc.value.tensor == t["name"]


def test_the_coordinator_refuses_another_compression(compressed, models, fingerprint, ids, trust, tmp_path):
    with pytest.raises(E.CompressionMismatch) as exc:
        verify_package(compressed["int8", False], trust, require_sealed=False, expected_compression="int4")
    assert "compressed as int8" in str(exc.value) and "asked for int4" in str(exc.value)
    exact = pack_delta(models[1], models[0], tmp_path / "exact", ids["hosp-a"], 3, fingerprint, chunk_bytes=CHUNK)
    with pytest.raises(E.CompressionMismatch):
        verify_package(exact, trust, require_sealed=False, expected_compression="INT4")
    with pytest.raises(E.CompressionMismatch):
        verify_package(compressed["int4", False], trust, require_sealed=False, expected_compression="none")


@pytest.mark.parametrize("edit, says", [
    (lambda d: d["compression"].update(spec="INT4"), "not a canonical compressed spec"),
    (lambda d: d["compression"].update(spec="none"), "not a canonical compressed spec"),
    (lambda d: d["compression"].update(spec="zip"), "unknown codec"),
    (lambda d: d["compression"].update(seed=-1), "compression.seed"),
    (lambda d: d["compression"].update(extra=1), "unknown field 'extra'"),
    (lambda d: d.pop("compression"), "nbytes"),  # the encoded sizes no longer fit the shapes
])  # fmt: skip
def test_a_malformed_compression_record_is_refused(edit, says, compressed, trust, ids, tmp_path):
    pkg = tmp_path / "p"
    shutil.copytree(compressed["int4", False], pkg)
    doc = load_manifest_dict(pkg)
    edit(doc)
    resign(pkg, doc, ids["hosp-a"])
    with pytest.raises(E.ManifestInvalid) as exc:
        verify_package(pkg, trust, require_sealed=False)
    assert says in str(exc.value)


def test_verifying_and_unpacking_never_decode(compressed, trust, ids, tmp_path, monkeypatch):
    """The coordinator checks and stores what was sent; decoding waits for the merge, row chunk by row chunk."""

    def refuse(*a, **k):
        raise AssertionError("decoded during verification")

    monkeypatch.setattr(TensorCodec, "decode", refuse)
    v = verify_package(compressed["sparse:0.25+int4", True], trust, opener=ids["coord"], unpack_to=tmp_path / "d")
    assert v.data_checked and (tmp_path / "d" / "fedmerge.json").exists()


def test_packing_encodes_bounded_row_blocks_of_a_delta_source(models, fingerprint, ids, trust, tmp_path):
    """A delta source is asked for a few rows at a time and encoded block by block, never whole."""
    from fedmerge.security.pack import ENCODE_ELEMENTS

    class Recording(TaskVector):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.asked: list[tuple[str, tuple[int, int] | None]] = []

        def get_delta(self, name, *, rows=None, base=None):
            self.asked.append((name, rows))
            return super().get_delta(name, rows=rows, base=base)

    src = Recording(models[1], models[0])
    pkg = pack_delta(src, None, tmp_path / "p", ids["hosp-a"], 3, fingerprint, chunk_bytes=CHUNK, compress="int4", compress_seed=77)
    emb = "model.embed_tokens.weight"
    shape = src.info(emb).shape
    blocks = [rows for name, rows in src.asked if name == emb]
    assert len(blocks) > 1 and all(rows is not None and (rows[1] - rows[0]) * shape[1] * 4 <= CHUNK for rows in blocks)
    assert max((r[1] - r[0]) * shape[1] for r in blocks) <= ENCODE_ELEMENTS
    # the same bytes as packing the two folders
    ref = pack_delta(models[1], models[0], tmp_path / "q", ids["hosp-a"], 3, fingerprint, chunk_bytes=CHUNK, compress="int4", compress_seed=77)
    assert (pkg / "data-00000.bin").read_bytes() == (ref / "data-00000.bin").read_bytes()


def test_pack_refuses_an_unknown_spec(models, fingerprint, ids, tmp_path):
    with pytest.raises(E.PackageError) as exc:
        pack_delta(models[1], models[0], tmp_path / "p", ids["hosp-a"], 3, fingerprint, compress="int3")
    assert "unknown codec 'int3'" in str(exc.value) and "int4" in str(exc.value)
    assert not (tmp_path / "p").exists()
