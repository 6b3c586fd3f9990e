"""Starting and driving the real Flower processes: SuperLink, SuperNodes, and the fedmerge app bundle.

Flower 1.41 serves the Fleet, Control and Runtime APIs of a SuperLink on one HTTP port (TLS when
certificates are given). Control has no authentication in the open-source build, so anyone who
reaches that port can submit an app to the SuperNodes; a hospital therefore runs only the app
bundle (FAB) whose SHA-256 it pinned: its SuperNode launches ClientApps through
``fedmerge.federation.guard``, which refuses any other bundle before installing or loading it;
the coordinator's SuperLink starts ServerApps through the same guard.

The app bundle holds a single ``pyproject.toml`` naming the fedmerge ServerApp and ClientApp,
which are imported from the installed fedmerge package. It is built deterministically (Flower
fixes the archive's timestamps), so every party can compute the same hash from the same version.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedmerge.errors import FedmergeError

log = logging.getLogger(__name__)

CONNECTION_NAME = "fedmerge"
RUN_CONFIG_KEY = "federation-config"
NODE_CONFIG_KEY = "fedmerge-config"
PINNED_ENV = "FEDMERGE_PINNED_APP_HASHES"


class FlowerLaunchError(FedmergeError):
    """A Flower process did not start, or a Flower command failed; the message carries its output."""


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
    from flwr.cli.build import build_fab_from_disk

    if app_dir is None:
        return _own_app_hash()
    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


@functools.lru_cache(maxsize=1)
def _own_app_hash() -> str:
    import tempfile

    from flwr.cli.build import build_fab_from_disk

    with tempfile.TemporaryDirectory() as tmp:
        return hashlib.sha256(build_fab_from_disk(write_app_dir(Path(tmp) / "app"))).hexdigest()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def venv_bin() -> Path:
    return Path(sys.executable).parent


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "process") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FlowerLaunchError(f"{what} exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FlowerLaunchError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Stop a process we started, and its process group (which we created for it), by PID only."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(timeout=timeout)


def kill_process(proc: subprocess.Popen | None) -> None:
    """SIGKILL a process we started and its group: a crash, for fault tests and emergencies."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait(timeout=10)


def guarded_env(home: Path, kind: str, pinned: list[str]) -> dict[str, str]:
    """Environment of a Flower process whose ``flwr-<kind>`` app launches go through the pinning guard."""
    from fedmerge.federation.guard import write_guard_bin

    env = dict(os.environ)
    guard_bin = write_guard_bin(home / "bin", (kind,))
    # The guard's directory comes first: Flower looks app launchers up on PATH.
    env["PATH"] = f"{guard_bin}{os.pathsep}{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(home / "flwr-home")
    env[PINNED_ENV] = ",".join(pinned)
    env["FEDMERGE_LAUNCH_SOCKET"] = str(home / "launch.sock")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def start_guarded(kind: str, cmd: list[str], env: dict[str, str], log_file) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Start the guard's launcher for ``kind`` (it forks apps with their imports done), then ``cmd``."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "fedmerge.federation.guard", "--serve", kind, env["FEDMERGE_LAUNCH_SOCKET"]],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    return launcher, proc


