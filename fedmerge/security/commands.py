"""CLI: ``keys``, ``trust``, ``delta pack|verify|unpack``, ``sign-model``, ``verify-model``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    p.add_argument("--passphrase-file")
    p.add_argument("--out", help="write the JSON to this file instead of stdout")
    p.set_defaults(func=_cmd_keys_export)

    trust = subparsers.add_parser("trust", help="edit and list the consortium trust store")
    ts = trust.add_subparsers(dest="trust_command", metavar="ACTION", required=True)
    p = ts.add_parser("add", help="enrol a public identity (creates the store if missing)")
    p.add_argument("store", help="trust store file (.json, or .yaml)")
    p.add_argument("public", help="NAME.pub.json exported by `fedmerge keys export`")
    p.add_argument("--role", choices=["institution", "coordinator"], default="institution")
    p.add_argument("--name", help="enrol under this id instead of the one in the file")
    p.add_argument("--replace", action="store_true", help="rotate the keys of an enrolled id")
    p.set_defaults(func=_cmd_trust_add)
    p = ts.add_parser("revoke", help="revoke an id: its packages and signatures are refused from now on")
    p.add_argument("store")
    p.add_argument("name")
    p.add_argument("--reason", help="why (kept in the store)")
    p.set_defaults(func=_cmd_trust_revoke)
    p = ts.add_parser("list", help="list members, roles, status and key ids")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_trust_list)
    p = ts.add_parser("sign", help="sign the store with an enrolled coordinator key")
    p.add_argument("store")
    p.add_argument("--key", required=True)
    p.add_argument("--passphrase-file")
    p.set_defaults(func=_cmd_trust_sign)
    p = ts.add_parser("verify", help="check the store's signature against a pinned coordinator public identity")
    p.add_argument("store")
    p.add_argument("--pinned", required=True, help="the coordinator's NAME.pub.json, obtained out of band")
    p.set_defaults(func=_cmd_trust_verify)

    delta = subparsers.add_parser("delta", help="signed (optionally sealed) delta packages")
    ds = delta.add_subparsers(dest="delta_command", metavar="ACTION", required=True)
    p = ds.add_parser("pack", help="model folder - reference folder -> signed package folder")
    p.add_argument("model", help="fine-tuned model folder")
    p.add_argument("--reference", required=True, help="reference model folder (base or current global model)")
    p.add_argument("--out", required=True, help="package folder to create")
    p.add_argument("--key", required=True, help="the sender's NAME.key")
    p.add_argument("--passphrase-file")
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--fingerprint", help="reference fingerprint (computed from --reference when omitted)")
    p.add_argument("--seal-to", help="coordinator to seal to: its NAME.pub.json, or its id in --trust")
    p.add_argument("--trust", help="trust store (to look up --seal-to by id)")
    p.add_argument("--dtype", default="float32", help="delta dtype: float32 (default, exact), bfloat16, float16")
    p.add_argument("--chunk-mib", type=float, default=4.0, help="chunk size in MiB (default 4)")
    p.set_defaults(func=_cmd_delta_pack)
    for action, helptext in (("verify", "check a package (signature, sender, round, data)"), ("unpack", "verify and write the deltas as a safetensors folder")):
        p = ds.add_parser(action, help=helptext)
        p.add_argument("package")
        if action == "unpack":
            p.add_argument("out", help="delta folder to create")
        p.add_argument("--trust", required=True, help="trust store file")
        p.add_argument("--key", help="coordinator NAME.key, to open a sealed package")
        p.add_argument("--passphrase-file")
        p.add_argument("--round", type=int, help="refuse a package for another round")
        p.add_argument("--fingerprint", help="refuse a package against another reference fingerprint")
        p.add_argument("--reference", help="reference model folder: its fingerprint and tensor shapes must match")
        p.add_argument("--replay-guard", help="JSON file of accepted rounds and nonces (refuses replays; updated on success)")
        p.set_defaults(func=_cmd_delta_verify if action == "verify" else _cmd_delta_unpack)

    p = subparsers.add_parser("sign-model", help="coordinator: sign a model folder it publishes")
    p.add_argument("model")
    p.add_argument("--key", required=True, help="coordinator NAME.key")
    p.add_argument("--passphrase-file")
    p.add_argument("--round", type=int)
    p.add_argument("--trust", help="refuse unless the key is an enrolled coordinator in this store")
    p.set_defaults(func=_cmd_sign_model)
    p = subparsers.add_parser("verify-model", help="check a model folder against the coordinator's signed publication")
    p.add_argument("model")
    p.add_argument("--trust", required=True)
    p.add_argument("--round", type=int)
    p.add_argument("--fingerprint")
    p.add_argument("--check-fingerprint", action="store_true", help="also recompute the weights' fingerprint")
    p.set_defaults(func=_cmd_verify_model)


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

    store = TrustStore.load(args.store, create=True)
    entry = store.add(PublicIdentity.load(args.public), role=args.role, name=args.name, replace=args.replace)
    store.save()
    print(f"{args.store}: {entry.name} enrolled as {entry.role} (key id {entry.public.key_id})")
    return 0


def _cmd_trust_revoke(args: argparse.Namespace) -> int:
    from fedmerge.security.trust import TrustStore

    store = TrustStore.load(args.store)
    entry = store.revoke(args.name, reason=args.reason)
    store.save()
    print(f"{args.store}: {entry.name} revoked at {entry.revoked_at}")
    return 0


def _cmd_trust_list(args: argparse.Namespace) -> int:
    from fedmerge.security.trust import TrustStore

    store = TrustStore.load(args.store)
    if args.json:
        print(json.dumps(store.to_dict(), indent=2, sort_keys=True))
        return 0
    print(f"{'id':24s} {'role':12s} {'status':9s} {'key id':16s} since")
    for e in store.entries():
        when = e.revoked_at if e.status == "revoked" else e.enrolled_at
        print(f"{e.name:24s} {e.role:12s} {e.status:9s} {e.public.key_id:16s} {when}{f' ({e.reason})' if e.reason else ''}")
    print(f"{len(store)} member{'s' if len(store) != 1 else ''}{', signed by ' + store.signature['signer'] if store.signature else ', unsigned'}")
    return 0


def _cmd_trust_sign(args: argparse.Namespace) -> int:
    from fedmerge.security.trust import TrustStore

    store = TrustStore.load(args.store)
    ident = _identity(args)
    store.sign(ident)
    store.save()
    print(f"{args.store}: signed by {ident.name}")
    return 0


def _cmd_trust_verify(args: argparse.Namespace) -> int:
    from fedmerge.security.keys import PublicIdentity
    from fedmerge.security.trust import TrustStore

    pinned = PublicIdentity.load(args.pinned)
    TrustStore.load(args.store).verify_signed_by(pinned)
    print(f"{args.store}: signature by {pinned.name} is valid")
    return 0


def _cmd_delta_pack(args: argparse.Namespace) -> int:
    from fedmerge.security.errors import PackageError
    from fedmerge.security.keys import PublicIdentity
    from fedmerge.security.package import pack_delta
    from fedmerge.security.trust import TrustStore

    ident = _identity(args)
    seal_to = None
    if args.seal_to:
        if args.seal_to.endswith(".json") and Path(args.seal_to).exists():
            seal_to = PublicIdentity.load(args.seal_to)
        elif args.trust:
            seal_to = TrustStore.load(args.trust).require(args.seal_to, role="coordinator").public
        else:
            raise PackageError(f"--seal-to {args.seal_to!r}: give the coordinator's NAME.pub.json, or --trust to look the id up")
    out = pack_delta(
        args.model, args.reference, args.out, ident, args.round, args.fingerprint, seal_to,
        dtype=args.dtype, chunk_bytes=int(args.chunk_mib * 1024 * 1024) // 8 * 8, progress=True,
    )
    print(f"{out}: package from {ident.name}, round {args.round}{', sealed to ' + seal_to.name if seal_to else ''}")
    return 0


def _verify(args: argparse.Namespace, unpack_to: str | None):
    from fedmerge.security.package import verify_package
    from fedmerge.security.replay import ReplayGuard
    from fedmerge.security.trust import TrustStore

    trust = TrustStore.load(args.trust)
    opener = _identity(args) if args.key else None
    fingerprint, expected = args.fingerprint, None
    if args.reference:
        from fedmerge.checkpoints import CheckpointReader, model_fingerprint

        expected = CheckpointReader(args.reference)
        fingerprint = fingerprint or model_fingerprint(expected, progress=True)
    guard = ReplayGuard(args.replay_guard) if args.replay_guard else None
    from fedmerge.security.manifest import MANIFEST_NAME
    from fedmerge.security.package import read_manifest

    sealed_without_key = opener is None and (Path(args.package) / MANIFEST_NAME).exists() and unpack_to is None
    check_data = True
    if sealed_without_key:
        try:
            check_data = read_manifest(args.package).sealed is None
        except Exception:
            check_data = True  # let verify_package report the manifest problem
    return verify_package(
        args.package, trust, expected_round=args.round, expected_reference=fingerprint, opener=opener,
        replay_guard=guard, expected_tensors=expected, check_data=check_data, unpack_to=unpack_to,
    )


def _cmd_delta_verify(args: argparse.Namespace) -> int:
    v = _verify(args, None)
    m = v.manifest
    print(f"{args.package}: valid package from {v.sender}, round {m.round}, reference {m.reference}, {len(m.tensors)} tensors, {m.total_bytes / 1e6:.1f} MB {m.tensors[0].dtype}"
          + (f", sealed to {m.sealed.recipient}" if m.sealed else "")
          + ("" if v.data_checked else " (signature, sender and sizes checked; data not checked: sealed, give --key to open it)"))
    return 0


def _cmd_delta_unpack(args: argparse.Namespace) -> int:
    v = _verify(args, args.out)
    print(f"{args.out}: {len(v.manifest.tensors)} verified delta tensors from {v.sender}, round {v.manifest.round}")
    return 0


def _cmd_sign_model(args: argparse.Namespace) -> int:
    from fedmerge.security.model_sign import sign_model
    from fedmerge.security.trust import TrustStore

    trust = TrustStore.load(args.trust) if args.trust else None
    path = sign_model(args.model, _identity(args), round_id=args.round, trust=trust)
    print(f"{path}: signed")
    return 0


def _cmd_verify_model(args: argparse.Namespace) -> int:
    from fedmerge.security.model_sign import verify_model
    from fedmerge.security.trust import TrustStore

    pub = verify_model(args.model, TrustStore.load(args.trust), expected_round=args.round, expected_fingerprint=args.fingerprint, check_fingerprint=args.check_fingerprint)
    print(f"{args.model}: valid publication by {pub.signer}, round {pub.round}, fingerprint {pub.fingerprint}, {len(pub.files)} files")
    return 0
