"""Sealing as policy: unsealed packages refused unless allowed, and a sealed package bound to its sender."""

from __future__ import annotations

import pytest
from sec_helpers import load_manifest_dict, resign

from fedmerge.security import errors as E
from fedmerge.security.verify import verify_package


def test_an_unsealed_package_is_refused_by_default(packages, trust):
    with pytest.raises(E.UnsealedPackage) as exc:
        verify_package(packages["plain"], trust)
    assert exc.value.sender == "hosp-a" and str(packages["plain"]) in str(exc.value) and "seal" in str(exc.value)
    assert verify_package(packages["plain"], trust, require_sealed=False).data_checked


def test_an_unsealed_package_is_refused_before_its_data_is_read(copy_pkg, trust):
    pkg = copy_pkg("plain")
    (pkg / "data-00000.bin").write_bytes(b"")  # even a truncated package fails on the policy first
    with pytest.raises(E.UnsealedPackage):
        verify_package(pkg, trust)


def test_a_hospital_resigning_anothers_sealed_package_as_its_own_fails_authentication(copy_pkg, trust, ids):
    """hosp-b takes hosp-a's sealed package, names itself as sender and signs it: the signature is
    valid, but the coordinator derives the AES key for hosp-b and every chunk fails."""
    pkg = copy_pkg("sealed")
    doc = load_manifest_dict(pkg)
    doc["sender"] = "hosp-b"
    resign(pkg, doc, ids["hosp-b"])
    with pytest.raises(E.ChunkAuthenticationFailed) as exc:
        verify_package(pkg, trust, expected_round=3, opener=ids["coord"])
    assert exc.value.sender == "hosp-b" and exc.value.tensor == doc["tensors"][0]["name"]
    # Its manifest-level checks pass (it IS signed by hosp-b): only the data refuses it.
    assert not verify_package(pkg, trust, opener=ids["coord"], check_data=False).data_checked


def test_the_key_derivation_binds_the_senders_signing_key(packages, ids):
    """Same sender id, another signing key (a rotated or impostor key): the AEAD refuses."""
    from fedmerge.security.seal import TAG_BYTES
    from fedmerge.security.verify import read_manifest, sealer_for

    m = read_manifest(packages["sealed"])
    t = m.tensors[0]
    ct = (packages["sealed"] / t.file).read_bytes()[t.offset : t.offset + min(m.chunk_bytes, t.nbytes) + TAG_BYTES]
    assert sealer_for(m, ids["coord"], ids["hosp-a"].public.signing_key).open(0, t.name, 0, t.chunks, ct)
    with pytest.raises(E.ChunkAuthenticationFailed):
        sealer_for(m, ids["coord"], ids["hosp-b"].public.signing_key).open(0, t.name, 0, t.chunks, ct)


def test_a_package_sealed_under_the_previous_scheme_is_refused_by_name(copy_pkg, trust, ids):
    pkg = copy_pkg("sealed")
    doc = load_manifest_dict(pkg)
    doc["sealed"]["scheme"] = "x25519-hkdf-sha256-aes256gcm"
    resign(pkg, doc, ids["hosp-a"])
    with pytest.raises(E.ManifestInvalid, match="sealed.scheme"):
        verify_package(pkg, trust, opener=ids["coord"])


def test_delta_verify_of_a_sealed_package_without_the_key_fails_unless_manifest_only(packages, ids, trust, tmp_path, capsys, copy_pkg):
    from fedmerge.cli import main

    trust.sign(ids["coord"])
    trust.save()
    pub = tmp_path / "coord.pub.json"
    pub.write_text(ids["coord"].public.to_json())
    pkg = copy_pkg("sealed")
    m = load_manifest_dict(pkg)
    data = bytearray((pkg / "data-00000.bin").read_bytes())
    data[m["tensors"][0]["offset"] + 3] ^= 0x10  # one ciphertext byte flipped
    (pkg / "data-00000.bin").write_bytes(data)
    args = ["delta", "verify", str(pkg), "--trust", str(trust.path), "--coordinator-pub", str(pub)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "sealed" in err and "coord" in err
    assert main([*args, "--manifest-only"]) == 0
    out = capsys.readouterr().out
    assert "MANIFEST ONLY" in out and "NOT checked" in out
    assert main([*args, "--key", str(ids["coord"].key_file)]) == 1
    assert "fails authentication" in capsys.readouterr().err
    # An unsealed package needs --allow-unsealed.
    plain = ["delta", "verify", str(packages["plain"]), "--trust", str(trust.path), "--coordinator-pub", str(pub)]
    assert main(plain) == 1 and "not sealed" in capsys.readouterr().err
    assert main([*plain, "--allow-unsealed"]) == 0 and "NOT sealed" in capsys.readouterr().out
