"""Run a ClientApp only if its app bundle is one this hospital pinned, and start it warm.

Flower's SuperNode launches each ClientApp as ``flwr-clientapp ...`` looked up on PATH, one
process per message. The hospital's SuperNode is started with a PATH whose first entry holds a
``flwr-clientapp`` written by ``write_guard_bin``:

- it checks the bundle's SHA-256 against ``FEDMERGE_PINNED_APP_HASHES`` *before* Flower installs
  the bundle or imports any of its code; a bundle that is not pinned ends the task with an error
  reply and nothing of it runs;
- it asks the daemon's launcher (``LaunchServer``, a process that has Flower and fedmerge already
  imported) to fork the ClientApp, so a message costs a fork instead of seconds of imports.
  Without a launcher it runs the same guarded code in a fresh interpreter.
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

PINNED_ENV = "FEDMERGE_PINNED_APP_HASHES"
SOCKET_ENV = "FEDMERGE_LAUNCH_SOCKET"

log = logging.getLogger(__name__)


class UnpinnedApp(Exception):
    """The SuperLink sent an app bundle this hospital did not pin."""


def pinned_hashes(env=None) -> set[str]:
    env = os.environ if env is None else env
    return {h.strip().lower() for h in env.get(PINNED_ENV, "").split(",") if h.strip()}


def check_bundle(content: bytes) -> str:
    digest = hashlib.sha256(content).hexdigest()
    allowed = pinned_hashes()
    if digest not in allowed:
        raise UnpinnedApp(f"app bundle sha256:{digest} is not pinned by this hospital (pinned: {', '.join(sorted(allowed)) or 'none'}); refusing to run it")
    return digest


_SHIM = """#!/bin/sh
# fedmerge: ClientApps start here so that only pinned app bundles run (see fedmerge.client.guard).
if [ -n "$FEDMERGE_LAUNCH_SOCKET" ] && [ -S "$FEDMERGE_LAUNCH_SOCKET" ]; then
  exec "{python}" -S -c '
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["FEDMERGE_LAUNCH_SOCKET"])
s.sendall(json.dumps(sys.argv[1:]).encode() + b"\\n")
sys.exit(0 if s.recv(16).startswith(b"ok") else 1)
' "$@" && exit 0
fi
exec "{python}" -m fedmerge.client.guard "$@"
"""


def write_guard_bin(folder: str | os.PathLike[str]) -> Path:
    """Write the ``flwr-clientapp`` launcher that routes through this module; returns its folder."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    script = d / "flwr-clientapp"
    script.write_text(_SHIM.replace("{python}", sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return d


def _install_guard() -> None:
    import flwr.supernode.runtime.run_clientapp as runner

    if getattr(runner.install_from_fab, "_fedmerge_guard", False):
        return
    install = runner.install_from_fab

    def install_if_pinned(fab_content, *args, **kwargs):
        check_bundle(bytes(fab_content))
        return install(fab_content, *args, **kwargs)

    install_if_pinned._fedmerge_guard = True  # type: ignore[attr-defined]
    runner.install_from_fab = install_if_pinned


def run_guarded(argv: list[str]) -> None:
    """Flower's own ClientApp entry point, with the bundle check in front of its install step."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    _install_guard()
    sys.argv = ["flwr-clientapp", *argv]
    flwr_clientapp()


class LaunchServer:
    """Forks guarded ClientApps from a process whose imports are done (one per message)."""

    def __init__(self, socket_path: str | os.PathLike[str]):
        self.path = Path(socket_path)

    def serve_forever(self) -> None:
        # Import everything a ClientApp needs once; each fork inherits it (torch alone takes
        # seconds to import on a busy machine, and every message is a new ClientApp).
        import numpy  # noqa: F401
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
        import flwr.supernode.cli.flwr_clientapp  # noqa: F401
        import flwr.supernode.runtime.run_clientapp  # noqa: F401

        import fedmerge.client.app  # noqa: F401
        import fedmerge.client.node  # noqa: F401
        import fedmerge.security.package  # noqa: F401
        import fedmerge.merging.checkpoint  # noqa: F401

        _install_guard()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
        self.path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(self.path))
        os.chmod(self.path, 0o600)
        srv.listen(16)
        while True:
            conn, _ = srv.accept()
            try:
                line = conn.makefile("rb").readline()
                argv = json.loads(line)
                if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                    conn.sendall(b"bad\n")
                    continue
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    srv.close()
                    conn.close()
                    code = 0
                    try:
                        run_guarded(argv)
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
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        logging.basicConfig(level=logging.INFO)
        LaunchServer(sys.argv[2]).serve_forever()
        return
    run_guarded(sys.argv[1:])


if __name__ == "__main__":
    main()
