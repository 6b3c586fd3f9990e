"""The coordinator's SuperLink process: Flower's SuperLink, split into a loopback and a public listener.

    python -m fedmerge.federation.superlink_main --loopback-port P --fleet-address HOST:PORT \\
        --status-file FILE -- <flower-superlink options>

Flower 1.41 serves Fleet (SuperNodes), Control (run submission, node registration, stop) and the
ServerApp's runtime API as one app on one listener, and Control has no authentication in the
open-source build. Here that app is served twice from one process
(``fedmerge.flower_internals.serve_superlink``):

- on ``127.0.0.1:P``, everything: the coordinator's own Control calls and its ServerApp's
  SuperExec use it;
- on the public address, only ``/v1/fleet/...`` (anything else is answered 404), with the same
  certificate. It is bound at once (so a taken port fails here, before Flower starts) but
  accepts connections only after the coordinator writes ``open-fleet`` on this process's
  standard input, once the SuperNode keys are registered.

Standard input is the coordinator's end of a pipe: end of file means the coordinator is gone
(killed, even with SIGKILL), and the SuperLink stops. The status file (JSON, replaced
atomically) says which listeners serve, with this process's pid.

The state database gets a SQLite busy timeout long enough for the payloads it stores: with
``--database``, Flower keeps every object of every message (payload chunks of ~5 MiB) in the
same SQLite file and sets a 5 s busy timeout; a write that waits longer fails with "database is
locked", answered as HTTP 500, which Flower's clients do not retry (a SuperNode's loop or the
ServerApp's heartbeat stops on it). Waiting for the lock instead costs nothing.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from fedmerge.checkpoints.atomic import write_json_atomic

EXIT_PORT_IN_USE = 98


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        ours, flower_args = argv[:i], argv[i + 1 :]
    else:
        ours, flower_args = argv, []
    p = argparse.ArgumentParser(prog="superlink_main")
    p.add_argument("--loopback-port", type=int, required=True)
    p.add_argument("--fleet-address", required=True, help="HOST:PORT of the public, Fleet-only listener")
    p.add_argument("--status-file", required=True)
    return p.parse_args(ours), flower_args


def main(argv: list[str] | None = None) -> int:
    from fedmerge.flower_internals import SuperLinkListeners, bind_listener, serve_superlink
    from fedmerge.federation.supervision import Address, process_start_time

    args, flower_args = _parse(sys.argv[1:] if argv is None else argv)
    # fedmerge's own lines only: Flower configures its loggers itself.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("fedmerge")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    fleet = Address.parse(args.fleet_address, "--fleet-address")
    bound = []
    for host, port, what in (("127.0.0.1", args.loopback_port, "loopback (full API)"), (fleet.host, fleet.port, "public (Fleet API)")):
        try:
            bound.append(bind_listener(host, port))
        except OSError as exc:
            for s in bound:
                s.close()
            print(f"superlink: cannot listen on {host}:{port} for the {what} listener: {exc.strerror}", file=sys.stderr, flush=True)
            return EXIT_PORT_IN_USE if exc.errno == errno.EADDRINUSE else 1
    listeners = SuperLinkListeners(loopback=bound[0], fleet=bound[1])
    status = Path(args.status_file)
    me = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "parent": os.getppid(), "parent_start_time": process_start_time(os.getppid()), "loopback": f"127.0.0.1:{args.loopback_port}", "fleet": str(fleet)}
    serving: list[str] = []

    def on_stage(stage: str) -> None:
        serving.append(stage)
        write_json_atomic(status, {**me, "serving": serving})

    write_json_atomic(status, {**me, "serving": serving})
    flower_args = [*flower_args, "--host", "127.0.0.1", "--port", str(args.loopback_port)]
    try:
        return serve_superlink(flower_args, listeners, sys.stdin.buffer, on_stage)
    finally:
        listeners.close()


if __name__ == "__main__":
    sys.exit(main())
