"""Every place fedmerge reaches past Flower's public API, in one module, for Flower 1.41 only.

Both the federation's launchers (``fedmerge.federation``) and the coordinator's round loop
(``fedmerge.server``) import it; it imports neither. fedmerge relies on a few parts of Flower
that are not a documented interface:

- the SuperLink's FastAPI app and its lifespan (``flwr.superlink.main.create_app`` and
  ``flwr.superlink.cli.flower_superlink``), to serve the full API on loopback and only the Fleet
  API on the public address (``serve_superlink``);
- the SQLite pragmas of its state database, for a busy timeout that outlasts large blob writes
  (``patch_sqlite_busy_timeout``), and the name of its in-memory link state;
- the environment settings of its object transfers (``transport_env``: array chunk size, objects
  pushed and pulled at once);
- the ``install_from_fab`` step of the ClientApp and ServerApp processes, where the app-pinning
  guard checks a bundle before Flower installs or imports it (``guard_bundle_install``), and the
  entry points of those processes (``run_app_process``);
- the Control API's HTTP client and messages, used on loopback by the coordinator to register
  SuperNode keys, list nodes, start runs and read their status without a ``flwr`` process each;
- the public key the SuperLink registered for each node, which the ServerApp's ``Grid.get_nodes``
  carries in Flower 1.41 (its documented ``NodeInfo`` names only node ids): the round loop binds
  nodes to institutions by it (``registered_node_keys``);
- the error codes Flower puts on a reply it lost in transit (``lost_in_transit_error_codes``);
- what a SuperLink would otherwise provide to a Grid served in one process
  (``fedmerge.federation.inprocess``): an empty run record (``empty_run``), the process's task
  identity that every new ``Message`` reads (``set_task_identity``), and the id of a pushed
  message, which ``Metadata`` exposes read-only (``set_message_id``).

Each function checks the installed Flower version first (``require_supported``, the one check)
and raises ``UnsupportedFlower`` on any other: these internals change between Flower releases,
and a silent mismatch would weaken a security control rather than fail. Node keys are compared
in one form everywhere: DER SubjectPublicKeyInfo (``node_key_der``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import posixpath
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fedmerge.errors import FedmergeError

log = logging.getLogger(__name__)


class UnsupportedFlower(FedmergeError):
    """The installed Flower is not the version whose internals fedmerge was written against."""


class ControlApiError(FedmergeError):
    """A call to the SuperLink's Control API failed; the message names the call and the address."""


SUPPORTED_FLOWER = (1, 41)
FLEET_PREFIX = "/v1/fleet/"
BUSY_TIMEOUT_MS = 120_000
CLIENTAPP, SERVERAPP = "clientapp", "serverapp"


@functools.lru_cache(maxsize=1)
def require_supported() -> str:
    """The installed Flower version, if it is 1.41.x; ``UnsupportedFlower`` otherwise."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("flwr")
    except PackageNotFoundError:
        raise UnsupportedFlower("Flower (the `flwr` package) is not installed; fedmerge needs flwr 1.41.x") from None
    parts = found.split(".")
    if tuple(int(p) for p in parts[:2] if p.isdigit()) != SUPPORTED_FLOWER:
        want = ".".join(map(str, SUPPORTED_FLOWER))
        raise UnsupportedFlower(
            f"flwr {found} is installed, fedmerge supports flwr {want}.x only: it relies on internals of that release "
            f"(fedmerge/flower_internals.py); install flwr=={want}.*"
        )
    return found


# -- the SuperLink's state database ----------------------------------------------------------------


def patch_sqlite_busy_timeout(ms: int = BUSY_TIMEOUT_MS) -> None:
    """Make every SQLite connection Flower opens wait ``ms`` for a held write lock.

    Flower 1.41 sets 5 s; a write that waits longer fails with "database is locked" (HTTP 500,
    which its clients do not retry). See ``fedmerge.federation.superlink_main``.
    """
    require_supported()
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple((k, str(ms) if k == "busy_timeout" else v) for k, v in sql_mixin.SQLITE_PRAGMAS)


# The ``--database`` value that keeps the SuperLink's link state and objects in Python memory.
IN_MEMORY_LINK_STATE = ":flwr-in-memory:"


# -- how Flower moves objects --------------------------------------------------------------------------

# Flower 1.41 cuts every array into objects of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE bytes (5 MiB) and
# moves each object with its own request, two at a time. A part (at most 256 MiB by default, plus
# its salt) in one object costs one request per hop instead of ~50, and keeps every part's bytes
# distinct (the salt is in its one chunk).
ARRAY_CHUNK_BYTES = 257 * 1024 * 1024
TRANSPORT_SETTINGS = {
    "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE": str(ARRAY_CHUNK_BYTES),
}


def transport_env() -> dict[str, str]:
    """Environment settings for every Flower process fedmerge starts (SuperLink, SuperNodes, apps)."""
    require_supported()
    return dict(TRANSPORT_SETTINGS)


# -- messages ----------------------------------------------------------------------------------------


def lost_in_transit_error_codes() -> tuple[int, ...]:
    """The error codes of a reply Flower lost in transit, not one a ClientApp produced.

    MESSAGE_UNAVAILABLE: the reply's objects never completed their upload (e.g. a push that
    failed while the SuperLink's database was busy); REPLY_MESSAGE_UNAVAILABLE: the reply expired.
    """
    require_supported()
    from flwr.common.constant import ErrorCode

    return (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def empty_run(run_id: int) -> Any:
    """Flower's record of a run that carries only its id (what ``Grid.run`` gives without a SuperLink)."""
    require_supported()
    from flwr.supercore.run import Run

    return Run.create_empty(run_id)


