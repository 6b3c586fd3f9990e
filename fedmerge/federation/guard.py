"""Run a Flower app process only if its app bundle is pinned, and start it warm.

Flower launches each ClientApp (at a hospital, one process per message) as ``flwr-clientapp ...``
and each ServerApp (at the coordinator, one per run) as ``flwr-serverapp ...``, looked up on
PATH. fedmerge starts its SuperNodes and its SuperLink with a PATH whose first entry holds
launchers written by ``write_guard_bin``:

- the bundle's SHA-256 is checked against ``FEDMERGE_PINNED_APP_HASHES`` *before* Flower installs
  the bundle or imports any of its code; a bundle that is not pinned ends the task with an error
  and nothing of it runs;
- the launcher asks a ``LaunchServer`` (a process with Flower, torch and fedmerge already
  imported) to fork the app process, so a message costs a fork instead of seconds of imports.
  Without a launch server the same guarded code runs in a fresh interpreter.

A forked app process dies with its launch server, and the launch server with the daemon that
started it (``PR_SET_PDEATHSIG``), so no app outlives ``fedmerge client`` or ``fedmerge coordinator``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path

from fedmerge.federation.errors import UnpinnedApp

PINNED_ENV = "FEDMERGE_PINNED_APP_HASHES"
LAUNCH_SOCKET_ENV = "FEDMERGE_LAUNCH_SOCKET"
GUARD_PARENT_ENV = "FEDMERGE_GUARD_PARENT"
KINDS = ("clientapp", "serverapp")

log = logging.getLogger(__name__)


def pinned_hashes(env=None) -> set[str]:
    env = os.environ if env is None else env
    return {h.strip().lower() for h in env.get(PINNED_ENV, "").split(",") if h.strip()}


def check_bundle(content: bytes) -> str:
    digest = hashlib.sha256(content).hexdigest()
    allowed = pinned_hashes()
    if digest not in allowed:
        raise UnpinnedApp(f"app bundle sha256:{digest} is not pinned on this host (pinned: {', '.join(sorted(allowed)) or 'none'}); refusing to run it")
    return digest


_SHIM = """#!/bin/sh
# fedmerge: Flower app processes start here so that only pinned app bundles run (fedmerge.federation.guard).
if [ -n "$FEDMERGE_LAUNCH_SOCKET" ] && [ -S "$FEDMERGE_LAUNCH_SOCKET" ]; then
  "{python}" -S -c '
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["FEDMERGE_LAUNCH_SOCKET"])
s.sendall(json.dumps(sys.argv[1:]).encode() + b"\\n")
sys.exit(0 if s.recv(16).startswith(b"ok") else 1)
' {kind} "$@" && exit 0
fi
# No launch server (or it is gone: its daemon is stopping): a fresh interpreter, which ends with
# the Flower process that started it.
export FEDMERGE_GUARD_PARENT="$PPID"
exec "{python}" -m fedmerge.federation.guard {kind} "$@"
"""


def write_guard_bin(folder: str | os.PathLike[str], kinds: tuple[str, ...] = ("clientapp",)) -> Path:
    """Write the ``flwr-<kind>`` launchers that route through this module; returns their folder."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        script = d / f"flwr-{kind}"
        script.write_text(_SHIM.replace("{python}", sys.executable).replace("{kind}", kind))
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return d


def run_guarded(kind: str, argv: list[str]) -> None:
    """Flower's own entry point for ``kind``, with the bundle check in front of its install step."""
    from fedmerge.flower_internals import guard_bundle_install, run_app_process

    if kind not in KINDS:
        raise SystemExit(f"unknown app kind {kind!r}")
    guard_bundle_install(kind, check_bundle)
    run_app_process(kind, argv)


def _die_with(parent: int) -> None:
    """In a forked app process: die when the launch server does (it may already have)."""
    from fedmerge.federation.supervision import die_with_parent

    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class LaunchServer:
    """Forks guarded app processes from a process whose imports are done."""

    def __init__(self, socket_path: str | os.PathLike[str], kind: str):
        self.path = Path(socket_path)
        self.kind = kind

    def _preload(self) -> None:
        # Everything an app process needs, imported once; each fork inherits it (torch alone
        # takes seconds to import on a busy machine, and every message is a new ClientApp).
        import numpy  # noqa: F401
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401

        import fedmerge.checkpoints  # noqa: F401
        import fedmerge.security.verify  # noqa: F401
        from fedmerge.flower_internals import guard_bundle_install, preload_app_process

        preload_app_process(self.kind)
        if self.kind == "clientapp":
            import fedmerge.client.app  # noqa: F401
            import fedmerge.client.node  # noqa: F401
        else:
            import fedmerge.merging.engine  # noqa: F401
            import fedmerge.server.app  # noqa: F401
            import fedmerge.server.rounds  # noqa: F401
        guard_bundle_install(self.kind, check_bundle)

    def serve_forever(self) -> None:
        launcher = os.getpid()
        self._preload()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
        self.path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(self.path))
        os.chmod(self.path, 0o600)
        srv.listen(16)
        while True:
            conn, _ = srv.accept()
            try:
                argv = json.loads(conn.makefile("rb").readline())
                if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or not argv or argv[0] != self.kind:
                    conn.sendall(b"bad\n")
                    continue
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    _die_with(launcher)
                    srv.close()
                    conn.close()
                    code = 0
                    try:
                        run_guarded(self.kind, argv[1:])
                    except SystemExit as exc:
                        code = exc.code if isinstance(exc.code, int) else 1
                    except BaseException:
                        code = 1
                    finally:
                        os._exit(code)
                conn.sendall(b"ok\n")
            except Exception as exc:  # a bad request must not stop the launcher
                log.warning("launcher: %s", exc)
            finally:
                conn.close()


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--serve":
        logging.basicConfig(level=logging.INFO)
        LaunchServer(sys.argv[3], sys.argv[2]).serve_forever()
        return
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m fedmerge.federation.guard {clientapp|serverapp} ARGS... | --serve KIND SOCKET")
    parent = os.environ.pop(GUARD_PARENT_ENV, "")
    if parent.isdigit():  # started by a Flower process through the launcher script: never outlive it
        from fedmerge.federation.supervision import exit_when_orphaned

        exit_when_orphaned(int(parent))
    run_guarded(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    main()
