"""``fedmerge coordinator``: start and own the SuperLink, register node keys, submit the app, follow the rounds.

The round loop runs inside the ServerApp process the SuperLink starts for the run; this process
owns the SuperLink (and through it the ServerApp) and reports progress from the round records
the loop writes. Stages, in order:

1. ``start``: refuse a SuperLink an earlier coordinator left running on this state, or a taken
   port; start the SuperLink (full API on loopback only); register the SuperNode keys of the
   config over loopback Control; then open the public Fleet listener: no SuperNode can connect
   before its key is registered. Logs ``registered N SuperNode key(s)`` and ``ready``.
2. ``submit``: a run of this fedmerge's app bundle. The ServerApp runs only the config this
   coordinator was started with (path and SHA-256 pinned in its environment).
3. ``wait``: report each round as it completes; submit again if Flower ends the run early (the
   round loop resumes from disk).
4. ``stop``: the SuperLink, its SuperExec, the ServerApp launcher and the ServerApp end. They
   also end if this process is killed, even with SIGKILL.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fedmerge.federation import flower
from fedmerge.federation.credentials import LOOPBACK, certificate_hosts, require_owner_only_writable
from fedmerge.federation.errors import DaemonConfigError, RoundsFailed
from fedmerge.flower_internals import ControlApiError
from fedmerge.security.keys import load_identity, read_passphrase_file
from fedmerge.server.app import pinned_config_env
from fedmerge.server.config import FederationConfig, load_federation_config
from fedmerge.server.ledger import Progress, RoundLedger
from fedmerge.server.record import RoundRecord, RoundStatus
from fedmerge.server.rounds import load_coordinator_trust
from fedmerge.server.status import summary_line

log = logging.getLogger(__name__)


def supernode_key_files(cfg: FederationConfig) -> list[Path]:
    """The SuperNode public keys the config binds to institutions (institution -> file)."""
    return [Path(p) for p in (cfg.superlink.supernode_public_keys.values() if cfg.superlink else [])]


class CoordinatorDaemon:
    """The coordinator's processes for one federation config.

    ``superlink_class`` is the SuperLink it starts (a subclass may, say, log more); it gets the
    config's address, certificates, database and the pinned-config environment.
    """

    def __init__(self, config_path: str | os.PathLike[str], superlink_class: type[flower.SuperLink] = flower.SuperLink):
        self.config_path = Path(config_path).resolve()
        self.cfg = load_federation_config(self.config_path)
        sl = self.cfg.superlink
        if sl is None:
            raise DaemonConfigError(f"{self.config_path}: no 'superlink' section; `fedmerge simulate` runs a federation without one")
        if sl.server_cert and LOOPBACK not in certificate_hosts(sl.server_cert):
            raise DaemonConfigError(
                f"{self.config_path}: superlink.server_cert {sl.server_cert} is not valid for {LOOPBACK}, where the coordinator "
                f"reaches its own SuperLink's Control API; issue it for {LOOPBACK} too (`fedmerge tls-certs` always does)"
            )
        for path in supernode_key_files(self.cfg):
            if not path.is_file():
                raise DaemonConfigError(f"{self.config_path}: superlink.supernode_public_keys: {path} is not a file")
        require_owner_only_writable(self.config_path, "the federation config")
        for what, path in [("trust_store", self.cfg.trust_store), ("superlink.ca_cert", sl.ca_cert)] + [
            (f"superlink.supernode_public_keys.{inst}", p) for inst, p in sl.supernode_public_keys.items()
        ]:
            require_owner_only_writable(path, f"{self.config_path}: {what}")
        # Refuse a trust store the coordinator's own key did not sign before any Flower process starts.
        load_coordinator_trust(self.cfg, load_identity(self.cfg.coordinator_key, read_passphrase_file(self.cfg.coordinator_key_passphrase_file)))
        self.superlink = superlink_class(
            self.cfg.state / "superlink",
            sl.address,
            sl.ca_cert,
            sl.server_cert or "",
            sl.server_key or "",
            (sl.database_path or self.cfg.state / "superlink.db") if sl.link_state == "file" else None,
            serverapp_env=pinned_config_env(self.config_path),
        )
        self.ledger = RoundLedger(self.cfg.state)
        self.run_id: int | None = None
        self.submitted_at: float | None = None
        self.log_file = self.cfg.state / "coordinator.log"

    # -- 1. start -----------------------------------------------------------------------------------
    def start(self) -> "CoordinatorDaemon":
        self.cfg.state.mkdir(parents=True, exist_ok=True)
        self.superlink.start()
        keys = supernode_key_files(self.cfg)
        node_ids = self.superlink.register_supernodes(keys)
        log.info(
            "registered %d SuperNode key(s) on the SuperLink (node ids %s)",
            len(node_ids), ", ".join(f"{p.name}={n}" for p, n in node_ids.items()) or "none",
        )  # fmt: skip
        self.superlink.open_fleet()
        log.info(
            "ready: Fleet API open to SuperNodes on %s; Control and runtime APIs on %s only (log %s)",
            self.superlink.public, self.superlink.loopback, self.superlink.log_file,
        )  # fmt: skip
        return self

    # -- 2. submit ----------------------------------------------------------------------------------
    def submit(self) -> int:
        app_dir = flower.write_app_dir(self.cfg.state / "app")
        if self.submitted_at is None:
            self.submitted_at = time.time()
        self.run_id = self.superlink.submit(app_dir, self.config_path)
        log.info("run %s submitted (app sha256 %s); rounds 1..%d, state in %s", self.run_id, flower.app_hash(app_dir), self.cfg.rounds, self.cfg.state)
        return self.run_id

    def run_finished(self) -> bool:
        """Whether Flower ended our run (the ServerApp returned, failed or was stopped)."""
        if self.run_id is None:
            return False
        try:
            return self.superlink.run_status(self.run_id).startswith("finished")
        except ControlApiError as exc:
            log.debug("run status unavailable: %s", exc)
            return False

    # -- 3. wait ------------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None, poll_s: float = 2.0, max_resubmits: int = 3, status_every_s: float = 10.0) -> list[RoundRecord]:
        """Until every round is completed; ``RoundsFailed`` if one failed, the run kept ending, or time ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        reported: set[tuple[int, str]] = set()
        resubmits = 0
        last_status = time.monotonic()
        while True:
            records = self.ledger.records()
            for r in records:
                if (r.status.terminal or self._failed_in_this_run(r)) and (r.round, r.status.value) not in reported:
                    reported.add((r.round, r.status.value))
                    log.info("%s", summary_line(r))
            progress = Progress.of(records, self.cfg.rounds)
            if progress.failed is not None and self._failed_in_this_run(progress.failed):
                failed = progress.failed
                raise RoundsFailed(f"round {failed.round} failed: {failed.failure or 'see the record'} (records in {self.cfg.state / 'rounds'}, log {self.log_file})")
            if progress.done >= progress.planned:
                return records
            self.superlink.check_alive()
            if time.monotonic() - last_status > status_every_s:
                last_status = time.monotonic()
                if self.run_finished():
                    if resubmits >= max_resubmits:
                        raise RoundsFailed(f"run {self.run_id} ended before the rounds finished, {resubmits} resubmission(s) already (logs: {self.log_file}, {self.superlink.log_file})")
                    resubmits += 1
                    log.warning("run %s ended before the rounds finished; submitting again (the round loop resumes from disk)", self.run_id)
                    self.submit()
            if deadline is not None and time.monotonic() > deadline:
                raise RoundsFailed(f"rounds not finished within {timeout:.0f} s (state {self.cfg.state}, log {self.log_file})")
            time.sleep(poll_s)

    def _failed_in_this_run(self, r: RoundRecord) -> bool:
        """A round that failed before this coordinator submitted its run is tried again by the ServerApp, not reported."""
        return r.status == RoundStatus.FAILED and (r.updated_at or 0) >= (self.submitted_at or 0)

    # -- 4. stop ------------------------------------------------------------------------------------
    def stop(self) -> None:
        self.superlink.stop()