def set_task_identity(run_id: int, node_id: int = 0, task_id: int = 0) -> None:
    """The run, node and task of this process, which Flower's app processes set on start and every
    new ``Message`` reads (one built before it is set raises)."""
    require_supported()
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def set_message_id(message: Any, message_id: str) -> None:
    """Give ``message`` the id a SuperLink gives a pushed message (``Metadata.message_id`` has no setter)."""
    require_supported()
    message.metadata.__dict__["_message_id"] = message_id


# -- the SuperLink's listeners -----------------------------------------------------------------------


def is_fleet_path(path: str, root_path: str = "") -> bool:
    """Whether a request path is one of the Fleet API's, and nothing that routes elsewhere.

    Starlette routes on the decoded path as is, so a prefix check is exact once paths that a
    proxy or a later normalisation could read differently (``..``, ``.``, empty segments,
    backslashes, a root path) are refused outright.
    """
    if root_path or not path.startswith(FLEET_PREFIX) or "\\" in path or "\x00" in path:
        return False
    segments = path[1:].split("/")
    if any(s in ("", ".", "..") for s in segments):
        return False
    return posixpath.normpath(path) == path


class FleetOnly:
    """An ASGI app that passes Fleet API requests to the SuperLink's app and answers 404 to the rest."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and is_fleet_path(scope.get("path", ""), scope.get("root_path", "")):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b"not found\n"})


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, not yet listening (connections are refused until it is served)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class SuperLinkListeners:
    """The two sockets of a SuperLink: its whole API on loopback, the Fleet API on the public address."""

    loopback: socket.socket
    fleet: socket.socket

    def close(self) -> None:
        self.loopback.close()
        self.fleet.close()


def serve_superlink(
    flower_args: list[str],
    listeners: SuperLinkListeners,
    control: BinaryIO,
    on_stage: Callable[[str], None],
    exit_grace_s: float = 15.0,
) -> int:
    """Run Flower's SuperLink with two listeners over one app; returns the exit code.

    ``flower_args`` are ``flower-superlink`` options; its ``--host``/``--port`` must be the
    loopback socket's (Flower starts the ServerApp's SuperExec against that address). The full
    API (Control, ServerApp runtime, Fleet, health) is served on ``listeners.loopback``; the
    public socket serves the same app behind ``FleetOnly``, without a second lifespan, with the
    same certificate. The public listener opens only when the line ``open-fleet`` arrives on
    ``control`` (the coordinator registers node keys first); end of file on ``control`` means
    the process that started this one is gone, and the SuperLink stops (exiting hard if a
    graceful stop takes longer than ``exit_grace_s``). ``on_stage`` is told ``loopback`` and
    ``fleet`` as each listener starts serving.
    """
    require_supported()
    patch_sqlite_busy_timeout()
    return _SplitSuperLink(flower_args, listeners, control, on_stage, exit_grace_s).run()


class _SplitSuperLink:
    def __init__(self, flower_args, listeners: SuperLinkListeners, control: BinaryIO, on_stage, exit_grace_s: float):
        import importlib

        import uvicorn
        from flwr.superlink.main import create_app
        from flwr.supercore.http_logging import get_uvicorn_log_config
        from flwr.supercore.logger import console_handler

        # The module, not the same-named function its package re-exports.
        cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
        sys.argv = ["flower-superlink", *flower_args]
        config = cli._parse_superlink_lifespan_config()
        self.app = create_app(config, cli.SuperLinkLifespan)
        tls = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}
        host, port = listeners.loopback.getsockname()[:2]
        full = uvicorn.Config(
            self.app, host=host, port=port, log_config=get_uvicorn_log_config(console_handler.level), access_log=True,
            timeout_graceful_shutdown=3, **tls,
        )  # fmt: skip
        fleet_host, fleet_port = listeners.fleet.getsockname()[:2]
        # lifespan off: the one lifespan (gRPC servers, SuperExec) belongs to the full server;
        # the app's state lives on app.state, which both servers share.
        fleet = uvicorn.Config(
            FleetOnly(self.app), host=fleet_host, port=fleet_port, lifespan="off", log_config=None, access_log=True,
            timeout_graceful_shutdown=3, **tls,
        )  # fmt: skip
        self.full = uvicorn.Server(full)
        self.fleet = _SignalFreeServer(fleet)
        self.listeners = listeners
        self.control = control
        self.on_stage = on_stage
        self.exit_grace_s = exit_grace_s
        self.open_fleet = threading.Event()

    def run(self) -> int:
        # The loop uvicorn would pick for itself (uvloop when installed): asyncio's default loop
        # runs TLS through a pure-Python layer that costs the SuperLink about a fifth of its CPU.
        with asyncio.Runner(loop_factory=self.full.config.get_loop_factory()) as runner:
            runner.run(self._main())
        return 0

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        full = asyncio.create_task(self.full.serve(sockets=[self.listeners.loopback]))
        if not await self._started(self.full, full):
            await full
            return
        log.info("SuperLink: full API (Control, runtime, Fleet) on %s:%s (loopback only)", *self.listeners.loopback.getsockname()[:2])
        self.on_stage("loopback")
        threading.Thread(target=self._read_control, args=(loop,), daemon=True, name="superlink-control").start()
        opened = loop.run_in_executor(None, self.open_fleet.wait)
        await asyncio.wait([full, opened], return_when=asyncio.FIRST_COMPLETED)
        fleet = None
        if not full.done():
            fleet = asyncio.create_task(self.fleet.serve(sockets=[self.listeners.fleet]))
            if await self._started(self.fleet, fleet):
                log.info("SuperLink: Fleet API only on %s:%s", *self.listeners.fleet.getsockname()[:2])
                self.on_stage("fleet")
            else:
                self.full.should_exit = True
        await full
        self.fleet.should_exit = True
        self.open_fleet.set()
        if fleet is not None:
            await fleet

    @staticmethod
    async def _started(server, task: asyncio.Task) -> bool:
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        return server.started and not task.done()

    def _read_control(self, loop: asyncio.AbstractEventLoop) -> None:
        for line in iter(self.control.readline, b""):
            if line.strip() == b"open-fleet":
                self.open_fleet.set()
        log.warning("SuperLink: the process that started it is gone; stopping")
        loop.call_soon_threadsafe(setattr, self.full, "should_exit", True)
        loop.call_soon_threadsafe(setattr, self.fleet, "should_exit", True)
        # A graceful stop that hangs must not keep the port: exit hard after the grace period.
        timer = threading.Timer(self.exit_grace_s, os._exit, args=(1,))
        timer.daemon = True
        timer.start()


def _signal_free_server_class():
    import contextlib

    import uvicorn

    class SignalFreeServer(uvicorn.Server):
        """A uvicorn server that leaves signals to the other server of the same process."""

        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return SignalFreeServer


def _SignalFreeServer(config):  # noqa: N802 - a class made on first use (uvicorn is imported late)
    return _signal_free_server_class()(config)


# -- Flower's app processes (ClientApp at a hospital, ServerApp at the coordinator) --------------------

_APP_RUNNERS = {CLIENTAPP: "flwr.supernode.runtime.run_clientapp", SERVERAPP: "flwr.superlink.runtime.run_serverapp"}


def guard_bundle_install(kind: str, check: Callable[[bytes], Any]) -> None:
    """Call ``check(bundle)`` before Flower installs an app bundle in a ``kind`` process (it raises to refuse)."""
    require_supported()
    import importlib

    # The module, not the same-named function its package re-exports.
    runner = importlib.import_module(_APP_RUNNERS[kind])
    if getattr(runner.install_from_fab, "_fedmerge_guard", None) is check:
        return
    install = getattr(runner.install_from_fab, "_fedmerge_inner", runner.install_from_fab)

    def install_if_pinned(fab_content, *args, **kwargs):
        check(bytes(fab_content))
        return install(fab_content, *args, **kwargs)

    install_if_pinned._fedmerge_guard = check  # type: ignore[attr-defined]
    install_if_pinned._fedmerge_inner = install  # type: ignore[attr-defined]
    runner.install_from_fab = install_if_pinned


def preload_app_process(kind: str) -> None:
    """Import what a ``kind`` process of Flower needs, so that a fork of this process starts warm."""
    require_supported()
    if kind == CLIENTAPP:
        import flwr.supernode.cli.flwr_clientapp  # noqa: F401
    else:
        import flwr.superlink.cli.flwr_serverapp  # noqa: F401


def run_app_process(kind: str, argv: list[str]) -> None:
    """Flower's ``flwr-<kind>`` entry point with ``argv`` (what Flower's SuperExec passed)."""
    require_supported()
    sys.argv = [f"flwr-{kind}", *argv]
    if kind == CLIENTAPP:
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        flwr_clientapp()
    else:
        from flwr.superlink.cli.flwr_serverapp import flwr_serverapp

        flwr_serverapp()


# -- what Flower's processes say when they stop ---------------------------------------------------------

# Flower's exit codes (flwr.supercore.exit.ExitCode) that another start of a SuperNode cannot change.
SUPERNODE_FATAL_EXIT_CODES = {
    302: "the SuperNode auth key is invalid",
    303: "node authentication needs TLS",
    304: "invalid trusted entities",
    600: "the SuperLink address cannot be parsed",
    602: "TLS is not supported here",
    603: "the root certificate is not usable",
    604: "a path is invalid",
    605: "the TLS certificates are invalid",
    606: "this Flower version cannot talk to the SuperLink's",
    607: "the app cannot be imported",
}
SUPERNODE_CONNECTION_ERROR = 305  # could not connect, or the SuperLink refused to activate it
# What a SuperNode logs once the SuperLink accepted it, and each time it cannot reach it (it retries by itself).
SUPERNODE_CONNECTED_MARK = "SuperNode ID:"
SUPERNODE_UNREACHABLE_MARK = "Connection attempt failed"


def flower_exit(log_text: str) -> tuple[int, str] | None:
    """The last exit code and reason a Flower process logged (``Exit Code: N`` and the lines after it).

    Flower prints its own exit code there, which the process's exit status does not always carry
    (a SuperNode that cannot activate logs 305 and exits with 1).
    """
    import re

    found = None
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"Exit Code: (\d+)", line)
        if m:
            reason = []
            for follow in lines[i + 1 : i + 6]:
                if not follow.strip() or follow.startswith("For more information") or follow.lstrip().startswith(("INFO", "\x1b")):
                    break
                reason.append(follow.strip())
            found = (int(m.group(1)), " ".join(reason))
    return found


# -- SuperNode keys: one form for every comparison -------------------------------------------------


def node_key_der(key: bytes | str) -> bytes:
    """A SuperNode public key, OpenSSH (``.node.pub``) or PEM (how Flower stores it), as DER SubjectPublicKeyInfo.

    ``ValueError`` when it is neither.
    """
    from cryptography.hazmat.primitives import serialization

    raw = key.encode() if isinstance(key, str) else bytes(key)
    loaded = serialization.load_pem_public_key(raw) if raw.lstrip().startswith(b"-----BEGIN") else serialization.load_ssh_public_key(raw)
    return loaded.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _der_or_none(raw: bytes, node_id: int) -> bytes | None:
    if not raw:
        return None
    try:
        return node_key_der(raw)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        log.warning("node %s: unreadable registered key (%s); treated as bound to no institution", node_id, exc)
        return None


def registered_node_keys(grid: Any) -> dict[int, bytes | None]:
    """node id -> DER public key the SuperLink registered for it (None: none, or unreadable), from a ServerApp's Grid.

    Flower 1.41's SuperLink answers ``Grid.get_nodes()`` with each node's ``NodeInfo`` including
    the key it authenticated with; a Grid that carries no keys (simulation) gives None for all.
    """
    require_supported()
    return {int(info.node_id): _der_or_none(bytes(info.public_key), int(info.node_id)) for info in grid.get_nodes()}


# -- the Control API, on the coordinator's loopback ---------------------------------------------------


@dataclass(frozen=True)
class SuperNodeRecord:
    """A SuperNode as the SuperLink's Control API lists it."""

    node_id: int
    public_key: bytes | None  # DER SubjectPublicKeyInfo (``node_key_der``); None for a node listed without one
    status: str  # registered, online, offline, unregistered


