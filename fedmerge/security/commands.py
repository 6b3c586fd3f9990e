"""CLI: ``keys``, ``trust``, ``delta pack|verify|unpack``, ``sign-model``, ``verify-model``.

Every command that verifies something against the trust store loads it verified: signed by the
coordinator pinned with ``--coordinator-pub``, or unsigned only with ``--allow-unsigned-trust``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


TRUST_PIN_HELP = "the coordinator's NAME.pub.json, obtained out of band: the trust store must carry a valid signature by it"


def _trust_args(p: argparse.ArgumentParser, *, required: bool = True, store: bool = True) -> None:
    """--trust STORE (unless the store is positional), --coordinator-pub FILE, --allow-unsigned-trust."""
    if store:
        p.add_argument("--trust", required=required, help="the consortium trust store (.json or .yaml)")
    p.add_argument("--coordinator-pub", metavar="FILE", help=TRUST_PIN_HELP)
    p.add_argument("--allow-unsigned-trust", action="store_true", help="accept an UNSIGNED trust store (local experiments only)")


def register(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser("keys", help="create and export institution / coordinator identities")
    ks = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = ks.add_parser("generate", help="new Ed25519 signing + X25519 encryption keys: NAME.key (0600) and NAME.pub.json")
    p.add_argument("name", help="institution or coordinator id (letters, digits, . _ -)")
    p.add_argument("--out", default=".", help="folder for the key files (default: current folder)")
    p.add_argument("--passphrase-file", help="encrypt the private keys with the passphrase in this file")
    p.add_argument("--force", action="store_true", help="replace an existing identity of that name")
    p.set_defaults(func=_cmd_keys_generate)
    p = ks.add_parser("export", help="print the public identity (JSON) of a key file or public file")
    p.add_argument("key", help="NAME.key or NAME.pub.json")
    p.add_argument("--passphrase-file", help="file holding the passphrase of the private key (when it is encrypted)")
    p.add_argument("--out", help="write the JSON to this file instead of stdout")
    p.set_defaults(func=_cmd_keys_export)

    trust = subparsers.add_parser("trust", help="edit, sign, list and verify the consortium trust store")
    ts = trust.add_subparsers(dest="trust_command", metavar="ACTION", required=True)
    p = ts.add_parser("add", help="enrol a public identity (creates the store if missing; drops its signature: sign it again)")
    p.add_argument("store", help="trust store file (.json, or .yaml)")
    p.add_argument("public", help="NAME.pub.json exported by `fedmerge keys export`")
    p.add_argument("--role", choices=["institution", "coordinator"], default="institution", help="what the member may do: contribute (institution, default) or publish and sign the store (coordinator)")
    p.add_argument("--name", help="enrol under this id instead of the one in the file")
    p.add_argument("--replace", action="store_true", help="rotate the keys of an enrolled id (the old keys can never come back)")
    p.set_defaults(func=_cmd_trust_add)
    p = ts.add_parser("revoke", help="revoke an id: its packages and signatures are refused from now on (sign the store again)")
    p.add_argument("store", help="trust store file")
    p.add_argument("name", help="the member id to revoke")
    p.add_argument("--reason", help="why (kept in the store)")
    p.set_defaults(func=_cmd_trust_revoke)
    p = ts.add_parser("list", help="list members, roles, status and key ids, and whether the store's signature verifies")
    p.add_argument("store", help="trust store file")
    p.add_argument("--coordinator-pub", metavar="FILE", help=TRUST_PIN_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_trust_list)
    p = ts.add_parser("sign", help="sign the store with an enrolled coordinator key")
    p.add_argument("store", help="trust store file")
    p.add_argument("--key", required=True, help="the coordinator's NAME.key (the coordinator must be enrolled in the store)")
    p.add_argument("--passphrase-file", help="file holding the passphrase of the private key (when it is encrypted)")
    p.set_defaults(func=_cmd_trust_sign)
    p = ts.add_parser("verify", help="check the store's signature against a pinned coordinator public identity")
    p.add_argument("store", help="trust store file")
    p.add_argument("--coordinator-pub", "--pinned", dest="coordinator_pub", metavar="FILE", required=True, help=TRUST_PIN_HELP)
    p.set_defaults(func=_cmd_trust_verify)

    delta = subparsers.add_parser("delta", help="signed (optionally sealed) delta packages")
    ds = delta.add_subparsers(dest="delta_command", metavar="ACTION", required=True)
    p = ds.add_parser("pack", help="model folder - reference folder -> signed package folder")
    p.add_argument("model", help="fine-tuned model folder")
    p.add_argument("--reference", required=True, help="reference model folder (base or current global model)")
    p.add_argument("--out", required=True, help="package folder to create")
    p.add_argument("--key", required=True, help="the sender's NAME.key")
    p.add_argument("--passphrase-file", help="file holding the passphrase of the private key (when it is encrypted)")
    p.add_argument("--round", type=int, required=True, help="the round this contribution is for (signed; the coordinator refuses other rounds)")
    p.add_argument("--fingerprint", help="reference fingerprint (computed from --reference when omitted)")
    p.add_argument("--seal-to", help="coordinator to seal to: its NAME.pub.json, or its id in --trust")
    _trust_args(p, required=False)
    p.add_argument("--dtype", default="float32", help="delta dtype: float32 (default, exact), bfloat16, float16")
    p.add_argument("--chunk-mib", type=float, default=4.0, help="chunk size in MiB (default 4, at most 64)")
    p.set_defaults(func=_cmd_delta_pack)
    for action, helptext in (("verify", "check a package (signature, sender, round, sealing, every byte of data)"), ("unpack", "verify and write the deltas as a safetensors folder")):
        p = ds.add_parser(action, help=helptext)
        p.add_argument("package", help="the package folder (manifest.json, signature.json, data files)")
        if action == "unpack":
            p.add_argument("out", help="delta folder to create")
        _trust_args(p)
        p.add_argument("--key", help="coordinator NAME.key, to open a sealed package")
        p.add_argument("--passphrase-file", help="file holding the passphrase of the private key (when it is encrypted)")
        p.add_argument("--round", type=int, help="refuse a package for another round")
        p.add_argument("--fingerprint", help="refuse a package against another reference fingerprint")
        p.add_argument("--reference", help="reference model folder: its fingerprint and tensor shapes must match")
        p.add_argument("--replay-guard", help="JSON file of accepted rounds and nonces (refuses replays; updated on success)")
        p.add_argument("--allow-unsealed", action="store_true", help="accept a package that is not sealed (by default only sealed packages pass)")
        if action == "verify":
            p.add_argument("--manifest-only", action="store_true", help="check signature, sender, round and sizes only; the data is NOT checked")
        else:
            p.set_defaults(manifest_only=False)
        p.set_defaults(func=_cmd_delta_verify if action == "verify" else _cmd_delta_unpack)

    p = subparsers.add_parser("sign-model", help="coordinator: sign a model folder it publishes for a round")
    p.add_argument("model", help="the model folder to publish")
    p.add_argument("--key", required=True, help="coordinator NAME.key")
    p.add_argument("--passphrase-file", help="file holding the passphrase of the private key (when it is encrypted)")
    p.add_argument("--round", type=int, required=True, help="the round this model is published for (signed)")
    p.add_argument("--fingerprint", help="the weights' fingerprint (computed when omitted; signed)")
    _trust_args(p, required=False)
    p.set_defaults(func=_cmd_sign_model)
    p = subparsers.add_parser("verify-model", help="check a model folder against the coordinator's signed publication")
    p.add_argument("model", help="the model folder to check")
    _trust_args(p)
    p.add_argument("--round", type=int, help="refuse a publication for any other round")
    p.add_argument("--newer-than", type=int, metavar="ROUND", help="refuse a publication for this round or an older one")
    p.add_argument("--fingerprint", help="refuse a publication naming another weights fingerprint")
    p.add_argument("--check-fingerprint", action="store_true", help="also recompute the weights' fingerprint")
    p.set_defaults(func=_cmd_verify_model)


def _pinned(args: argparse.Namespace):
    from fedmerge.security.keys import PublicIdentity

    return PublicIdentity.load(args.coordinator_pub) if args.coordinator_pub else None


def _load_trust(args: argparse.Namespace, pinned=None):
    """The --trust store, verified against --coordinator-pub (or ``pinned``), as every command loads it."""
    from fedmerge.security.trust import TrustStore

    return TrustStore.load(args.trust, pinned or _pinned(args), allow_unsigned=args.allow_unsigned_trust)


def _identity(args: argparse.Namespace):
    from fedmerge.security.keys import load_identity, read_passphrase_file

    return load_identity(args.key, read_passphrase_file(args.passphrase_file))


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from fedmerge.security.keys import generate_identity, read_passphrase_file

    ident = generate_identity(args.name, args.out, read_passphrase_file(args.passphrase_file), overwrite=args.force)
    print(f"{ident.name}: private keys {ident.key_file} (mode 600{', encrypted' if args.passphrase_file else ''}), public {ident.key_file.with_name(ident.name + '.pub.json')}, key id {ident.public.key_id}")
    return 0


def _cmd_keys_export(args: argparse.Namespace) -> int:
    from fedmerge.security.keys import PublicIdentity

    if args.key.endswith(".json"):
        pub = PublicIdentity.load(args.key)
    else:
        pub = _identity(args).public
    if args.out:
        Path(args.out).write_text(pub.to_json())
    else:
        sys.stdout.write(pub.to_json())
    return 0


def _cmd_trust_add(args: argparse.Namespace) -> int:
    from fedmerge.security.keys import PublicIdentity
    from fedmerge.security.trust import TrustStore

    store = TrustStore.open_for_editing(args.store, create=True)
    entry = store.add(PublicIdentity.load(args.public), role=args.role, name=args.name, replace=args.replace)
    store.save()
    print(f"{args.store}: {entry.name} enrolled as {entry.role} (key id {entry.public.key_id}); the store is unsigned until `fedmerge trust sign`")
    return 0


def _cmd_trust_revoke(args: argparse.Namespace) -> int:
    from fedmerge.security.trust import TrustStore

    store = TrustStore.open_for_editing(args.store)
    entry = store.revoke(args.name, reason=args.reason)
    store.save()
    print(f"{args.store}: {entry.name} revoked at {entry.revoked_at}; the store is unsigned until `fedmerge trust sign`")
    return 0


def _cmd_trust_list(args: argparse.Namespace) -> int:
    from fedmerge.security.trust import TrustStore

    store = TrustStore.open_for_editing(args.store)
    status = store.check_signature(_pinned(args))
    code = 1 if status.state == "invalid" else 0
    if args.json:
        print(json.dumps({"store": store.to_dict(), "status": status.state, "detail": status.detail}, indent=2, sort_keys=True))
        return code
    print(f"{'id':24s} {'role':12s} {'status':9s} {'key id':16s} since")
    for e in store.entries():
        when = e.revoked_at if e.status == "revoked" else e.enrolled_at
        print(f"{e.name:24s} {e.role:12s} {e.status:9s} {e.public.key_id:16s} {when}{f' ({e.reason})' if e.reason else ''}")
    print(f"{len(store)} member{'s' if len(store) != 1 else ''}; {status.detail}")
    return code


def _cmd_trust_sign(args: argparse.Namespace) -> int:
    from fedmerge.security.trust import TrustStore

    store = TrustStore.open_for_editing(args.store)
    ident = _identity(args)
    store.sign(ident)
    store.save()
    print(f"{args.store}: signed by {ident.name} (key id {ident.public.key_id})")
    return 0


def _cmd_trust_verify(args: argparse.Namespace) -> int:
    from fedmerge.security.trust import TrustStore

    pinned = _pinned(args)
    TrustStore.load(args.store, pinned)
    print(f"{args.store}: signature by the pinned coordinator {pinned.name} (key id {pinned.key_id}) is valid")
    return 0


def _cmd_delta_pack(args: argparse.Namespace) -> int:
    from fedmerge.security.errors import PackageError
    from fedmerge.security.keys import PublicIdentity
    from fedmerge.security.pack import pack_delta

    ident = _identity(args)
    seal_to = None
    if args.seal_to:
        if args.seal_to.endswith(".json") and Path(args.seal_to).exists():
            seal_to = PublicIdentity.load(args.seal_to)
        elif args.trust:
            seal_to = _load_trust(args).require(args.seal_to, role="coordinator").public
        else:
            raise PackageError(f"--seal-to {args.seal_to!r}: give the coordinator's NAME.pub.json, or --trust to look the id up")
    out = pack_delta(
        args.model, args.reference, args.out, ident, args.round, args.fingerprint, seal_to,
        dtype=args.dtype, chunk_bytes=int(args.chunk_mib * 1024 * 1024) // 8 * 8, progress=True,
    )  # fmt: skip
    print(f"{out}: package from {ident.name}, round {args.round}{', sealed to ' + seal_to.name if seal_to else ''}")
    return 0


def _verify(args: argparse.Namespace, unpack_to: str | None):
    from fedmerge.security.replay import ReplayGuard
    from fedmerge.security.verify import verify_package

    trust = _load_trust(args)
    opener = _identity(args) if args.key else None
    fingerprint, expected = args.fingerprint, None
    if args.reference:
        from fedmerge.checkpoints import CheckpointReader, model_fingerprint

        expected = CheckpointReader(args.reference)
        fingerprint = fingerprint or model_fingerprint(expected, progress=True)
    guard = ReplayGuard(args.replay_guard) if args.replay_guard else None
    return verify_package(
        args.package, trust, expected_round=args.round, expected_reference=fingerprint, opener=opener,
        replay_guard=guard, expected_tensors=expected, check_data=not args.manifest_only, unpack_to=unpack_to,
        require_sealed=not args.allow_unsealed,
    )  # fmt: skip


def _cmd_delta_verify(args: argparse.Namespace) -> int:
    v = _verify(args, None)
    m = v.manifest
    print(f"{args.package}: valid package from {v.sender}, round {m.round}, reference {m.reference}, {len(m.tensors)} tensors, {m.total_bytes / 1e6:.1f} MB {m.tensors[0].dtype}"
          + (f", sealed to {m.sealed.recipient}" if m.sealed else ", NOT sealed")
          + ("" if v.data_checked else "\nMANIFEST ONLY: signature, sender, round and file sizes were checked; the tensor data was NOT checked (run without --manifest-only, with --key for a sealed package)"))  # fmt: skip
    return 0


def _cmd_delta_unpack(args: argparse.Namespace) -> int:
    v = _verify(args, args.out)
    print(f"{args.out}: {len(v.manifest.tensors)} verified delta tensors from {v.sender}, round {v.manifest.round}")
    return 0


def _cmd_sign_model(args: argparse.Namespace) -> int:
    from fedmerge.security.model_sign import sign_model

    ident = _identity(args)
    # The coordinator checks the store against its own key unless another pin is given.
    trust = _load_trust(args, pinned=None if args.coordinator_pub else ident.public) if args.trust else None
    path = sign_model(args.model, ident, round_id=args.round, fingerprint=args.fingerprint, trust=trust)
    print(f"{path}: signed by {ident.name} for round {args.round}")
    return 0


def _cmd_verify_model(args: argparse.Namespace) -> int:
    from fedmerge.security.model_sign import verify_model

    pinned = _pinned(args)
    pub = verify_model(
        args.model, _load_trust(args, pinned), coordinator=pinned, expected_round=args.round, newer_than=args.newer_than,
        expected_fingerprint=args.fingerprint, check_fingerprint=args.check_fingerprint,
    )  # fmt: skip
    by = f"the pinned coordinator {pub.signer}" if pinned is not None else pub.signer
    print(f"{args.model}: valid publication by {by}, round {pub.round}, fingerprint {pub.fingerprint}, {len(pub.files)} files")
    return 0
