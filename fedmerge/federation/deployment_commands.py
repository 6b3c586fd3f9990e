"""CLI of a real deployment: the two daemons and their credentials.

- ``coordinator``: the consortium's SuperLink + the fedmerge ServerApp, round after round;
- ``client``: a hospital's SuperNode running the pinned fedmerge app;
- ``tls-certs``, ``node-key``, ``app-hash``: the CA and SuperLink certificate, a SuperNode key
  pair, the hash hospitals pin.

Each daemon command prints why it stopped on stderr, with the log to read.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "coordinator",
        help="run the consortium's coordinator: SuperLink + the fedmerge ServerApp, round after round",
        description="Start the SuperLink of --config (Fleet API on its address, everything else on loopback), register the "
        "SuperNode keys, submit the fedmerge app and follow its rounds; resumes after a crash. Stops its SuperLink and "
        "ServerApp on SIGTERM/SIGINT, and they stop if it is killed.",
    )
    p.add_argument("--config", required=True, metavar="FEDERATION_YAML", help="the federation config")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: never)")
    p.add_argument("--keep-running", action="store_true", help="keep the SuperLink up after the last round (until stopped)")
    p.set_defaults(func=_cmd_coordinator)

    p = subparsers.add_parser(
        "client",
        help="run a hospital's client daemon (a Flower SuperNode running the pinned fedmerge app)",
        description="Join the federation described by --config: contribute signed deltas each round, install the verified "
        "merged model. Waits (and retries) while the coordinator is not up yet; stops on SIGTERM/SIGINT.",
    )
    p.add_argument("--config", required=True, metavar="CLIENT_YAML", help="the hospital's client config")
    p.set_defaults(func=_cmd_client)

    p = subparsers.add_parser("tls-certs", help="create a CA and a SuperLink server certificate (for a quick start)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for ca.pem, ca.key, server.pem and server.key")
    p.add_argument("--host", action="append", required=True, help="a name or IP hospitals reach the SuperLink at (repeat); 127.0.0.1 is always added")
    p.set_defaults(func=_cmd_tls)

    p = subparsers.add_parser("node-key", help="create a SuperNode authentication key pair (send the .pub file to the consortium)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for NAME.node (private, 0600) and NAME.node.pub")
    p.add_argument("name", metavar="NAME", help="the institution id the key is for")
    p.set_defaults(func=_cmd_node_key)

    p = subparsers.add_parser("app-hash", help="print the SHA-256 of this fedmerge's Flower app bundle (what hospitals pin)")
    p.set_defaults(func=_cmd_app_hash)


def _say(command: str, message: str) -> None:
    print(f"fedmerge {command}: {message}", file=sys.stderr, flush=True)


def _cmd_coordinator(args: argparse.Namespace) -> int:
    import time

    from fedmerge.federation.coordinator_daemon import CoordinatorDaemon
    from fedmerge.federation.supervision import StopRequested, stop_on_signals

    with stop_on_signals():
        daemon = CoordinatorDaemon(args.config)
        logs = f"logs: {daemon.log_file}, {daemon.superlink.log_file}"
        try:
            daemon.start()
            daemon.submit()
            daemon.wait(timeout=args.timeout)
            _say("coordinator", f"all {daemon.cfg.rounds} round(s) completed (records in {daemon.cfg.state / 'rounds'}; {logs})")
            if args.keep_running:
                _say("coordinator", "keeping the SuperLink up (--keep-running) until stopped")
                while True:
                    daemon.superlink.check_alive()
                    time.sleep(5)
            return 0
        except StopRequested as stop:
            _say("coordinator", f"stopped by {stop}; the SuperLink and its ServerApp are stopped ({logs})")
            return stop.exit_code
        finally:
            daemon.stop()


def _cmd_client(args: argparse.Namespace) -> int:
    from fedmerge.federation.client_daemon import ClientDaemon
    from fedmerge.federation.supervision import StopRequested, stop_on_signals

    with stop_on_signals():
        daemon = ClientDaemon(args.config)
        try:
            daemon.run()
            return 0  # run() returns only by raising; kept for clarity of the exit paths
        except StopRequested as stop:
            _say("client", f"stopped by {stop}; the SuperNode and its ClientApps are stopped (log: {daemon.log_file})")
            return stop.exit_code
        finally:
            daemon.stop()


def _cmd_tls(args: argparse.Namespace) -> int:
    from fedmerge.federation.credentials import make_tls

    files = make_tls(args.out_dir, args.host)
    print(f"CA certificate (give to every hospital): {files.ca_cert}")
    print(f"server certificate / key (SuperLink):    {files.server_cert} / {files.server_key}")
    return 0


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
