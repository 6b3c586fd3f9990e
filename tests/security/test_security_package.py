"""Delta packages: exact round trips, and each attack refused with its exact typed error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from sec_helpers import load_manifest_dict, resign, sign_raw

from fedmerge.checkpoints import CheckpointReader, CheckpointWriter
from fedmerge.security import errors as E
from fedmerge.security.manifest import MANIFEST_NAME, SIGNATURE_NAME
from fedmerge.security.pack import pack_delta
from fedmerge.security.verify import verify_package
from fedmerge.security.replay import ReplayGuard
from fedmerge.security.seal import TAG_BYTES

CHUNK = 2048


def _expected_deltas(models, dtype=torch.float32) -> dict[str, torch.Tensor]:
    base, ft = (CheckpointReader(m) for m in models)
    return {n: (ft.get(n).float() - base.get(n).float()).to(dtype) for n in ft.names()}


def _assert_folder_equals(folder, expected: dict[str, torch.Tensor]) -> None:
    got = CheckpointReader(folder)
    assert sorted(got.names()) == sorted(expected)
    for name, want in expected.items():
        t = got.get(name)
        assert t.dtype == want.dtype and t.shape == want.shape, name
        assert torch.equal(t, want), name


def _big_tensor(pkg):
    """The first tensor spanning at least 3 chunks (name, manifest entry)."""
    m = load_manifest_dict(pkg)
    t = next(t for t in m["tensors"] if t["chunks"] >= 3)
    return t["name"], t


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "sealed"])
def test_pack_verify_unpack_is_exactly_model_minus_reference(kind, packages, models, trust, ids, fingerprint, tmp_path):
    v = verify_package(packages[kind], trust, expected_round=3, expected_reference=fingerprint, opener=ids["coord"], expected_tensors=CheckpointReader(models[0]), expected_dtype="float32", require_sealed=kind == "sealed")
    assert v.sender == "hosp-a" and v.round == 3 and v.data_checked and v.sealed == (kind == "sealed")
    out = v.unpack(tmp_path / "delta")
    _assert_folder_equals(out, _expected_deltas(models))
    meta = json.loads((out / "fedmerge.json").read_text())
    assert meta["kind"] == "delta" and meta["sender"] == "hosp-a" and meta["round"] == 3 and meta["reference"] == fingerprint
    # The engine reads it as a DeltaCheckpoint with the same float32 deltas.
    from fedmerge.merging.taskvector import DeltaCheckpoint

    dc = DeltaCheckpoint(out)
    name = dc.names()[0]
    assert torch.equal(dc.get_delta(name), _expected_deltas(models)[name])


def test_sealed_data_files_hold_no_plaintext(packages):
    m = load_manifest_dict(packages["sealed"])
    plain = (packages["plain"] / "data-00000.bin").read_bytes()
    sealed = (packages["sealed"] / "data-00000.bin").read_bytes()
    total_chunks = sum(t["chunks"] for t in m["tensors"])
    assert len(sealed) == len(plain) + TAG_BYTES * total_chunks
    # No 64-byte window of plaintext survives sealing.
    for off in range(0, len(plain) - 64, len(plain) // 50):
        assert plain[off : off + 64] not in sealed


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_reduced_precision_packages_round_trip(dtype, torch_dtype, models, trust, ids, fingerprint, tmp_path):
    base, ft = models
    pkg = pack_delta(ft, base, tmp_path / "pkg", ids["hosp-a"], 1, fingerprint, seal_to=ids["coord"].public, dtype=dtype, chunk_bytes=CHUNK)
    out = verify_package(pkg, trust, opener=ids["coord"], unpack_to=tmp_path / "delta").path
    _assert_folder_equals(tmp_path / "delta", _expected_deltas(models, torch_dtype))
    assert out == pkg


def test_delta_source_packing_matches_folder_packing(models, packages, trust, ids, fingerprint, tmp_path):
    from fedmerge.merging.taskvector import TaskVector

    base, ft = models
    pkg = pack_delta(TaskVector(ft, base), None, tmp_path / "pkg", ids["hosp-a"], 3, fingerprint, chunk_bytes=CHUNK)
    a, b = load_manifest_dict(pkg), load_manifest_dict(packages["plain"])
    assert [(t["name"], t["sha256"]) for t in a["tensors"]] == [(t["name"], t["sha256"]) for t in b["tensors"]]
    assert (pkg / "data-00000.bin").read_bytes() == (packages["plain"] / "data-00000.bin").read_bytes()


def test_untouched_tensors_of_a_source_are_left_out_and_read_as_zero(models, trust, ids, fingerprint, tmp_path):
    from fedmerge.merging.taskvector import DeltaCheckpoint, TaskVector

    base, ft = models
    tv = TaskVector(ft, base)

    class OnlyMlp:  # a source that leaves all but the MLP weights untouched, as a LoRA adapter does
        label = "mlp-only"
        names, info = tv.names, tv.info

        def get_delta(self, name, *, rows=None, base=None):
            return tv.get_delta(name, rows=rows) if ".mlp." in name else None

    pkg = pack_delta(OnlyMlp(), None, tmp_path / "pkg", ids["hosp-a"], 3, fingerprint, chunk_bytes=CHUNK)
    names = [t["name"] for t in load_manifest_dict(pkg)["tensors"]]
    assert names and all(".mlp." in n for n in names)
    out = verify_package(pkg, trust, expected_tensors=CheckpointReader(base), unpack_to=tmp_path / "delta", require_sealed=False)
    dc = DeltaCheckpoint(tmp_path / "delta")
    assert dc.get_delta("model.norm.weight") is None
    assert out.manifest.label == "mlp-only"


def test_packages_span_several_data_files(models, trust, ids, fingerprint, tmp_path):
    base, ft = models
    pkg = pack_delta(ft, base, tmp_path / "pkg", ids["hosp-a"], 3, fingerprint, seal_to=ids["coord"].public, chunk_bytes=CHUNK, max_file_bytes=20_000)
    m = load_manifest_dict(pkg)
    assert len(m["files"]) > 3
    verify_package(pkg, trust, opener=ids["coord"], unpack_to=tmp_path / "delta")
    _assert_folder_equals(tmp_path / "delta", _expected_deltas(models))


def test_unpack_into_several_shards(packages, models, trust, ids, tmp_path):
    v = verify_package(packages["plain"], trust, require_sealed=False)
    out = v.unpack(tmp_path / "delta", max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").exists()
    _assert_folder_equals(out, _expected_deltas(models))


# -- the attacks the issue names ------------------------------------------------------------------
def test_one_flipped_byte_in_one_tensor(copy_pkg, trust, ids):
    pkg = copy_pkg("plain")
    name, t = _big_tensor(pkg)
    data = bytearray((pkg / t["file"]).read_bytes())
    data[t["offset"] + CHUNK + 5] ^= 0x01
    (pkg / t["file"]).write_bytes(data)
    with pytest.raises(E.DigestMismatch) as exc:
        verify_package(pkg, trust, require_sealed=False)
    assert exc.value.tensor == name and exc.value.sender == "hosp-a"
    assert name in str(exc.value) and "hosp-a" in str(exc.value)


def test_one_flipped_byte_in_a_sealed_tensor(copy_pkg, trust, ids):
    pkg = copy_pkg("sealed")
    name, t = _big_tensor(pkg)
    data = bytearray((pkg / t["file"]).read_bytes())
    data[t["offset"] + (CHUNK + TAG_BYTES) + 5] ^= 0x80
    (pkg / t["file"]).write_bytes(data)
    with pytest.raises(E.ChunkAuthenticationFailed) as exc:
        verify_package(pkg, trust, opener=ids["coord"])
    assert exc.value.tensor == name and "chunk 2/" in str(exc.value)


def test_a_tensor_renamed_in_the_manifest(copy_pkg, trust):
    pkg = copy_pkg("plain")
    raw = (pkg / MANIFEST_NAME).read_bytes()
    name = load_manifest_dict(pkg)["tensors"][0]["name"]
    (pkg / MANIFEST_NAME).write_bytes(raw.replace(json.dumps(name).encode(), json.dumps(name + "x").encode(), 1))
    with pytest.raises(E.SignatureInvalid) as exc:
        verify_package(pkg, trust, require_sealed=False)
    assert exc.value.sender == "hosp-a"


def test_a_tensor_renamed_by_its_enrolled_sender(copy_pkg, trust, ids, models):
    """Even correctly signed, a renamed tensor is refused: by the reference's names, and by the AEAD."""
    for kind in ("plain", "sealed"):
        pkg = copy_pkg(kind)
        doc = load_manifest_dict(pkg)
        old = doc["tensors"][1]["name"]
        doc["tensors"][1]["name"] = old.replace("q_proj", "k_proj") if "q_proj" in old else old + ".renamed"
        new = doc["tensors"][1]["name"]
        if any(t["name"] == new for i, t in enumerate(doc["tensors"]) if i != 1):
            doc["tensors"][1]["name"] = new = old + ".renamed"
        resign(pkg, doc, ids["hosp-a"])
        with pytest.raises(E.TensorMismatch) as exc:
            verify_package(pkg, trust, opener=ids["coord"], expected_tensors=CheckpointReader(models[0]), require_sealed=False)
        assert exc.value.tensor == new
        if kind == "sealed":
            with pytest.raises(E.ChunkAuthenticationFailed) as exc:
                verify_package(pkg, trust, opener=ids["coord"])
            assert exc.value.tensor == new
        shutil.rmtree(pkg)


