"""What each daemon refuses before it starts a single Flower process: a trust store its pinned
coordinator did not sign, and trust-deciding files that another user of the host could rewrite.

The daemons run as their commands, in this process (nothing they start exists yet when they refuse).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat

import pytest
from deployment_helpers import make_layout

from fedmerge.cli import main as fedmerge_main
from fedmerge.federation.client_daemon import ClientDaemon
from fedmerge.federation.coordinator_daemon import CoordinatorDaemon
from fedmerge.federation.credentials import require_owner_only_writable
from fedmerge.federation.errors import WritableByOthers
from fedmerge.security.errors import TrustStoreSignatureInvalid


@pytest.fixture
def layout(tmp_path, toy_models):
    return make_layout(tmp_path / "dep", toy_models, 2, rounds=1)


def _command(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = fedmerge_main(list(argv))
    return rc, err.getvalue()


def _enrol_mallory_by_hand(store, tmp_path):
    """The store, signature kept, with one more member written in by hand."""
    from fedmerge.security.keys import generate_identity

    data = json.loads(store.read_text())
    pub = generate_identity("mallory", tmp_path / "mallory").public.to_dict()
    data["members"]["mallory"] = {"role": "institution", "signing_key": pub["signing_key"], "encryption_key": pub["encryption_key"]}
    store.write_text(json.dumps(data))


def test_the_coordinator_refuses_an_edited_trust_store_before_starting_flower(layout, tmp_path):
    _enrol_mallory_by_hand(layout.toy.trust_store, tmp_path)
    rc, err = _command("coordinator", "--config", str(layout.toy.federation_config))
    assert rc == 1
    assert "fedmerge coordinator: error:" in err and str(layout.toy.trust_store) in err
    with pytest.raises(TrustStoreSignatureInvalid):
        CoordinatorDaemon(layout.toy.federation_config)
    assert not (layout.state / "superlink").exists()  # no SuperLink, no database, no log


def test_a_hospital_refuses_an_edited_trust_store_before_starting_flower(layout, tmp_path):
    _enrol_mallory_by_hand(layout.toy.trust_store, tmp_path)
    config = layout.client_config("hospital-a")
    rc, err = _command("client", "--config", str(config))
    assert rc == 1 and "fedmerge client: error:" in err and str(layout.toy.trust_store) in err
    with pytest.raises(TrustStoreSignatureInvalid):
        ClientDaemon(config)
    assert not (layout.toy.root / "clients" / "hospital-a" / "supernode").exists()


@pytest.mark.parametrize("mode, who", [(0o664, "its group"), (0o646, "every user")])
def test_a_pin_others_can_rewrite_is_refused_by_the_hospital(layout, mode, who):
    pin = layout.toy.coordinator_public
    os.chmod(pin, mode)
    with pytest.raises(WritableByOthers, match=rf"coordinator_public_file: {pin} is writable by {who} \(mode 0{mode:o}\).*chmod go-w"):
        ClientDaemon(layout.client_config("hospital-a"))
    os.chmod(pin, 0o644)
    ClientDaemon(layout.client_config("hospital-a"))  # the same files, owner-only writable: accepted


def test_a_node_key_in_a_folder_others_can_write_is_refused_by_the_coordinator(layout):
    """Whoever can rename a file over hospital-a's node key binds their own node to hospital-a."""
    folder = layout.node_keys["hospital-a"][1].parent
    os.chmod(folder, 0o777)
    try:
        with pytest.raises(WritableByOthers, match=r"supernode_public_keys\.hospital-a: .* is writable by every user \(mode 0777\)"):
            CoordinatorDaemon(layout.toy.federation_config)
        os.chmod(folder, 0o777 | stat.S_ISVTX)  # sticky, like /tmp: nobody renames another user's file
        CoordinatorDaemon(layout.toy.federation_config)
    finally:
        os.chmod(folder, 0o755)


def test_a_trust_file_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    store = tmp_path / "trust.json"
    store.write_text("{}")
    if os.getuid() == 0:
        os.chown(store, 4242, -1)
    else:  # this user's file, seen by a daemon running as someone else
        monkeypatch.setattr(os, "getuid", lambda: os.stat(store).st_uid + 1)
    with pytest.raises(WritableByOthers, match=rf"trust_store: {store} belongs to uid \d+, not to this user"):
        require_owner_only_writable(store, "trust_store")


def test_a_superlink_host_that_does_not_resolve_is_named():
    """A hospital waiting on a name that does not resolve says so, instead of blaming a coordinator that is not up."""
    from fedmerge.federation.client_daemon import unresolvable

    assert "the SuperLink's host 'coordinator.invalid' does not resolve" in unresolvable("coordinator.invalid:9092")
    assert unresolvable("127.0.0.2:9092") is None and unresolvable("[::1]:9092") is None
