"""``fedmerge client``: a hospital's long-running SuperNode, running only the pinned fedmerge app.

The daemon checks its config and keys, then runs ``flower-supernode`` (TLS to the SuperLink,
authenticated with the node key the consortium registered) with ClientApps started through
``fedmerge.federation.guard``. The work of each round happens in those ClientApps; what they build
and install is under ``state_dir`` (see ``fedmerge.client.node``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fedmerge.client.config import ClientConfig, load_client_config
from fedmerge.errors import FedmergeError
from fedmerge.federation import flower

log = logging.getLogger(__name__)


class DaemonError(FedmergeError):
    """The client daemon cannot start as configured."""


class ClientDaemon:
    def __init__(self, config_path: str | os.PathLike[str], config: ClientConfig | None = None):
        self.config_path = Path(config_path).resolve()
        self.cfg = config or load_client_config(self.config_path)
        for field in ("root_cert", "supernode_key"):
            value = getattr(self.cfg, field)
            if not value or not Path(value).is_file():
                raise DaemonError(f"{self.config_path}: field {field!r} must name an existing file (got {value!r})")
        for field in ("identity_key", "trust_store", "base_model", "source"):
            value = getattr(self.cfg, field)
            if not Path(value).exists():
                raise DaemonError(f"{self.config_path}: {field} {value} does not exist")
        pins = list(self.cfg.pinned_app_hashes) or [flower.app_hash()]
        if not self.cfg.pinned_app_hashes:
            log.warning("no pinned_app_hashes in %s: pinning this fedmerge's own app bundle (sha256 %s)", self.config_path, pins[0])
        self.node = flower.SuperNode(
            self.cfg.state / "supernode",
            self.cfg.superlink_address,
            str(self.cfg.root_cert),
            str(self.cfg.supernode_key),
            str(self.config_path),
            self.cfg.runtime_port,
            pins,
        )

    def start(self) -> "ClientDaemon":
        self.cfg.state.mkdir(parents=True, exist_ok=True)
        self.node.start()
        log.info("%s: SuperNode started towards %s (log %s)", self.cfg.institution, self.cfg.superlink_address, self.node.log_file)
        return self

    def wait(self) -> int:
        while self.node.proc is not None and self.node.proc.poll() is None:
            time.sleep(1.0)
        return self.node.proc.returncode if self.node.proc is not None else 0

    def stop(self) -> None:
        self.node.stop()