@pytest.mark.parametrize("kind,error", [("sealed", E.ChunkAuthenticationFailed), ("plain", E.DigestMismatch)])
def test_two_chunks_swapped(kind, error, copy_pkg, trust, ids):
    pkg = copy_pkg(kind)
    name, t = _big_tensor(pkg)
    step = CHUNK + (TAG_BYTES if kind == "sealed" else 0)
    data = bytearray((pkg / t["file"]).read_bytes())
    a, b = t["offset"], t["offset"] + step
    data[a : a + step], data[b : b + step] = data[b : b + step], data[a : a + step]
    (pkg / t["file"]).write_bytes(data)
    with pytest.raises(error) as exc:
        verify_package(pkg, trust, opener=ids["coord"], require_sealed=kind == "sealed")
    assert exc.value.tensor == name and exc.value.sender == "hosp-a"


def test_chunks_of_two_tensors_swapped_across_tensors(copy_pkg, trust, ids):
    pkg = copy_pkg("sealed")
    doc = load_manifest_dict(pkg)
    big = [t for t in doc["tensors"] if t["chunks"] >= 2][:2]
    data = bytearray((pkg / big[0]["file"]).read_bytes())
    step = CHUNK + TAG_BYTES
    a, b = big[0]["offset"], big[1]["offset"]
    data[a : a + step], data[b : b + step] = data[b : b + step], data[a : a + step]
    (pkg / big[0]["file"]).write_bytes(data)
    with pytest.raises(E.ChunkAuthenticationFailed) as exc:
        verify_package(pkg, trust, opener=ids["coord"])
    assert exc.value.tensor == big[0]["name"]


