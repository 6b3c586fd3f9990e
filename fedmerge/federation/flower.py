"""The coordinator's SuperLink and a hospital's SuperNode as processes, and the fedmerge app bundle.

The SuperLink (``fedmerge.federation.superlink_main``) serves its whole API on a loopback port
of its own and only the Fleet API on the public address; the coordinator talks to it through
the Control API on loopback (``fedmerge.flower_internals``). Both the SuperLink and a SuperNode start
their app processes through ``fedmerge.federation.guard``, which runs only the app bundles
(FAB) whose SHA-256 is pinned: at a hospital, the hash in its config (default: its own
fedmerge's bundle); at the coordinator, its own bundle only.

The app bundle holds a single ``pyproject.toml`` naming the fedmerge ServerApp and ClientApp,
which are imported from the installed fedmerge package. Flower builds it deterministically
(fixed archive timestamps), so every party computes the same hash from the same version.

Every process here is a child of the daemon that owns it (``supervision.start_child``): it
dies with the daemon, even one killed with SIGKILL.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmerge import flower_internals as internals
from fedmerge.client.app import NODE_CONFIG_KEY
from fedmerge.federation.errors import FlowerLaunchError, LeftoverProcess
from fedmerge.federation.guard import LAUNCH_SOCKET_ENV, PINNED_ENV, write_guard_bin
from fedmerge.federation.supervision import (
    Address,
    free_port,
    process_alive,
    process_start_time,
    require_free_port,
    start_child,
    stop_child,
)
from fedmerge.server.app import RUN_CONFIG_KEY

log = logging.getLogger(__name__)

CONNECTION_NAME = "fedmerge"


def app_pyproject() -> str:
    from fedmerge import __version__ as version

    return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedmerge-app"
version = "{version}"
description = "fedmerge federation rounds (ServerApp and ClientApp from the installed fedmerge)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedmerge"

[tool.flwr.app.components]
serverapp = "fedmerge.server.app:app"
clientapp = "fedmerge.client.app:app"

[tool.flwr.app.config]
{RUN_CONFIG_KEY} = ""
"""


def write_app_dir(dest: str | os.PathLike[str]) -> Path:
    d = Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.fab"):
        old.unlink()
    (d / "pyproject.toml").write_text(app_pyproject())
    return d


def app_hash(app_dir: str | os.PathLike[str] | None = None) -> str:
    """SHA-256 of the app bundle Flower builds from ``app_dir`` (default: this fedmerge's bundle)."""
    if app_dir is None:
        return _own_app_hash()
    return internals.bundle_hash(app_dir)


@functools.lru_cache(maxsize=1)
def _own_app_hash() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return internals.bundle_hash(write_app_dir(Path(tmp) / "app"))


def venv_bin() -> Path:
    return Path(sys.executable).parent