class SuperLink:
    """A ``flower-superlink`` with TLS, SuperNode authentication and a state database."""

    def __init__(self, home: Path, address: str, ca_cert: str, server_cert: str, server_key: str, database: str, log_file: Path | None = None):
        self.home = Path(home)
        self.address = address
        self.ca_cert, self.server_cert, self.server_key = ca_cert, server_cert, server_key
        self.database = database
        self.log_file = log_file or self.home / "superlink.log"
        self.proc: subprocess.Popen | None = None
        self.launcher: subprocess.Popen | None = None
        self.extra_pins: list[str] = []  # app bundles besides fedmerge's own allowed to run here

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.address.rsplit(":", 1)
        return host, int(port)

    @property
    def local_address(self) -> str:
        host, port = self.host_port
        return f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"

    def env(self) -> dict[str, str]:
        # ServerApps start through the pinning guard too: an app submitted by anyone else
        # through the unauthenticated Control API does not run on the coordinator.
        return guarded_env(self.home, "serverapp", [app_hash(), *self.extra_pins])

    def write_connection(self) -> None:
        """The Control connection the ``flwr`` CLI uses (kept under this SuperLink's own FLWR_HOME)."""
        home = self.home / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
            f'[superlink.{CONNECTION_NAME}]\naddress = "{self.local_address}"\nroot-certificates = "{self.ca_cert}"\n'
        )

    def start(self, timeout: float = 90.0) -> "SuperLink":
        self.home.mkdir(parents=True, exist_ok=True)
        self.write_connection()
        host, port = self.host_port
        cmd = [
            # flower-superlink, with a SQLite busy timeout that outlasts large blob writes.
            sys.executable, "-m", "fedmerge.federation.superlink_main",
            "--ssl-ca-certfile", self.ca_cert,
            "--ssl-certfile", self.server_cert,
            "--ssl-keyfile", self.server_key,
            "--enable-supernode-auth",
            "--database", self.database,
            "--host", host,
            "--port", str(port),
        ]  # fmt: skip
        log.info("starting SuperLink on %s (state %s)", self.address, self.database)
        self._log = open(self.log_file, "ab")
        self.launcher, self.proc = start_guarded("serverapp", cmd, self.env(), self._log)
        wait_for_port(*self.host_port_local(), timeout=timeout, proc=self.proc, what=f"flower-superlink (log: {self.log_file})")
        return self

    def host_port_local(self) -> tuple[str, int]:
        host, port = self.local_address.rsplit(":", 1)
        return host, int(port)

    # Run `flwr` commands inside this interpreter instead of a new process (saves the CLI's
    # start-up, seconds each here); for callers that already import Flower, like the tests.
    in_process_cli = False

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        if self.in_process_cli:
            return _flwr_in_process(list(args), self.env())
        cmd = [str(venv_bin() / "flwr"), *args]
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise FlowerLaunchError(f"`flwr {' '.join(args)}` failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-800:]}")
        return proc.stdout

    def flwr_batch(self, commands: list[list[str]], timeout: float = 180.0) -> list[str]:
        """Several ``flwr`` commands in one interpreter (each CLI start costs seconds here)."""
        if self.in_process_cli:
            return [_flwr_in_process(c, self.env()) for c in commands]
        proc = subprocess.run(
            [sys.executable, "-m", "fedmerge.federation.flower", "batch", json.dumps(commands)],
            env=self.env(), capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        outs = proc.stdout.split(_BATCH_SEP)
        if proc.returncode != 0:
            raise FlowerLaunchError(f"`flwr {' '.join(commands[len(outs) - 1] if len(outs) <= len(commands) else [])}` failed: {(outs[-1] + proc.stderr).strip()[-800:]}")
        return outs[: len(commands)]

    def register_supernode(self, public_key_file: str | os.PathLike[str]) -> None:
        self.register_supernodes([public_key_file])

    def register_supernodes(self, public_key_files: list) -> None:
        if public_key_files:
            self.flwr_batch([["supernode", "register", str(p), CONNECTION_NAME] for p in public_key_files])

    def submit(self, app_dir: str | os.PathLike[str], federation_config: str | os.PathLike[str]) -> int:
        out = self.flwr("run", str(app_dir), CONNECTION_NAME, "--run-config", f'{RUN_CONFIG_KEY}="{Path(federation_config).resolve()}"', "--format", "json")
        try:
            data = json.loads(out[out.index("{") :])
            return int(data["run-id"])
        except (ValueError, KeyError) as exc:
            raise FlowerLaunchError(f"`flwr run` gave no run id: {out.strip()[-400:]}") from exc

    def run_status(self, run_id: int) -> str:
        out = self.flwr("ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json")
        data = json.loads(out[out.index("{") :])
        runs = data.get("runs") or []
        return str(runs[0].get("status", "")) if runs else ""

    def stop(self) -> None:
        stop_process(self.proc)
        stop_process(self.launcher)
        if getattr(self, "_log", None):
            self._log.close()


class SuperNode:
    """A hospital's ``flower-supernode``, its ClientApps launched through the app-pinning guard."""

    def __init__(self, home: Path, superlink_address: str, root_cert: str, auth_key: str, client_config: str, runtime_port: int, pinned_hashes: list[str]):
        self.home = Path(home)
        self.superlink_address = superlink_address
        self.root_cert, self.auth_key = root_cert, auth_key
        self.client_config = str(Path(client_config).resolve())
        self.runtime_port = runtime_port
        self.pinned = list(pinned_hashes)
        self.proc: subprocess.Popen | None = None
        self.log_file = self.home / "supernode.log"

    def env(self) -> dict[str, str]:
        return guarded_env(self.home, "clientapp", self.pinned)

    def start(self) -> "SuperNode":
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(venv_bin() / "flower-supernode"),
            "--superlink", self.superlink_address,
            "--root-certificates", self.root_cert,
            "--auth-supernode-private-key", self.auth_key,
            "--node-config", f'{NODE_CONFIG_KEY}="{self.client_config}"',
            "--host", "127.0.0.1",
            "--port", str(self.runtime_port),
        ]  # fmt: skip
        self._log = open(self.log_file, "ab")
        self.launcher, self.proc = start_guarded("clientapp", cmd, self.env(), self._log)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        stop_process(getattr(self, "launcher", None))
        if getattr(self, "_log", None):
            self._log.close()

    def kill(self) -> None:
        """A crash: the SuperNode, its launcher and every ClientApp it forked die at once."""
        kill_process(self.proc)
        kill_process(getattr(self, "launcher", None))

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


