"""CLI of the hospital side: ``client`` (the daemon) and ``node-key`` (its SuperNode auth key)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "client",
        help="run a hospital's client daemon (a Flower SuperNode running the pinned fedmerge app)",
        description="Join the federation described by --config: contribute signed deltas each round, install the verified merged model.",
    )
    p.add_argument("--config", required=True, metavar="CLIENT_YAML", help="the hospital's client config")
    p.set_defaults(func=_cmd_client)

    p = subparsers.add_parser(
        "node-key",
        help="create a SuperNode authentication key pair (send the .pub file to the consortium)",
    )
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_cmd_node_key)

    p = subparsers.add_parser("app-hash", help="print the SHA-256 of this fedmerge's Flower app bundle (what hospitals pin)")
    p.set_defaults(func=_cmd_app_hash)


def _cmd_client(args: argparse.Namespace) -> int:
    from fedmerge.client.daemon import ClientDaemon

    daemon = ClientDaemon(args.config).start()
    try:
        return daemon.wait()
    finally:
        daemon.stop()


def _cmd_node_key(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedmerge.federation.credentials import make_node_key

    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    priv, pub = make_node_key(args.out_dir, args.name)
    print(f"private key (keep at the hospital, mode 0600): {priv}")
    print(f"public key (register at the coordinator):       {pub}")
    return 0


def _cmd_app_hash(args: argparse.Namespace) -> int:
    from fedmerge.federation.flower import app_hash

    print(app_hash())
    return 0