def guarded_env(home: Path, kind: str, pinned: list[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a Flower process whose ``flwr-<kind>`` app launches go through the pinning guard."""
    env = dict(os.environ)
    guard_bin = write_guard_bin(home / "bin", (kind,))
    # The guard's directory comes first: Flower looks app launchers up on PATH.
    env["PATH"] = f"{guard_bin}{os.pathsep}{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(home / "flwr-home")
    env[PINNED_ENV] = ",".join(pinned)
    env[LAUNCH_SOCKET_ENV] = str(home / "launch.sock")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    for key, value in internals.transport_env().items():  # set in the environment, they win
        env.setdefault(key, value)
    env.update(extra or {})
    return env


def _start_launcher(kind: str, env: dict[str, str], log_file) -> subprocess.Popen:
    """The guard's launcher for ``kind``: it forks app processes with their imports done."""
    cmd = [sys.executable, "-m", "fedmerge.federation.guard", "--serve", kind, env[LAUNCH_SOCKET_ENV]]
    return start_child(cmd, env, log_file, die_signal=signal.SIGKILL)


def _log_tail(path: Path, start: int = 0, lines: int = 3) -> str:
    """The last ERROR lines (or, without any, the last lines) written to ``path`` after offset ``start``."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    rows = [r.strip() for r in text.splitlines() if r.strip()]
    errors = [r for r in rows if "ERROR" in r or "Error" in r]
    return " | ".join((errors or rows)[-lines:])[-600:]


class LogFollower:
    """New complete lines of a log file since the last call, read from a byte offset on."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset = Path(path), offset

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()


class _OwnedFlowerProcess:
    """A Flower process (``proc``) and its app launcher (``launcher``), children of this daemon, logging to one file."""

    proc: subprocess.Popen | None
    launcher: subprocess.Popen | None
    _log = None

    def stop(self) -> None:
        """SIGTERM both (and what they forked), SIGKILL after a grace period; close the log."""
        stop_child(self.proc)
        stop_child(self.launcher)
        if self._log is not None:
            self._log.close()
            self._log = None


class SuperLink(_OwnedFlowerProcess):
    """The coordinator's SuperLink: TLS, SuperNode authentication, its link state, Control on loopback only.

    ``serverapp_pins`` is the allow-list of app bundles its ServerApp launcher runs: this
    fedmerge's own bundle, nothing else. ``database``: a SQLite file for the link state, or None
    to keep it in memory.
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        public_address: str,
        ca_cert: str | os.PathLike[str],
        server_cert: str | os.PathLike[str],
        server_key: str | os.PathLike[str],
        database: str | os.PathLike[str] | None,
        serverapp_env: dict[str, str] | None = None,
    ):
        self.home = Path(home)
        self.public = Address.parse(public_address, "superlink.address")
        self.ca_cert, self.server_cert, self.server_key = Path(ca_cert), Path(server_cert), Path(server_key)
        self.database = Path(database) if database is not None else None
        self.serverapp_env = dict(serverapp_env or {})
        self.log_file = self.home / "superlink.log"
        self.status_file = self.home / "superlink.json"
        self.loopback: Address | None = None
        self.proc: subprocess.Popen | None = None
        self.launcher: subprocess.Popen | None = None

    def serverapp_pins(self) -> list[str]:
        return [app_hash()]

    def env(self) -> dict[str, str]:
        return guarded_env(self.home, "serverapp", self.serverapp_pins(), self.serverapp_env)

    @property
    def control(self) -> internals.ControlEndpoint:
        if self.loopback is None:
            raise FlowerLaunchError(f"the SuperLink of {self.home} is not running")
        return internals.ControlEndpoint(str(self.loopback), self.ca_cert)

    # -- start ------------------------------------------------------------------------------------
    def _refuse_leftover(self, grace_s: float) -> None:
        """Never attach to a SuperLink an earlier coordinator started on this state.

        One whose coordinator still runs is refused at once. One whose coordinator is gone is
        stopping by itself (it reads end of file on its pipe): wait up to ``grace_s`` for it, then refuse.
        """
        try:
            prev = json.loads(self.status_file.read_text())
            pid, started = int(prev["pid"]), prev.get("start_time")
        except (OSError, ValueError, KeyError, TypeError):
            return
        where = f"listening on {prev.get('fleet')} and {prev.get('loopback')}, state {self.database or 'in memory'}"
        parent = prev.get("parent")
        if parent and process_alive(int(parent)) and process_start_time(int(parent)) == prev.get("parent_start_time"):
            if process_alive(pid) and process_start_time(pid) == started:
                raise LeftoverProcess(
                    f"a SuperLink (pid {pid}, {where}) is already owned by a running coordinator (pid {parent}); "
                    f"the coordinator never attaches to a process it did not start: stop that coordinator first"
                )
        deadline = time.monotonic() + grace_s
        while process_alive(pid) and process_start_time(pid) == started:
            if time.monotonic() > deadline:
                raise LeftoverProcess(
                    f"a SuperLink left by an earlier coordinator (pid {pid}, {where}) did not stop within {grace_s:.0f} s; "
                    f"the coordinator never attaches to a process it did not start: stop it (kill {pid}) and start again"
                )
            log.info("waiting for the SuperLink of an earlier coordinator (pid %d) to stop", pid)
            time.sleep(0.5)

    def start(self, timeout: float = 120.0, leftover_grace_s: float = 15.0) -> "SuperLink":
        """Start the SuperLink with its full API on loopback; the public Fleet listener opens with ``open_fleet``."""
        self.home.mkdir(parents=True, exist_ok=True)
        self._refuse_leftover(leftover_grace_s)
        require_free_port(self.public, "superlink.address")
        port = free_port("127.0.0.1")
        while port == self.public.port:  # a public 0.0.0.0:port covers 127.0.0.1:port too
            port = free_port("127.0.0.1")
        self.loopback = Address("127.0.0.1", port)
        self.write_connection()
        env = self.env()
        cmd = [
            sys.executable, "-m", "fedmerge.federation.superlink_main",
            "--loopback-port", str(self.loopback.port),
            "--fleet-address", str(self.public),
            "--status-file", str(self.status_file),
            "--",
            "--ssl-ca-certfile", str(self.ca_cert),
            "--ssl-certfile", str(self.server_cert),
            "--ssl-keyfile", str(self.server_key),
            "--enable-supernode-auth",
            "--database", str(self.database) if self.database is not None else internals.IN_MEMORY_LINK_STATE,
        ]  # fmt: skip
        log.info("starting the SuperLink: Fleet API on %s, full API on %s (link state %s, log %s)", self.public, self.loopback, self.database or "in memory", self.log_file)
        self.status_file.unlink(missing_ok=True)
        self._log = open(self.log_file, "ab")
        self.launcher = _start_launcher("serverapp", env, self._log)
        # stdin is our end of a pipe: the SuperLink stops when it reads end of file (we are gone).
        self.proc = start_child(cmd, env, self._log, die_signal=signal.SIGTERM, stdin=subprocess.PIPE)
        self._wait_serving("loopback", timeout)
        return self

    def open_fleet(self, timeout: float = 60.0) -> None:
        """Let SuperNodes in: the public, Fleet-only listener starts accepting connections."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"open-fleet\n")
        self.proc.stdin.flush()
        self._wait_serving("fleet", timeout)

    def _wait_serving(self, stage: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status = json.loads(self.status_file.read_text())
                if status["pid"] == self.proc.pid and stage in status["serving"]:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise FlowerLaunchError(f"the SuperLink did not serve its {stage} listener within {timeout:.0f} s (log: {self.log_file})")

    def check_alive(self) -> None:
        """``FlowerLaunchError`` naming the log if the SuperLink or its ServerApp launcher has stopped."""
        for proc, what in ((self.proc, "the SuperLink"), (self.launcher, "the SuperLink's ServerApp launcher")):
            if proc is not None and proc.poll() is not None:
                raise FlowerLaunchError(f"{what} exited with code {proc.returncode}: {_log_tail(self.log_file)} (log: {self.log_file})")

    def write_connection(self) -> None:
        """The loopback Control connection for an operator's ``flwr`` commands (``FLWR_HOME=<home>/flwr-home``)."""
        home = self.home / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
            f'[superlink.{CONNECTION_NAME}]\naddress = "{self.loopback}"\nroot-certificates = "{self.ca_cert}"\n'
        )

    # -- Control API (loopback) -------------------------------------------------------------------
    def register_supernodes(self, public_key_files: list[Path]) -> dict[Path, int]:
        return internals.register_supernodes(self.control, [Path(p) for p in public_key_files])

    def submit(self, app_dir: str | os.PathLike[str], federation_config: str | os.PathLike[str]) -> int:
        return internals.start_run(self.control, Path(app_dir), {RUN_CONFIG_KEY: str(Path(federation_config).resolve())})

    def run_status(self, run_id: int) -> str:
        return internals.run_status(self.control, run_id)

    # -- stop -------------------------------------------------------------------------------------
    def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # end of file: the SuperLink stops gracefully by itself
            except OSError:
                pass
        super().stop()


class SuperNode(_OwnedFlowerProcess):
    """A hospital's ``flower-supernode``, its ClientApps launched through the app-pinning guard."""

    def __init__(self, home, superlink_address: str, root_cert, auth_key, client_config, runtime_port: int, pinned_hashes: list[str]):
        self.home = Path(home)
        self.superlink_address = superlink_address
        self.root_cert, self.auth_key = str(root_cert), str(auth_key)
        self.client_config = str(Path(client_config).resolve())
        self.runtime = Address("127.0.0.1", int(runtime_port))
        self.pinned = list(pinned_hashes)
        self.proc: subprocess.Popen | None = None
        self.launcher: subprocess.Popen | None = None
        self.log_file = self.home / "supernode.log"
        self.log_offset = 0  # where this start's lines begin in the log

    def env(self) -> dict[str, str]:
        return guarded_env(self.home, "clientapp", self.pinned)

    def start(self) -> "SuperNode":
        self.home.mkdir(parents=True, exist_ok=True)
        require_free_port(self.runtime, f"{self.client_config}: runtime_port")
        cmd = [
            str(venv_bin() / "flower-supernode"),
            "--superlink", self.superlink_address,
            "--root-certificates", self.root_cert,
            "--auth-supernode-private-key", self.auth_key,
            "--node-config", f'{NODE_CONFIG_KEY}="{self.client_config}"',
            "--host", self.runtime.host,
            "--port", str(self.runtime.port),
        ]  # fmt: skip
        self.log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        if self._log is None:
            self._log = open(self.log_file, "ab")
        env = self.env()
        if self.launcher is None or self.launcher.poll() is not None:
            self.launcher = _start_launcher("clientapp", env, self._log)
        self.proc = start_child(cmd, env, self._log, die_signal=signal.SIGKILL)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launcher_running(self) -> bool:
        return self.launcher is not None and self.launcher.poll() is None

    def restart_launcher(self) -> None:
        stop_child(self.launcher)
        self.launcher = _start_launcher("clientapp", self.env(), self._log)

    def exit_status(self) -> tuple[int | None, str]:
        """Why this start of the SuperNode ended: Flower's own exit code and reason, else the process's and its last lines."""
        text = LogFollower(self.log_file, self.log_offset).new_lines()
        found = internals.flower_exit("\n".join(text))
        if found is not None:
            return found
        return (self.proc.returncode if self.proc is not None else None), _log_tail(self.log_file, self.log_offset)

    def follow_log(self) -> "LogFollower":
        """The lines this start of the SuperNode (and its launcher) writes, as they come."""
        return LogFollower(self.log_file, self.log_offset)