@dataclass(frozen=True)
class ControlEndpoint:
    """Where the Control API listens (loopback) and the CA that signed its certificate."""

    address: str
    ca_cert: Path


def _control_client(endpoint: ControlEndpoint):
    require_supported()
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    if not log.isEnabledFor(logging.DEBUG):  # one INFO line per HTTP request otherwise
        logging.getLogger("httpx").setLevel(logging.WARNING)

    return ControlHttpClient.from_server_address(
        server_address=endpoint.address, insecure=False, root_certificates=Path(endpoint.ca_cert).read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )  # fmt: skip


def _control_call(endpoint: ControlEndpoint, what: str, call: Callable[[Any], Any]) -> Any:
    client = _control_client(endpoint)
    try:
        return call(client)
    except Exception as exc:  # Flower raises its own HTTP/status errors; name the call and the address
        raise ControlApiError(f"Control API at {endpoint.address}: {what} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        client.close()


def list_supernodes(endpoint: ControlEndpoint) -> list[SuperNodeRecord]:
    """Every SuperNode the SuperLink knows, with its public key (what ``flwr supernode list`` omits)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    res = _control_call(endpoint, "listing SuperNodes", lambda c: c.ListNodes(ListNodesRequest()))
    return [SuperNodeRecord(int(n.node_id), _der_or_none(bytes(n.public_key), int(n.node_id)), str(n.status)) for n in res.nodes_info]


def register_supernodes(endpoint: ControlEndpoint, public_key_files: list[Path]) -> dict[Path, int]:
    """Register each OpenSSH public key (a no-op for one already registered); returns file -> node id."""
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.control_pb2 import RegisterNodeRequest

    known = {n.public_key: n.node_id for n in list_supernodes(endpoint) if n.status != "unregistered" and n.public_key}
    out: dict[Path, int] = {}
    for path in public_key_files:
        der = node_key_der(Path(path).read_bytes())
        if der in known:
            out[Path(path)] = known[der]
            continue
        # Flower's Control API takes the key as PEM SubjectPublicKeyInfo.
        pem = serialization.load_der_public_key(der).public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        res = _control_call(endpoint, f"registering SuperNode key {path}", lambda c, pem=pem: c.RegisterNode(RegisterNodeRequest(public_key=pem)))
        out[Path(path)] = known[der] = int(res.node_id)
    return out


def start_run(endpoint: ControlEndpoint, app_dir: Path, run_config: dict[str, str]) -> int:
    """Submit the app bundle built from ``app_dir`` with ``run_config``; returns the run id."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    require_supported()
    fab_bytes = build_fab_from_disk(Path(app_dir))
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    req = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(dict(run_config)), federation="")
    res = _control_call(endpoint, f"starting a run of {app_dir}", lambda c: c.StartRun(req))
    if not res.HasField("run_id"):
        raise ControlApiError(f"Control API at {endpoint.address}: the SuperLink started no run for {app_dir}")
    return int(res.run_id)


def run_status(endpoint: ControlEndpoint, run_id: int) -> str:
    """A run's status as Flower writes it: ``pending``, ``starting``, ``running``, ``finished:<sub-status>``."""
    from flwr.proto.control_pb2 import ListRunsRequest

    res = _control_call(endpoint, f"reading run {run_id}", lambda c: c.ListRuns(ListRunsRequest(run_id=int(run_id))))
    run = res.run_dict.get(int(run_id))
    if run is None:
        return ""
    status = run.status
    return f"{status.status}:{status.sub_status}" if status.sub_status else str(status.status)


def bundle_hash(app_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of the app bundle (FAB) Flower builds from ``app_dir`` (deterministic for the same files)."""
    require_supported()
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def bundle_bytes(app_dir: str | os.PathLike[str]) -> bytes:
    require_supported()
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))