def test_a_sealed_package_cut_short_at_a_chunk_boundary(copy_pkg, trust, ids):
    """Dropping the last chunk and fixing sizes in a re-signed manifest is still caught by the AEAD."""
    pkg = copy_pkg("sealed")
    doc = load_manifest_dict(pkg)
    i, t = next((i, t) for i, t in enumerate(doc["tensors"]) if t["chunks"] >= 3)
    # Claim the tensor is one chunk shorter: shape changes, so the last-chunk flag moves.
    assert t["nbytes"] % CHUNK == 0 and len(t["shape"]) == 2
    rows_per_chunk = CHUNK // (t["shape"][1] * 4)
    t["shape"][0] -= rows_per_chunk
    t["nbytes"] -= CHUNK
    t["stored"] -= CHUNK + TAG_BYTES
    t["chunks"] -= 1
    data = bytearray((pkg / t["file"]).read_bytes())
    end = t["offset"] + t["stored"]
    del data[end : end + CHUNK + TAG_BYTES]
    (pkg / t["file"]).write_bytes(data)
    for later in doc["tensors"][i + 1 :]:
        if later["file"] == t["file"]:
            later["offset"] -= CHUNK + TAG_BYTES
    next(f for f in doc["files"] if f["name"] == t["file"])["size"] -= CHUNK + TAG_BYTES
    resign(pkg, doc, ids["hosp-a"])
    with pytest.raises(E.ChunkAuthenticationFailed) as exc:
        verify_package(pkg, trust, opener=ids["coord"])
    assert exc.value.tensor == t["name"]


def test_a_package_signed_by_a_revoked_key(packages, trust):
    trust.revoke("hosp-a", reason="laptop stolen")
    with pytest.raises(E.RevokedSender) as exc:
        verify_package(packages["plain"], trust, require_sealed=False)
    assert exc.value.sender == "hosp-a" and "laptop stolen" in str(exc.value)


