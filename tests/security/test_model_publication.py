"""Fresh, bound publications: round and fingerprint signed, the pinned coordinator required."""

from __future__ import annotations

import json
import shutil

import pytest

from fedmerge.checkpoints import CheckpointReader, model_fingerprint
from fedmerge.security import errors as E
from fedmerge.security.manifest import signature_doc, signature_payload
from fedmerge.security.model_sign import PUBLICATION_NAME, PUBLICATION_SIG_NAME, sign_model, verify_model


@pytest.fixture
def round7(models, ids, trust, tmp_path):
    folder = tmp_path / "round-7"
    shutil.copytree(models[1], folder)
    sign_model(folder, ids["coord"], round_id=7, trust=trust)
    return folder


def test_the_signed_round_and_fingerprint_are_what_verify_returns(round7, trust, ids):
    pub = verify_model(round7, trust, coordinator=ids["coord"].public, expected_round=7, newer_than=6)
    assert (pub.signer, pub.round) == ("coord", 7)
    assert pub.fingerprint == model_fingerprint(CheckpointReader(round7))
    doc = json.loads((round7 / PUBLICATION_NAME).read_bytes())
    assert doc["round"] == 7 and doc["fingerprint"] == pub.fingerprint


def test_a_publication_must_name_its_round(models, ids, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(models[1], folder)
    for bad in (None, -1, "3", True):
        with pytest.raises(E.SecurityError, match="round"):
            sign_model(folder, ids["coord"], round_id=bad, fingerprint="sha256:x")
    assert not (folder / PUBLICATION_NAME).exists()


def test_a_publication_with_a_null_round_is_refused(round7, trust, ids):
    """What the coordinator used to sign: ``round: null``. Validly signed, it is still refused."""
    doc = json.loads((round7 / PUBLICATION_NAME).read_bytes())
    doc["round"] = None
    from fedmerge.security.manifest import canonical_bytes

    raw = canonical_bytes(doc)
    (round7 / PUBLICATION_NAME).write_bytes(raw)
    coord = ids["coord"]
    (round7 / PUBLICATION_SIG_NAME).write_bytes(signature_doc(coord.name, coord.public.key_id, coord.sign(signature_payload("model", raw))))
    with pytest.raises(E.ManifestInvalid, match="round") as exc:
        verify_model(round7, trust)
    assert PUBLICATION_NAME in str(exc.value)


def test_rollback_to_an_older_round_is_refused(round7, trust, ids):
    with pytest.raises(E.StalePublication, match="not newer than the installed round 7") as exc:
        verify_model(round7, trust, coordinator=ids["coord"].public, newer_than=7)
    assert exc.value.sender == "coord" and str(round7) in str(exc.value)
    with pytest.raises(E.StalePublication):
        verify_model(round7, trust, newer_than=9)
    with pytest.raises(E.StalePublication, match="expected round 8"):
        verify_model(round7, trust, expected_round=8)


def test_only_the_pinned_coordinator_is_accepted(models, trust, ids, tmp_path):
    folder = tmp_path / "by-coord-2"
    shutil.copytree(models[1], folder)
    sign_model(folder, ids["coord-2"], round_id=8, trust=trust)  # an enrolled coordinator...
    assert verify_model(folder, trust).signer == "coord-2"
    with pytest.raises(E.WrongPublisher) as exc:  # ...but not the one this client pinned
        verify_model(folder, trust, coordinator=ids["coord"].public)
    assert "coord-2" in str(exc.value) and ids["coord"].public.key_id in str(exc.value) and str(folder) in str(exc.value)


def test_a_publication_from_a_key_with_the_pinned_name_but_other_keys_is_refused(models, trust, ids, tmp_path):
    from fedmerge.security.keys import generate_identity

    impostor = generate_identity("coord", tmp_path / "impostor")
    folder = tmp_path / "m"
    shutil.copytree(models[1], folder)
    sign_model(folder, ids["coord"], round_id=2, fingerprint="sha256:x")
    with pytest.raises(E.WrongPublisher):
        verify_model(folder, trust, coordinator=impostor.public)


def test_the_publication_signature_is_checked_before_it_is_parsed(round7, trust):
    (round7 / PUBLICATION_NAME).write_bytes(b"[" * 50_000)
    with pytest.raises(E.SignatureInvalid):
        verify_model(round7, trust)


def test_verify_model_round_n_passes_on_a_genuine_round_n_model_from_the_cli(round7, trust, ids, tmp_path, capsys):
    from fedmerge.cli import main

    trust.sign(ids["coord"])
    trust.save()
    pub = tmp_path / "coord.pub.json"
    pub.write_text(ids["coord"].public.to_json())
    args = ["verify-model", str(round7), "--trust", str(trust.path), "--coordinator-pub", str(pub)]
    assert main([*args, "--round", "7"]) == 0
    assert "pinned coordinator coord, round 7" in capsys.readouterr().out
    assert main([*args, "--round", "6"]) == 1
    assert "published for round 7, expected round 6" in capsys.readouterr().err
    assert main([*args, "--newer-than", "7"]) == 1
    assert "not newer" in capsys.readouterr().err
