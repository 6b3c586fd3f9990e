"""The security commands end to end, as an operator types them."""

from __future__ import annotations

import json
import stat

import torch

from fedmerge.cli import main
from fedmerge.checkpoints import CheckpointReader


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_keys_trust_pack_verify_unpack_publish(models, tmp_path, capsys):
    base, ft = models
    keys, store = tmp_path / "keys", tmp_path / "consortium.yaml"
    pw = tmp_path / "pw.txt"
    pw.write_text("s3cret\n")
    assert run(capsys, "keys", "generate", "st-marys", "--out", keys)[0] == 0
    code, out, _ = run(capsys, "keys", "generate", "coord", "--out", keys, "--passphrase-file", pw)
    assert code == 0 and "encrypted" in out
    assert stat.S_IMODE((keys / "coord.key").stat().st_mode) == 0o600
    code, out, _ = run(capsys, "keys", "export", keys / "coord.key", "--passphrase-file", pw)
    assert code == 0 and json.loads(out) == json.loads((keys / "coord.pub.json").read_text())
    code, _, err = run(capsys, "keys", "export", keys / "coord.key")
    assert code == 1 and "passphrase" in err

    assert run(capsys, "trust", "add", store, keys / "st-marys.pub.json")[0] == 0
    assert run(capsys, "trust", "add", store, keys / "coord.pub.json", "--role", "coordinator")[0] == 0
    assert run(capsys, "trust", "sign", store, "--key", keys / "coord.key", "--passphrase-file", pw)[0] == 0
    pin = ("--trust", store, "--coordinator-pub", keys / "coord.pub.json")
    code, out, _ = run(capsys, "trust", "list", store, "--coordinator-pub", keys / "coord.pub.json")
    assert code == 0 and "st-marys" in out and "coordinator" in out and "2 members" in out and "verified against the pinned key of 'coord'" in out

    pkg = tmp_path / "pkg"
    code, out, err = run(capsys, "delta", "pack", ft, "--reference", base, "--out", pkg, "--key", keys / "st-marys.key", "--round", 2, "--seal-to", "coord", *pin, "--chunk-mib", 0.01)
    assert code == 0, err
    assert "sealed to coord" in out
    code, out, _ = run(capsys, "delta", "verify", pkg, *pin, "--round", 2, "--reference", base, "--manifest-only")
    assert code == 0 and "data was NOT checked" in out
    code, out, _ = run(capsys, "delta", "verify", pkg, *pin, "--key", keys / "coord.key", "--passphrase-file", pw, "--round", 2, "--reference", base)
    assert code == 0 and "valid package from st-marys" in out and "NOT checked" not in out
    code, _, err = run(capsys, "delta", "verify", pkg, *pin, "--round", 3)
    assert code == 1 and "round 2, expected round 3" in err

    guard = tmp_path / "guard.json"
    delta = tmp_path / "delta"
    args = (*pin, "--key", keys / "coord.key", "--passphrase-file", pw, "--replay-guard", guard)
    code, out, err = run(capsys, "delta", "unpack", pkg, delta, *args)
    assert code == 0, err
    got, m, b = CheckpointReader(delta), CheckpointReader(ft), CheckpointReader(base)
    for name in m.names():
        assert torch.equal(got.get(name), m.get(name).float() - b.get(name).float())
    code, _, err = run(capsys, "delta", "unpack", pkg, tmp_path / "again", *args)
    assert code == 1 and "already accepted" in err and not (tmp_path / "again").exists()

    # Revocation takes effect at once.
    assert run(capsys, "trust", "revoke", store, "st-marys", "--reason", "key leaked")[0] == 0
    assert run(capsys, "trust", "sign", store, "--key", keys / "coord.key", "--passphrase-file", pw)[0] == 0
    code, _, err = run(capsys, "delta", "verify", pkg, *pin)
    assert code == 1 and "revoked" in err and "key leaked" in err

    # The coordinator publishes a model; clients check it.
    code, _, err = run(capsys, "sign-model", delta, "--key", keys / "coord.key", "--passphrase-file", pw, "--round", 2, "--trust", store)
    assert code == 0, err
    code, out, _ = run(capsys, "verify-model", delta, *pin, "--round", 2)
    assert code == 0 and "valid publication by the pinned coordinator coord" in out and "round 2" in out
    (delta / "fedmerge.json").write_text("{}")
    code, _, err = run(capsys, "verify-model", delta, *pin)
    assert code == 1 and "fedmerge.json" in err


def test_trust_store_signature_commands(tmp_path, capsys):
    keys, store = tmp_path / "keys", tmp_path / "trust.json"
    run(capsys, "keys", "generate", "coord", "--out", keys)
    run(capsys, "trust", "add", store, keys / "coord.pub.json", "--role", "coordinator")
    assert run(capsys, "trust", "sign", store, "--key", keys / "coord.key")[0] == 0
    assert run(capsys, "trust", "verify", store, "--pinned", keys / "coord.pub.json")[0] == 0
    run(capsys, "keys", "generate", "hosp", "--out", keys)
    run(capsys, "trust", "add", store, keys / "hosp.pub.json")  # any change drops the signature
    code, _, err = run(capsys, "trust", "verify", store, "--coordinator-pub", keys / "coord.pub.json")
    assert code == 1 and "not signed" in err
