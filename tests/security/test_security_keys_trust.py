"""Identities (key files, permissions, passphrases) and the trust store."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fedmerge.security import errors as E
from fedmerge.security.keys import PublicIdentity, generate_identity, load_identity
from fedmerge.security.trust import TrustStore


def test_generated_keys_are_private_and_reload_to_the_same_identity(tmp_path):
    ident = generate_identity("hosp-a", tmp_path)
    key, pub = tmp_path / "hosp-a.key", tmp_path / "hosp-a.pub.json"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "PRIVATE KEY" in key.read_text() and "PRIVATE" not in pub.read_text()
    again = load_identity(ident)  # the returned identity is path-like
    assert again.public == ident.public == PublicIdentity.load(pub)
    sig = again.sign(b"hello")
    assert ident.public.verify(sig, b"hello") and not ident.public.verify(sig, b"hellO")
    with pytest.raises(E.KeyFileError, match="already exists"):
        generate_identity("hosp-a", tmp_path)


def test_passphrase_protects_the_private_keys(tmp_path):
    ident = generate_identity("coord", tmp_path, passphrase="correct horse")
    text = (tmp_path / "coord.key").read_text()
    assert "ENCRYPTED PRIVATE KEY" in text
    with pytest.raises(E.PassphraseError, match="encrypted"):
        load_identity(tmp_path / "coord.key")
    with pytest.raises(E.PassphraseError, match="wrong passphrase"):
        load_identity(tmp_path / "coord.key", passphrase="battery staple")
    assert load_identity(tmp_path / "coord.key", passphrase=b"correct horse").public == ident.public


def test_a_key_readable_by_others_is_refused(tmp_path):
    generate_identity("hosp-a", tmp_path)
    os.chmod(tmp_path / "hosp-a.key", 0o644)
    with pytest.raises(E.KeyFileError, match="chmod 600"):
        load_identity(tmp_path / "hosp-a.key")


@pytest.mark.parametrize("bad", ["", "../etc", "a b", "x" * 65, "-lead"])
def test_identity_names_are_checked(bad, tmp_path):
    with pytest.raises(E.KeyFileError):
        generate_identity(bad, tmp_path)


def test_damaged_key_and_public_files(tmp_path):
    generate_identity("hosp-a", tmp_path)
    pub = json.loads((tmp_path / "hosp-a.pub.json").read_text())
    pub["signing_key"] = pub["signing_key"][:-4] + "AAA="
    (tmp_path / "p.json").write_text(json.dumps(pub))
    with pytest.raises(E.KeyFileError, match="key_id"):
        PublicIdentity.load(tmp_path / "p.json")
    k = tmp_path / "hosp-a.key"
    k.write_text("{not json")
    with pytest.raises(E.KeyFileError):
        load_identity(k)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_trust_store_add_revoke_list_round_trip(suffix, ids, tmp_path):
    path = tmp_path / f"trust{suffix}"
    store = TrustStore.open_for_editing(path, create=True)
    store.add(ids["hosp-a"].public)
    store.add(ids["coord"].public, role="coordinator")
    store.save()
    again = TrustStore.load(path, None, allow_unsigned=True)
    assert [(e.name, e.role, e.status) for e in again.entries()] == [("coord", "coordinator", "enrolled"), ("hosp-a", "institution", "enrolled")]
    assert again.require("hosp-a").public == ids["hosp-a"].public
    assert [e.name for e in again.coordinators()] == ["coord"]
    again.revoke("hosp-a", reason="left the consortium")
    again.save()
    third = TrustStore.load(path, None, allow_unsigned=True)
    e = third.get("hosp-a")
    assert e.status == "revoked" and e.revoked_at and e.reason == "left the consortium"
    with pytest.raises(E.RevokedSender):
        third.require("hosp-a")
    assert third.get("nobody") is None
    with pytest.raises(E.UnknownSender):
        third.require("nobody")
    with pytest.raises(E.RoleNotAllowed):
        third.require("coord", role="institution")


def test_trust_store_refuses_silent_changes(ids, tmp_path):
    store = TrustStore(path=tmp_path / "t.json")
    store.add(ids["hosp-a"].public)
    assert store.add(ids["hosp-a"].public) == store.get("hosp-a")  # idempotent
    with pytest.raises(E.TrustStoreError, match="replace"):
        store.add(ids["hosp-b"].public, name="hosp-a")
    store.revoke("hosp-a")
    with pytest.raises(E.TrustStoreError, match="revoked"):
        store.add(ids["hosp-a"].public)
    with pytest.raises(E.UnknownSender):
        store.revoke("nobody")


@pytest.mark.parametrize(
    "text,match",
    [("[]", "mapping"), ('{"format": "other"}', "format"), ('{"format": "fedmerge-trust/1", "members": {"a": {"role": "king"}}}', "signing_key"), ("{", "JSON")],
)
def test_malformed_trust_stores(text, match, tmp_path):
    p = tmp_path / "t.json"
    p.write_text(text)
    with pytest.raises(E.TrustStoreError, match=match):
        TrustStore.load(p, None, allow_unsigned=True)
    with pytest.raises(E.TrustStoreError, match="no such trust store"):
        TrustStore.load(tmp_path / "missing.json", None, allow_unsigned=True)


def test_trust_store_signed_by_a_pinned_coordinator(trust, ids):
    trust.sign(ids["coord"])
    trust.save()
    store = TrustStore.load(trust.path, ids["coord"].public)
    assert store.status.state == "verified" and store.status.pinned_key_id == ids["coord"].public.key_id
    store.verify_signed_by(ids["coord"].public)
    with pytest.raises(E.SignatureInvalid, match="not signed by"):
        store.verify_signed_by(ids["coord-2"].public)
    with pytest.raises(E.TrustStoreSignatureInvalid, match="not signed by"):
        TrustStore.load(trust.path, ids["coord-2"].public, allow_unsigned=True)
    data = json.loads(trust.path.read_text())
    data["members"]["hosp-b"]["role"] = "coordinator"  # an edit after signing
    trust.path.write_text(json.dumps(data))
    with pytest.raises(E.SignatureInvalid, match="edited"):
        TrustStore.load(trust.path, ids["coord"].public)
    with pytest.raises(E.RoleNotAllowed):
        store.sign(ids["hosp-a"])
