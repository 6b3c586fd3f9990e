"""Resource limits: what a hostile sender can make the verifier read, parse, hold or wait for."""

from __future__ import annotations

import os
import shutil
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sec_helpers import load_manifest_dict, resign, sign_raw

from fedmerge.checkpoints import MalformedSafetensors
from fedmerge.security import errors as E
from fedmerge.security.manifest import MANIFEST_NAME, MAX_CHUNK_BYTES, MAX_MANIFEST_BYTES, SIGNATURE_NAME, chunk_count, parse_manifest
from fedmerge.security.pack import pack_delta
from fedmerge.security.verify import DataCheck, read_signed_manifest, verify_package

CHUNK = 2048


def _in_thread(fn, timeout: float = 60.0):
    """Run ``fn`` in a thread; the exception it raised, or a failure if it is still blocked."""
    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as exc:  # handed back to the test
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still blocked after {timeout} s"
    return box.get("exc")


# -- the signature is checked over the raw bytes before anything is parsed -------------------------
def test_an_oversized_manifest_is_refused_before_it_is_read(copy_pkg, trust, ids):
    pkg = copy_pkg("sealed")
    with open(pkg / MANIFEST_NAME, "wb") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk, and nothing may read it
    with pytest.raises(E.OversizedData) as exc:
        verify_package(pkg, trust, opener=ids["coord"])
    assert str(pkg / MANIFEST_NAME) in str(exc.value) and str(MAX_MANIFEST_BYTES) in str(exc.value)


def test_an_unsigned_manifest_that_is_not_even_json_is_refused_by_its_signature(copy_pkg, trust, ids):
    """Garbage under a valid-looking signature file: SignatureInvalid, never ManifestInvalid,
    which shows the parser never saw it."""
    pkg = copy_pkg("sealed")
    (pkg / MANIFEST_NAME).write_bytes(b"[" * 100_000)  # would be a RecursionError to a parser
    with pytest.raises(E.SignatureInvalid) as exc:
        verify_package(pkg, trust, opener=ids["coord"])
    assert exc.value.sender == "hosp-a" and str(pkg / MANIFEST_NAME) in str(exc.value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=st.binary(max_size=2000))
def test_any_unsigned_manifest_bytes_fail_on_the_signature_first(packages, trust, tmp_path_factory, raw):
    pkg = tmp_path_factory.mktemp("raw") / "pkg"
    shutil.copytree(packages["sealed"], pkg)
    (pkg / MANIFEST_NAME).write_bytes(raw)
    try:
        with pytest.raises(E.SignatureInvalid):
            read_signed_manifest(pkg, trust)
    finally:
        shutil.rmtree(pkg.parent, ignore_errors=True)


def test_a_signature_file_from_an_unknown_signer_stops_before_the_manifest(copy_pkg, trust, ids):
    pkg = copy_pkg("sealed")
    resign(pkg, load_manifest_dict(pkg), ids["hosp-x"])
    (pkg / MANIFEST_NAME).write_bytes(b"x" * 1000)  # never read: the signer is unknown
    with pytest.raises(E.UnknownSender) as exc:
        verify_package(pkg, trust, opener=ids["coord"])
    assert exc.value.sender == "hosp-x"


# -- chunk size -----------------------------------------------------------------------------------
def test_pack_refuses_chunks_above_64_mib(models, ids, fingerprint, tmp_path):
    base, ft = models
    with pytest.raises(E.PackageError, match="chunk_bytes") as exc:
        pack_delta(ft, base, tmp_path / "pkg", ids["hosp-a"], 1, fingerprint, chunk_bytes=MAX_CHUNK_BYTES + 8)
    assert "64 MiB" in str(exc.value)
    assert not (tmp_path / "pkg").exists() and not list(tmp_path.glob(".pkg.partial-*"))


def test_a_signed_package_declaring_1_gib_chunks_is_refused_before_any_data_is_read(copy_pkg, trust, ids):
    """An enrolled sender who picks huge chunks (the verifier holds a few chunks at a time)."""
    pkg = copy_pkg("plain")
    doc = load_manifest_dict(pkg)
    doc["chunk_bytes"] = 1 << 30
    for t in doc["tensors"]:
        t["chunks"] = chunk_count(t["nbytes"], 1 << 30)
    resign(pkg, doc, ids["hosp-a"])
    os.unlink(pkg / doc["files"][0]["name"])  # nothing of the data may be needed to refuse it
    with pytest.raises(E.ManifestInvalid, match="chunk_bytes") as exc:
        verify_package(pkg, trust, require_sealed=False)
    assert str(pkg / MANIFEST_NAME) in str(exc.value)
    with pytest.raises(E.ManifestInvalid, match=str(MAX_CHUNK_BYTES)):
        parse_manifest((pkg / MANIFEST_NAME).read_bytes())


