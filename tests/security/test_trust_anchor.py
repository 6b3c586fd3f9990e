"""The trust store is anchored by a pinned coordinator key and checked wherever it is loaded."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmerge.cli import main
from fedmerge.security import errors as E
from fedmerge.security.keys import generate_identity
from fedmerge.security.model_sign import sign_model, verify_model
from fedmerge.security.trust import TrustStore
from fedmerge.security.verify import verify_package


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def signed(trust, ids):
    """The fixture store (hosp-a, hosp-b, coord, coord-2), signed by coord and saved."""
    trust.sign(ids["coord"])
    trust.save()
    return trust.path


def _enrol_mallory(path, ids) -> None:
    """What the attacker did: add a member to a signed store by hand, keeping the old signature."""
    data = json.loads(path.read_text())
    pub = ids["hosp-x"].public.to_dict()
    data["members"]["mallory"] = {"role": "institution", "signing_key": pub["signing_key"], "encryption_key": pub["encryption_key"], "status": "enrolled", "enrolled_at": ""}
    path.write_text(json.dumps(data))


# -- load: verified, unsigned only on request, never a broken signature ---------------------------
def test_a_signed_store_loads_verified_against_its_pinned_coordinator(signed, ids):
    store = TrustStore.load(signed, ids["coord"].public)
    assert store.status.state == "verified" and store.status.signer == "coord"
    assert store.status.pinned_key_id == ids["coord"].public.key_id
    assert [e.name for e in store.entries()] == ["coord", "coord-2", "hosp-a", "hosp-b"]


def test_a_store_edited_after_signing_is_refused_even_with_the_unsigned_flag(signed, ids):
    _enrol_mallory(signed, ids)
    for allow in (False, True):
        with pytest.raises(E.TrustStoreSignatureInvalid) as exc:
            TrustStore.load(signed, ids["coord"].public, allow_unsigned=allow)
        assert str(signed) in str(exc.value) and "edited" in str(exc.value)


def test_a_store_signed_by_another_enrolled_coordinator_is_refused(trust, ids):
    trust.sign(ids["coord-2"])
    trust.save()
    with pytest.raises(E.TrustStoreSignatureInvalid, match="not signed by the pinned coordinator 'coord'") as exc:
        TrustStore.load(trust.path, ids["coord"].public)
    assert str(trust.path) in str(exc.value)


def test_a_signed_store_without_a_pinned_key_is_refused_with_how_to_pin(signed):
    with pytest.raises(E.TrustStoreUnverified) as exc:
        TrustStore.load(signed, None)
    msg = str(exc.value)
    assert str(signed) in msg and "--coordinator-pub" in msg and "coordinator_public_file" in msg


def test_an_unsigned_store_needs_the_explicit_flag(trust, ids):
    with pytest.raises(E.TrustStoreUnverified) as exc:
        TrustStore.load(trust.path, ids["coord"].public)
    assert str(trust.path) in str(exc.value) and "--allow-unsigned-trust" in str(exc.value)
    store = TrustStore.load(trust.path, ids["coord"].public, allow_unsigned=True)
    assert store.status.state == "unsigned" and len(store) == 4


def test_the_pinned_coordinator_must_be_enrolled_with_that_key(tmp_path, ids):
    """A store signed by the pinned key but enrolling another key under its name is refused."""
    other = generate_identity("coord", tmp_path / "other")  # same name, other keys
    store = TrustStore(path=tmp_path / "t.json")
    store.add(other.public, role="coordinator")
    store.sign(other)
    store.save()
    with pytest.raises(E.TrustStoreSignatureInvalid):
        TrustStore.load(store.path, ids["coord"].public)


def test_a_store_opened_for_editing_is_refused_by_every_verification(signed, ids, packages, models, tmp_path):
    editing = TrustStore.open_for_editing(signed)
    assert editing.status.state == "editing"
    with pytest.raises(E.TrustStoreUnverified, match="opened for editing"):
        verify_package(packages["sealed"], editing, opener=ids["coord"])
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(models[1], folder)
    sign_model(folder, ids["coord"], round_id=1, fingerprint="sha256:x")
    with pytest.raises(E.TrustStoreUnverified):
        verify_model(folder, editing)
    with pytest.raises(E.TrustStoreUnverified):
        sign_model(folder, ids["coord"], round_id=1, trust=editing)


def test_mallorys_package_is_never_verified_through_an_edited_store(signed, ids, models, fingerprint, tmp_path):
    """The issue's attack: a signed store edited to enrol mallory let mallory's packages through."""
    from fedmerge.security.pack import pack_delta

    _enrol_mallory(signed, ids)
    base, ft = models
    mallory = generate_identity("mallory", tmp_path / "m")
    data = json.loads(signed.read_text())
    data["members"]["mallory"]["signing_key"] = mallory.public.to_dict()["signing_key"]
    data["members"]["mallory"]["encryption_key"] = mallory.public.to_dict()["encryption_key"]
    signed.write_text(json.dumps(data))
    pack_delta(ft, base, tmp_path / "pkg", mallory, 3, fingerprint, seal_to=ids["coord"].public, chunk_bytes=4096)
    with pytest.raises(E.TrustStoreSignatureInvalid):
        TrustStore.load(signed, ids["coord"].public)
    # Parsing the file directly gives a store no verification accepts either.
    with pytest.raises(E.TrustStoreUnverified):
        verify_package(tmp_path / "pkg", TrustStore.from_text(signed.read_text(), signed), opener=ids["coord"])


# -- duplicates and key reuse ---------------------------------------------------------------------
def test_a_member_listed_twice_in_json_is_refused(trust, ids):
    text = trust.path.read_text()
    entry = json.dumps(json.loads(text)["members"]["hosp-b"])
    # JSON allows writing the same key twice; the old loader kept the last one.
    doubled = text.replace('"members": {', '"members": {"hosp-a": ' + entry + ",", 1)
    assert doubled.count('"hosp-a"') == 2
    trust.path.write_text(doubled)
    with pytest.raises(E.DuplicateMember) as exc:
        TrustStore.load(trust.path, ids["coord"].public, allow_unsigned=True)
    assert str(trust.path) in str(exc.value) and "'hosp-a'" in str(exc.value) and exc.value.sender == "hosp-a"


def test_a_member_listed_twice_in_yaml_is_refused(ids, tmp_path):
    store = TrustStore(path=tmp_path / "t.yaml")
    store.add(ids["hosp-a"].public)
    store.save()
    text = store.path.read_text()
    block = text[text.index("  hosp-a:"):]
    store.path.write_text(text + block)
    with pytest.raises(E.DuplicateMember) as exc:
        TrustStore.load(store.path, None, allow_unsigned=True)
    assert str(store.path) in str(exc.value) and "'hosp-a'" in str(exc.value)
    assert yaml.safe_load(store.path.read_text())["members"]["hosp-a"]  # plain YAML would have kept one


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), min_size=1, max_size=6, unique=True), data=st.data())
def test_any_duplicate_id_anywhere_in_the_members_is_refused(ids, tmp_path, names, data):
    entry = {"role": "institution", "signing_key": ids["hosp-a"].public.to_dict()["signing_key"], "encryption_key": ids["hosp-a"].public.to_dict()["encryption_key"]}
    pairs = [(n, entry) for n in names]
    dup = data.draw(st.sampled_from(names))
    pairs.insert(data.draw(st.integers(0, len(pairs))), (dup, entry))
    body = ",".join(f"{json.dumps(n)}: {json.dumps(e)}" for n, e in pairs)
    text = '{"format": "fedmerge-trust/1", "members": {' + body + "}}"
    with pytest.raises(E.DuplicateMember) as exc:
        TrustStore.from_text(text, tmp_path / "t.json")
    assert exc.value.sender == dup


def test_one_key_under_two_ids_is_refused_in_a_file_and_when_added(trust, ids):
    with pytest.raises(E.KeyReuse, match="'hosp-a'"):
        trust.add(ids["hosp-a"].public, name="hosp-a2")
    data = json.loads(trust.path.read_text())
    data["members"]["hosp-a2"] = dict(data["members"]["hosp-a"])
    trust.path.write_text(json.dumps(data))
    with pytest.raises(E.KeyReuse) as exc:
        TrustStore.load(trust.path, None, allow_unsigned=True)
    assert str(trust.path) in str(exc.value)


def test_a_revoked_key_is_never_enrolled_again(trust, ids):
    trust.revoke("hosp-a", reason="key leaked")
    with pytest.raises(E.TrustStoreError, match="revoked"):
        trust.add(ids["hosp-a"].public, replace=True)  # the same id, even with --replace
    with pytest.raises(E.TrustStoreError, match="revoked"):
        trust.add(ids["hosp-x"].public, name="hosp-a", replace=True)  # new keys under the revoked id
    with pytest.raises(E.KeyReuse, match="revoked") as exc:
        trust.add(ids["hosp-a"].public, name="hosp-a-new")  # the revoked key under a new id
    assert exc.value.sender == "hosp-a-new"
    assert trust.get("hosp-a-new") is None and trust.get("hosp-a").status == "revoked"


def test_rotated_out_keys_never_come_back(trust, ids, tmp_path):
    fresh = generate_identity("hosp-b", tmp_path / "rotated")
    old = ids["hosp-b"].public
    trust.add(fresh.public, replace=True)
    assert {k.key for k in trust.get("hosp-b").previous_keys} == {old.signing_key, old.encryption_key}
    with pytest.raises(E.KeyReuse, match="rotated out"):
        trust.add(old, replace=True)
    with pytest.raises(E.KeyReuse, match="rotated out"):
        trust.add(old, name="hosp-b2")
    trust.save()
    again = TrustStore.load(trust.path, None, allow_unsigned=True)  # the retired keys survive a save
    assert again.get("hosp-b").retired() == {old.signing_key, old.encryption_key}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_changed_byte_of_a_signed_store_is_refused_or_changes_nothing(signed, ids, data):
    """Property: whatever byte changes, the verified load refuses the store with a typed error, or
    (a change of spelling only, e.g. whitespace) yields exactly the members that were signed."""
    original = signed.read_bytes()
    want = TrustStore.load(signed, ids["coord"].public).to_dict()
    blob = bytearray(original)
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != original[pos]))
    signed.write_bytes(bytes(blob))
    try:
        got = TrustStore.load(signed, ids["coord"].public)
    except E.SecurityError:
        return
    finally:
        signed.write_bytes(original)
    assert got.to_dict() == want


# -- the command line -----------------------------------------------------------------------------
def test_trust_list_reports_the_verified_status_and_never_a_failed_signer(signed, ids, capsys, tmp_path):
    pub = tmp_path / "coord.pub.json"
    pub.write_text(ids["coord"].public.to_json())
    code, out, _ = run(capsys, "trust", "list", signed, "--coordinator-pub", pub)
    assert code == 0 and "verified against the pinned key of 'coord'" in out and ids["coord"].public.key_id in out
    code, out, _ = run(capsys, "trust", "list", signed)
    assert code == 0 and "NOT verified" in out and "--coordinator-pub" in out
    _enrol_mallory(signed, ids)
    code, out, _ = run(capsys, "trust", "list", signed, "--coordinator-pub", pub)
    assert code == 1 and "INVALID" in out and "mallory" in out
    assert "signed by" not in out and "verified against" not in out
    code, out, _ = run(capsys, "trust", "list", signed, "--coordinator-pub", pub, "--json")
    assert code == 1 and json.loads(out)["status"] == "invalid"
    store = TrustStore.open_for_editing(signed)
    store.signature = None
    store.save()
    code, out, _ = run(capsys, "trust", "list", signed, "--coordinator-pub", pub)
    assert code == 0 and "UNSIGNED" in out


def test_commands_refuse_an_unpinned_or_unsigned_store(signed, ids, packages, capsys, tmp_path):
    pub = tmp_path / "coord.pub.json"
    pub.write_text(ids["coord"].public.to_json())
    code, _, err = run(capsys, "delta", "verify", packages["sealed"], "--trust", signed, "--manifest-only")
    assert code == 1 and "--coordinator-pub" in err and str(signed) in err
    code, out, err = run(capsys, "delta", "verify", packages["sealed"], "--trust", signed, "--coordinator-pub", pub, "--manifest-only")
    assert code == 0, err
    _enrol_mallory(signed, ids)
    for extra in ((), ("--allow-unsigned-trust",)):
        code, _, err = run(capsys, "delta", "verify", packages["sealed"], "--trust", signed, "--coordinator-pub", pub, "--manifest-only", *extra)
        assert code == 1 and "edited" in err
    store = TrustStore.open_for_editing(signed)
    store.signature = None
    store.save()
    code, _, err = run(capsys, "verify-model", packages["sealed"], "--trust", signed, "--coordinator-pub", pub)
    assert code == 1 and "not signed" in err and "--allow-unsigned-trust" in err
