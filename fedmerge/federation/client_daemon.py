"""``fedmerge client``: a hospital's long-running SuperNode, running only the pinned fedmerge app.

The daemon checks its config, keys and runtime port, then runs ``flower-supernode`` (TLS to the
SuperLink's Fleet address, authenticated with the node key the consortium registered) with
ClientApps started through ``fedmerge.federation.guard``. The work of each round happens in
those ClientApps; what they build and install is under ``state_dir`` (``fedmerge.client.node``).

It may start before the coordinator, or while the coordinator registers node keys: Flower's
SuperNode then exits (code 305, it could not connect or activate), and the daemon starts it again
after a pause that doubles up to ``retry_max_s``, saying each time what it waits for. Reasons
retrying cannot fix (a bad key, certificate or address) end the daemon with that reason. It
stops, and its SuperNode, launcher and ClientApps with it, on SIGTERM or SIGINT; they also end if
the daemon is killed outright.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

from fedmerge.client.config import ClientConfig, load_client_config
from fedmerge.client.node import HospitalNode
from fedmerge.federation import flower
from fedmerge.federation.credentials import require_owner_only_writable
from fedmerge.federation.errors import DaemonConfigError, SuperNodeGaveUp
from fedmerge.flower_internals import (
    SUPERNODE_CONNECTED_MARK,
    SUPERNODE_CONNECTION_ERROR,
    SUPERNODE_FATAL_EXIT_CODES,
    SUPERNODE_UNREACHABLE_MARK,
)

log = logging.getLogger(__name__)

class ClientDaemon:
    """A hospital's SuperNode kept running: started, restarted with backoff while it cannot connect, stopped with the daemon."""

    def __init__(self, config_path: str | os.PathLike[str], *, retry_first_s: float = 2.0, retry_max_s: float = 60.0):
        self.config_path = Path(config_path).resolve()
        self.cfg: ClientConfig = load_client_config(self.config_path)
        for field in ("root_cert", "supernode_key"):
            value = getattr(self.cfg, field)
            if not value or not Path(value).is_file():
                raise DaemonConfigError(f"{self.config_path}: field {field!r} must name an existing file (got {value!r})")
        for field in ("identity_key", "trust_store", "base_model", "source"):
            value = getattr(self.cfg, field)
            if not Path(value).exists():
                raise DaemonConfigError(f"{self.config_path}: {field} {value} does not exist")
        require_owner_only_writable(self.config_path, "the client config")
        for field in ("coordinator_public_file", "trust_store", "root_cert"):
            require_owner_only_writable(getattr(self.cfg, field), f"{self.config_path}: {field}")
        # The trust store must verify against the pinned coordinator now, not first when a model arrives.
        HospitalNode(self.cfg).trust()
        pins = list(self.cfg.pinned_app_hashes) or [flower.app_hash()]
        if not self.cfg.pinned_app_hashes:
            log.info("no pinned_app_hashes in %s: pinning this fedmerge's own app bundle (sha256 %s)", self.config_path, pins[0])
        self.node = flower.SuperNode(
            self.cfg.state / "supernode",
            self.cfg.superlink_address,
            str(self.cfg.root_cert),
            str(self.cfg.supernode_key),
            str(self.config_path),
            self.cfg.runtime_port,
            pins,
        )
        self.retry_first_s, self.retry_max_s = retry_first_s, retry_max_s
        self.attempts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a start and a stop of the SuperNode never interleave

    @property
    def log_file(self) -> Path:
        return self.node.log_file

    def run(self, poll_s: float = 1.0) -> None:
        """Keep the SuperNode running until ``stop`` (from another thread), a signal (``StopRequested``), or a failure for good."""
        self.cfg.state.mkdir(parents=True, exist_ok=True)
        delay = self.retry_first_s
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return
                self.attempts += 1
                self.node.start()
            log.info("%s: SuperNode started towards %s (attempt %d, log %s)", self.cfg.institution, self.cfg.superlink_address, self.attempts, self.node.log_file)
            connected = self._supervise(poll_s)
            if self._stopping.is_set():
                return
            if connected:
                delay = self.retry_first_s  # it was in: a later loss starts the backoff afresh
            code, reason = self.node.exit_status()
            reason = reason or "no output"
            if code in SUPERNODE_FATAL_EXIT_CODES:
                raise SuperNodeGaveUp(f"{self.cfg.institution}: the SuperNode stopped: {SUPERNODE_FATAL_EXIT_CODES[code]} (Flower exit {code}: {reason}); log {self.node.log_file}")
            waiting = (
                f"for the SuperLink at {self.cfg.superlink_address} to accept this node (the coordinator must be up and have "
                f"registered this node's public key, the .pub of {self.cfg.supernode_key})"
                if code == SUPERNODE_CONNECTION_ERROR
                else "to restart the SuperNode"
            )
            log.warning(
                "%s: SuperNode stopped with exit code %s (%s); waiting %s; retrying in %.0f s (log %s)",
                self.cfg.institution, code, reason, waiting, delay, self.node.log_file,
            )  # fmt: skip
            self._stopping.wait(delay)
            delay = min(delay * 2, self.retry_max_s)

    def _supervise(self, poll_s: float) -> bool:
        """Until the SuperNode exits, saying when it waits for the SuperLink and when it is in; restarts a launcher that died.

        Returns whether the SuperLink accepted the node during this start.
        """
        connected, waiting = False, False
        follower = self.node.follow_log()
        while self.node.running() and not self._stopping.is_set():
            for line in follower.new_lines():
                if SUPERNODE_CONNECTED_MARK in line:
                    connected, waiting = True, False
                    node_id = line.split(SUPERNODE_CONNECTED_MARK, 1)[1].strip()
                    log.info("%s: connected to the SuperLink at %s as SuperNode %s", self.cfg.institution, self.cfg.superlink_address, node_id)
                elif SUPERNODE_UNREACHABLE_MARK in line and not waiting:
                    waiting = True
                    unresolved = unresolvable(self.cfg.superlink_address)
                    if unresolved:
                        log.warning("%s: %s; check superlink_address in %s (the SuperNode keeps trying)", self.cfg.institution, unresolved, self.config_path)
                    log.info(
                        "%s: waiting for the SuperLink at %s to accept connections (%s); the SuperNode retries by itself",
                        self.cfg.institution, self.cfg.superlink_address,
                        "lost it; the coordinator stopped or restarts" if connected else "the coordinator is not up yet, or still registering node keys",
                    )  # fmt: skip
            if not self.node.launcher_running():
                log.warning("%s: the ClientApp launcher exited (code %s); starting it again (log %s)", self.cfg.institution, self.node.launcher.returncode, self.node.log_file)
                self.node.restart_launcher()
            self._stopping.wait(poll_s)
        return connected

    def stop(self) -> None:
        """Stop the SuperNode, its launcher and its ClientApps; ``run`` returns."""
        self._stopping.set()
        with self._lock:
            self.node.stop()


def unresolvable(address: str) -> str | None:
    """Why ``HOST:PORT``'s host cannot be looked up now (None when it can): a wait that no coordinator can end."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as exc:
        return f"the SuperLink's host {host!r} does not resolve ({exc})"
    return None