def test_chunks_in_flight_stay_within_the_byte_budget(copy_pkg, trust, ids):
    """However many chunks a package has, verifying holds at most the budget's bytes of them."""
    pkg = copy_pkg("sealed")
    manifest, sender_key = read_signed_manifest(pkg, trust)
    from fedmerge.security.verify import sealer_for

    chunks = sum(t.chunks for t in manifest.tensors)
    assert chunks > 40
    budget = 3 * 2 * (CHUNK + 16)  # three sealed chunks, each counted twice (read + opened)
    check = DataCheck(pkg, manifest, sealer_for(manifest, ids["coord"], sender_key), None, workers=4, in_flight_bytes=budget)
    check.run()
    assert 0 < check.budget.peak <= budget and check.budget.held == 0


# -- only plain files, never a wait ---------------------------------------------------------------
@pytest.mark.parametrize("victim", [MANIFEST_NAME, SIGNATURE_NAME, "data-00000.bin"])
def test_a_fifo_in_a_package_is_refused_without_blocking(victim, copy_pkg, trust, ids):
    pkg = copy_pkg("sealed")
    os.unlink(pkg / victim)
    os.mkfifo(pkg / victim)
    exc = _in_thread(lambda: verify_package(pkg, trust, opener=ids["coord"]))
    assert isinstance(exc, E.NotAPlainFile), exc
    assert str(pkg / victim) in str(exc) and "FIFO" in str(exc)


def test_a_fifo_under_an_unlisted_name_is_refused_too(copy_pkg, trust, ids):
    pkg = copy_pkg("sealed")
    os.mkfifo(pkg / "notes.txt")
    exc = _in_thread(lambda: verify_package(pkg, trust, opener=ids["coord"]))
    assert isinstance(exc, E.NotAPlainFile) and "notes.txt" in str(exc)


@pytest.mark.parametrize("victim", [MANIFEST_NAME, SIGNATURE_NAME, "data-00000.bin"])
def test_a_symbolic_link_in_a_package_is_refused(victim, copy_pkg, trust, ids, tmp_path):
    pkg = copy_pkg("sealed")
    real = tmp_path / f"real-{victim}"
    shutil.move(pkg / victim, real)
    os.symlink(real, pkg / victim)  # same bytes, but a package holds only plain files
    with pytest.raises(E.NotAPlainFile) as exc:
        verify_package(pkg, trust, opener=ids["coord"])
    assert "symbolic link" in str(exc.value) and victim in str(exc.value)


def test_a_folder_inside_a_package_is_refused(copy_pkg, trust, ids):
    pkg = copy_pkg("sealed")
    (pkg / "sub").mkdir()
    with pytest.raises(E.NotAPlainFile, match="folder"):
        verify_package(pkg, trust, opener=ids["coord"])


def test_a_fifo_trust_store_is_refused_without_blocking(tmp_path):
    from fedmerge.security.trust import TrustStore

    os.mkfifo(tmp_path / "trust.json")
    exc = _in_thread(lambda: TrustStore.load(tmp_path / "trust.json", None, allow_unsigned=True))
    assert isinstance(exc, E.TrustStoreError) and "FIFO" in str(exc) and "trust.json" in str(exc)


# -- malformed safetensors on every package path ------------------------------------------------------
def _corrupt_header(folder):
    f = folder / "model.safetensors"
    header = b'{"a":' * 20_000 + b"1" + b"}" * 20_000  # nested past any recursion limit
    f.write_bytes(struct.pack("<Q", len(header)) + header)
    return f


def test_pack_refuses_a_malformed_model_or_reference_with_a_typed_error(models, ids, fingerprint, tmp_path):
    base, ft = models
    for which in ("model", "reference"):
        bad = tmp_path / which
        shutil.copytree(ft if which == "model" else base, bad)
        f = _corrupt_header(bad)
        args = (bad, base) if which == "model" else (ft, bad)
        with pytest.raises(MalformedSafetensors) as exc:
            pack_delta(*args, tmp_path / f"pkg-{which}", ids["hosp-a"], 1, fingerprint, chunk_bytes=CHUNK)
        assert str(f) in str(exc.value)


def test_unpack_against_a_malformed_reference_is_a_typed_error(packages, ids, models, tmp_path, capsys):
    from fedmerge.cli import main

    bad = tmp_path / "ref"
    shutil.copytree(models[0], bad)
    f = _corrupt_header(bad)
    store = tmp_path / "trust.json"
    from fedmerge.security.trust import TrustStore

    t = TrustStore(path=store)
    t.add(ids["hosp-a"].public)
    t.add(ids["coord"].public, role="coordinator")
    t.sign(ids["coord"])
    t.save()
    pub = tmp_path / "coord.pub.json"
    pub.write_text(ids["coord"].public.to_json())
    code = main(["delta", "unpack", str(packages["sealed"]), str(tmp_path / "out"), "--trust", str(store), "--coordinator-pub", str(pub), "--key", str(ids["coord"].key_file), "--reference", str(bad)])
    err = capsys.readouterr().err
    assert code == 1 and str(f) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_manifest_signed_raw_but_not_canonical_is_refused_by_the_parser(copy_pkg, trust, ids):
    pkg = copy_pkg("plain")
    raw = (pkg / MANIFEST_NAME).read_bytes()
    sign_raw(pkg, raw + b" ", ids["hosp-a"])
    with pytest.raises(E.ManifestInvalid):
        verify_package(pkg, trust, require_sealed=False)
