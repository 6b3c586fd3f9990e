"""CLI of the consortium side: ``coordinator`` and ``tls-certs``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "coordinator",
        help="run the consortium's coordinator: SuperLink + the fedmerge ServerApp, round after round",
        description="Start (or reach) the SuperLink of --config, submit the fedmerge app and follow its rounds; resumes after a crash.",
    )
    p.add_argument("--config", required=True, metavar="FEDERATION_YAML", help="the federation config")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: never)")
    p.add_argument("--keep-running", action="store_true", help="keep the SuperLink up after the last round")
    p.set_defaults(func=_cmd_coordinator)

    p = subparsers.add_parser("tls-certs", help="create a CA and a SuperLink server certificate (for a quick start)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--host", action="append", required=True, help="a name or IP the SuperLink is reached at (repeat)")
    p.set_defaults(func=_cmd_tls)


def _cmd_coordinator(args: argparse.Namespace) -> int:
    import time

    from fedmerge.server.coordinator import Coordinator

    coord = Coordinator(args.config).start()
    try:
        coord.submit()
        records = coord.wait(timeout=args.timeout)
        failed = [r for r in records if r.status.value == "failed"]
        while args.keep_running:
            time.sleep(3600)
        return 1 if failed else 0
    finally:
        coord.stop()


def _cmd_tls(args: argparse.Namespace) -> int:
    from fedmerge.federation.credentials import make_tls

    files = make_tls(args.out_dir, args.host)
    print(f"CA certificate (give to every hospital): {files.ca_cert}")
    print(f"server certificate / key (SuperLink):    {files.server_cert} / {files.server_key}")
    return 0