_BATCH_SEP = "\n--fedmerge-flwr-batch--\n"


def _flwr_in_process(args: list[str], env: dict[str, str]) -> str:
    import contextlib
    import io

    from flwr.cli.app import app

    saved_home = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = env["FLWR_HOME"]
    from flwr.supercore.logger import console_handler

    out = io.StringIO()
    real_stdout = sys.__stdout__
    streams = (sys.stdout, sys.stderr, console_handler.stream)
    # `--format json` output bypasses redirection and writes to sys.__stdout__ directly.
    sys.__stdout__ = out  # type: ignore[misc]
    try:
        with contextlib.redirect_stdout(out):
            try:
                app(args, standalone_mode=False)
            except SystemExit as exc:
                if exc.code not in (0, None):
                    raise FlowerLaunchError(f"`flwr {' '.join(args)}` failed ({exc.code}): {out.getvalue().strip()[-800:]}") from None
            except FlowerLaunchError:
                raise
            except Exception as exc:
                raise FlowerLaunchError(f"`flwr {' '.join(args)}` failed: {exc}: {out.getvalue().strip()[-800:]}") from None
    finally:
        sys.__stdout__ = real_stdout  # type: ignore[misc]
        # Flower's JSON mode swaps stdout/stderr and its log stream; put every one back.
        sys.stdout, sys.stderr, console_handler.stream = streams
        if saved_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = saved_home
    return out.getvalue()


def _batch_main(commands_json: str) -> int:
    from flwr.cli.app import app

    for args in json.loads(commands_json):
        try:
            app(args, standalone_mode=False)
        except SystemExit as exc:
            if exc.code not in (0, None):
                return int(exc.code) if isinstance(exc.code, int) else 1
        except Exception as exc:  # click/typer raise their own errors for a failed command
            print(f"{type(exc).__name__}: {exc}")
            return 1
        sys.stdout.write(_BATCH_SEP)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "batch":
        sys.exit(_batch_main(sys.argv[2]))