def test_an_unknown_sender(models, ids, fingerprint, trust, tmp_path):
    base, ft = models
    pkg = pack_delta(ft, base, tmp_path / "pkg", ids["hosp-x"], 3, fingerprint, chunk_bytes=CHUNK)
    with pytest.raises(E.UnknownSender) as exc:
        verify_package(pkg, trust, require_sealed=False)
    assert exc.value.sender == "hosp-x"


def test_a_package_signed_with_another_enrolled_key(copy_pkg, trust, ids):
    pkg = copy_pkg("plain")
    resign(pkg, load_manifest_dict(pkg), ids["hosp-b"])  # hosp-b signs a package naming hosp-a
    with pytest.raises(E.SignatureInvalid) as exc:
        verify_package(pkg, trust, require_sealed=False)
    assert "hosp-b" in str(exc.value)


def test_a_package_replayed_from_an_earlier_round(models, ids, fingerprint, trust, tmp_path):
    base, ft = models
    guard_file = tmp_path / "guard.json"
    r1 = pack_delta(ft, base, tmp_path / "r1", ids["hosp-a"], 1, fingerprint, chunk_bytes=CHUNK)
    r2 = pack_delta(ft, base, tmp_path / "r2", ids["hosp-a"], 2, fingerprint, chunk_bytes=CHUNK)
    verify_package(r1, trust, expected_round=1, replay_guard=ReplayGuard(guard_file), require_sealed=False)
    verify_package(r2, trust, expected_round=2, replay_guard=ReplayGuard(guard_file), require_sealed=False)
    # The coordinator restarted: the guard comes back from disk.
    guard = ReplayGuard(guard_file)
    assert guard.last_round("hosp-a") == 2
    with pytest.raises(E.StaleRound) as exc:
        verify_package(r1, trust, replay_guard=guard, require_sealed=False)
    assert exc.value.sender == "hosp-a"
    with pytest.raises(E.StaleRound):
        verify_package(r1, trust, expected_round=2, require_sealed=False)
    with pytest.raises(E.ReplayedNonce):
        verify_package(r2, trust, expected_round=2, replay_guard=guard, require_sealed=False)


def test_a_refused_package_does_not_consume_its_nonce(copy_pkg, trust, tmp_path):
    pkg = copy_pkg("plain")
    guard = ReplayGuard(tmp_path / "guard.json")
    name, t = _big_tensor(pkg)
    good = (pkg / t["file"]).read_bytes()
    bad = bytearray(good)
    bad[t["offset"]] ^= 1
    (pkg / t["file"]).write_bytes(bad)
    with pytest.raises(E.DigestMismatch):
        verify_package(pkg, trust, replay_guard=guard, require_sealed=False)
    (pkg / t["file"]).write_bytes(good)
    verify_package(pkg, trust, replay_guard=guard, require_sealed=False)  # the intact copy is accepted once...
    with pytest.raises(E.ReplayedNonce):
        verify_package(pkg, trust, replay_guard=guard, require_sealed=False)  # ...and only once


def test_strict_rounds_allow_one_package_per_round(models, ids, fingerprint, trust, tmp_path):
    base, ft = models
    guard = ReplayGuard(tmp_path / "g.json", strict_rounds=True)
    a = pack_delta(ft, base, tmp_path / "a", ids["hosp-a"], 4, fingerprint, chunk_bytes=CHUNK)
    b = pack_delta(ft, base, tmp_path / "b", ids["hosp-a"], 4, fingerprint, chunk_bytes=CHUNK)
    verify_package(a, trust, replay_guard=guard, require_sealed=False)
    with pytest.raises(E.StaleRound):
        verify_package(b, trust, replay_guard=guard, require_sealed=False)


def test_an_encrypted_package_opened_with_another_coordinators_key(packages, trust, ids):
    with pytest.raises(E.NotSealedForYou) as exc:
        verify_package(packages["sealed"], trust, opener=ids["coord-2"])
    assert exc.value.sender == "hosp-a" and "coord" in str(exc.value)


def test_another_coordinators_key_cannot_decrypt_even_if_the_check_is_bypassed(packages, ids):
    from fedmerge.security.verify import read_manifest, sealer_for

    m = read_manifest(packages["sealed"])
    t = m.tensors[0]
    sender_key = ids["hosp-a"].public.signing_key
    ct = (packages["sealed"] / t.file).read_bytes()[t.offset : t.offset + min(CHUNK, t.nbytes) + TAG_BYTES]
    assert len(sealer_for(m, ids["coord"], sender_key).open(0, t.name, 0, t.chunks, ct)) == min(CHUNK, t.nbytes)
    with pytest.raises(E.ChunkAuthenticationFailed):
        sealer_for(m, ids["coord-2"], sender_key).open(0, t.name, 0, t.chunks, ct)


def test_a_sealed_package_needs_the_opener_to_check_data(packages, trust, tmp_path):
    with pytest.raises(E.OpenerRequired):
        verify_package(packages["sealed"], trust)
    v = verify_package(packages["sealed"], trust, check_data=False)
    assert not v.data_checked
    with pytest.raises(E.OpenerRequired):
        v.unpack(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_manifest_whose_json_was_edited(copy_pkg, trust, ids):
    pkg = copy_pkg("plain")
    raw = (pkg / MANIFEST_NAME).read_bytes()
    (pkg / MANIFEST_NAME).write_bytes(raw.replace(b'"round":3', b'"round":4'))
    with pytest.raises(E.SignatureInvalid) as exc:
        verify_package(pkg, trust, expected_round=4, require_sealed=False)
    assert exc.value.sender == "hosp-a"
    # Re-indented but same content: refused too, the manifest is canonical bytes. Unsigned, the
    # signature (checked before any parsing) refuses it; signed so by its sender, the parser does.
    reindented = json.dumps(json.loads(raw), indent=1, sort_keys=True).encode()
    (pkg / MANIFEST_NAME).write_bytes(reindented)
    with pytest.raises(E.SignatureInvalid):
        verify_package(pkg, trust, require_sealed=False)
    sign_raw(pkg, reindented, ids["hosp-a"])
    with pytest.raises(E.ManifestInvalid, match="canonical") as exc:
        verify_package(pkg, trust, require_sealed=False)
    assert MANIFEST_NAME in str(exc.value) and exc.value.sender == "hosp-a"


def test_wrong_reference_fingerprint(packages, trust):
    with pytest.raises(E.ReferenceMismatch) as exc:
        verify_package(packages["plain"], trust, expected_reference="sha256:" + "0" * 64, require_sealed=False)
    assert exc.value.sender == "hosp-a"


def test_shape_and_dtype_not_matching(copy_pkg, trust, ids, models):
    pkg = copy_pkg("plain")
    with pytest.raises(E.TensorMismatch):
        verify_package(pkg, trust, expected_dtype="bfloat16", require_sealed=False)
    doc = load_manifest_dict(pkg)
    t = next(t for t in doc["tensors"] if len(t["shape"]) == 2 and t["shape"][0] % 2 == 0)
    t["shape"] = [t["shape"][0] // 2, t["shape"][1] * 2]  # same bytes, another shape
    resign(pkg, doc, ids["hosp-a"])
    with pytest.raises(E.TensorMismatch) as exc:
        verify_package(pkg, trust, expected_tensors=CheckpointReader(models[0]), require_sealed=False)
    assert exc.value.tensor == t["name"]
    t["dtype"] = "BF16"  # bytes no longer match shape x dtype
    resign(pkg, doc, ids["hosp-a"])
    with pytest.raises(E.ManifestInvalid, match="nbytes"):
        verify_package(pkg, trust, require_sealed=False)


def test_non_finite_values(models, ids, fingerprint, trust, tmp_path, copy_pkg):
    base, ft = models
    r = CheckpointReader(ft)
    with CheckpointWriter(tmp_path / "nan") as w:
        for n in r.names():
            t = r.get(n).clone()
            if n == "model.norm.weight":
                t[3] = float("nan")
            w.add(n, t)
        w.commit()
    with pytest.raises(E.NonFiniteValues) as exc:
        pack_delta(tmp_path / "nan", base, tmp_path / "pkg", ids["hosp-a"], 3, fingerprint, chunk_bytes=CHUNK)
    assert exc.value.tensor == "model.norm.weight"
    assert not (tmp_path / "pkg").exists() and not list(tmp_path.glob(".pkg.partial-*"))
    # A sender that skips the check (writes inf and signs the matching digest) is refused on arrival.
    import hashlib

    pkg = copy_pkg("plain")
    doc = load_manifest_dict(pkg)
    t = doc["tensors"][0]
    data = bytearray((pkg / t["file"]).read_bytes())
    data[t["offset"] : t["offset"] + 4] = torch.tensor([float("inf")]).numpy().tobytes()
    (pkg / t["file"]).write_bytes(data)
    t["sha256"] = hashlib.sha256(bytes(data[t["offset"] : t["offset"] + t["nbytes"]])).hexdigest()
    resign(pkg, doc, ids["hosp-a"])
    with pytest.raises(E.NonFiniteValues) as exc:
        verify_package(pkg, trust, require_sealed=False)
    assert exc.value.tensor == t["name"]


def test_truncated_and_oversized_data(copy_pkg, trust, tmp_path):
    pkg = copy_pkg("plain")
    f = pkg / "data-00000.bin"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(E.TruncatedData) as exc:
        verify_package(pkg, trust, require_sealed=False)
    last = load_manifest_dict(pkg)["tensors"][-1]["name"]
    assert exc.value.tensor == last
    f.write_bytes(data + b"\0")
    with pytest.raises(E.OversizedData):
        verify_package(pkg, trust, require_sealed=False)
    f.write_bytes(data)
    (pkg / "notes.txt").write_text("hello")
    with pytest.raises(E.OversizedData, match="notes.txt"):
        verify_package(pkg, trust, require_sealed=False)
    (pkg / "notes.txt").unlink()
    f.unlink()
    with pytest.raises(E.TruncatedData):
        verify_package(pkg, trust, require_sealed=False)
    (pkg / SIGNATURE_NAME).unlink()
    with pytest.raises(E.TruncatedData):
        verify_package(pkg, trust, require_sealed=False)


def test_a_failed_unpack_leaves_nothing(copy_pkg, trust, tmp_path):
    pkg = copy_pkg("plain")
    v = verify_package(pkg, trust, require_sealed=False)
    name, t = _big_tensor(pkg)
    data = bytearray((pkg / t["file"]).read_bytes())
    data[t["offset"] + 1] ^= 4
    (pkg / t["file"]).write_bytes(data)  # changed after verification
    with pytest.raises(E.DigestMismatch):
        v.unpack(tmp_path / "delta")
    assert not (tmp_path / "delta").exists() and not list(tmp_path.glob(".delta.partial-*"))


def test_pack_refuses_mismatched_reference(models, ids, tmp_path):
    base, ft = models
    from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral

    other = build_tiny_mistral(tmp_path / "other", TinyMistralSpec(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1), tokenizer=False)
    with pytest.raises(E.TensorMismatch):
        pack_delta(ft, other, tmp_path / "pkg", ids["hosp-a"], 1, "sha256:x")
    with pytest.raises(E.PackageError, match="exists"):
        pack_delta(ft, base, tmp_path / "other", ids["hosp-a"], 1, "sha256:x")


def test_packing_asks_the_source_for_row_slices_no_bigger_than_a_chunk(models, ids, fingerprint, trust, tmp_path):
    """Memory is bounded by a chunk: an engine delta source is only ever asked for a few rows."""
    from fedmerge.merging.taskvector import TaskVector

    base, ft = models
    tv = TaskVector(ft, base)
    asked: list[tuple[str, int]] = []

    class Recording:
        label = "recording"
        names, info = tv.names, tv.info

        def get_delta(self, name, *, rows=None, base=None):
            d = tv.get_delta(name, rows=rows)
            asked.append((name, d.numel() * 4))
            return d

    pkg = pack_delta(Recording(), None, tmp_path / "pkg", ids["hosp-a"], 3, fingerprint, chunk_bytes=CHUNK)
    big = {t.name for t in verify_package(pkg, trust, require_sealed=False).manifest.tensors if t.nbytes > CHUNK and len(t.shape) == 2}
    assert big and all(n <= CHUNK for name, n in asked if name in big)
    assert {name for name, _ in asked} >= big


@pytest.mark.parametrize("chunk_bytes,dtype,torch_dtype", [(2056, "float32", torch.float32), (1000, "float32", torch.float32), (2056, "bfloat16", torch.bfloat16)])
def test_chunks_that_do_not_align_with_rows(chunk_bytes, dtype, torch_dtype, models, ids, fingerprint, trust, tmp_path):
    """Chunks cutting rows in the middle (computed from row slices) or rows wider than a chunk."""
    base, ft = models
    pkg = pack_delta(ft, base, tmp_path / "pkg", ids["hosp-a"], 3, fingerprint, seal_to=ids["coord"].public, dtype=dtype, chunk_bytes=chunk_bytes)
    verify_package(pkg, trust, opener=ids["coord"], unpack_to=tmp_path / "delta")
    _assert_folder_equals(tmp_path / "delta", _expected_deltas(models, torch_dtype))
