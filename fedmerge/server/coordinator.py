"""``fedmerge coordinator``: stand up (or reach) the SuperLink, submit the fedmerge app, follow the rounds.

The round loop itself runs inside the ServerApp process Flower starts for the run; this process
owns the SuperLink's lifetime and reports progress from the ledger the round loop writes.
Restarting this command after a crash submits the app again; the round loop resumes from disk.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fedmerge.errors import FedmergeError
from fedmerge.federation import flower
from fedmerge.server.config import FederationConfig, load_federation_config
from fedmerge.server.ledger import RoundLedger
from fedmerge.server.record import RoundRecord, RoundStatus

log = logging.getLogger(__name__)


class CoordinatorError(FedmergeError):
    """The coordinator cannot run as configured (no SuperLink section, SuperLink died...)."""


class Coordinator:
    def __init__(self, config_path: str | os.PathLike[str], config: FederationConfig | None = None):
        self.config_path = Path(config_path).resolve()
        self.cfg = config or load_federation_config(self.config_path)
        if self.cfg.superlink is None:
            raise CoordinatorError(f"{self.config_path}: no 'superlink' section; `fedmerge simulate` runs a federation without one")
        sl = self.cfg.superlink
        home = self.cfg.state / "superlink"
        self.superlink = flower.SuperLink(
            home,
            sl.address,
            sl.ca_cert,
            sl.server_cert or "",
            sl.server_key or "",
            sl.database_path or str(self.cfg.state / "superlink.db"),
        )
        self.ledger = RoundLedger(self.cfg.state)
        self.run_id: int | None = None

    def start(self) -> "Coordinator":
        self.cfg.state.mkdir(parents=True, exist_ok=True)
        if self.cfg.superlink.start:  # type: ignore[union-attr]
            self.superlink.start()
        else:
            self.superlink.write_connection()
        keys = self.cfg.superlink.supernode_public_keys  # type: ignore[union-attr]
        if keys:
            self.register(list(keys.values()))
        return self

    def register(self, public_key_files: list[str]) -> None:
        """Allow these SuperNodes to connect (their OpenSSH public keys)."""
        try:
            self.superlink.register_supernodes(list(public_key_files))
        except flower.FlowerLaunchError as exc:
            if "already" not in str(exc).lower():  # keys kept in the SuperLink database across restarts
                raise
        log.info("registered %d SuperNode key(s)", len(public_key_files))

    def submit(self) -> int:
        app_dir = flower.write_app_dir(self.cfg.state / "app")
        log.info("submitting the fedmerge app (sha256 %s)", flower.app_hash(app_dir))
        self.run_id = self.superlink.submit(app_dir, self.config_path)
        log.info("run %s submitted; rounds 1..%d, state in %s", self.run_id, self.cfg.rounds, self.cfg.state)
        return self.run_id

    def progress(self) -> list[RoundRecord]:
        return self.ledger.records()

    def run_finished(self) -> bool:
        """Whether Flower ended our run (the ServerApp exited or was stopped)."""
        if self.run_id is None:
            return False
        try:
            return self.superlink.run_status(self.run_id).startswith("finished")
        except (flower.FlowerLaunchError, ValueError) as exc:
            log.debug("run status unavailable: %s", exc)
            return False

    def wait(self, timeout: float | None = None, poll_s: float = 2.0, max_resubmits: int = 3, status_every_s: float = 15.0) -> list[RoundRecord]:
        """Until every round is completed (or one failed); reports each round once as it finishes.

        If Flower ends the run before the rounds are done (the ServerApp died, e.g. the SuperLink
        lost its task heartbeat), the app is submitted again: the round loop resumes from disk.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        reported: set[tuple[int, str]] = set()
        resubmits = 0
        last_status = time.monotonic()
        while True:
            records = self.ledger.records()
            for r in records:
                key = (r.round, r.status.value)
                if (r.status.terminal or r.status == RoundStatus.FAILED) and key not in reported:
                    reported.add(key)
                    log.info(
                        "round %d %s: contributors %s, rejected %s, dropped %s",
                        r.round, r.status.value, r.contributors, [x.institution for x in r.rejections], [x.institution for x in r.drops],
                    )  # fmt: skip
            done = [r for r in records if r.status.terminal]
            if any(r.status == RoundStatus.FAILED for r in records) or len(done) >= self.cfg.rounds:
                return records
            if time.monotonic() - last_status > status_every_s:
                last_status = time.monotonic()
                if self.run_finished():
                    if resubmits >= max_resubmits:
                        raise CoordinatorError(f"run {self.run_id} ended before the rounds finished, {resubmits} resubmission(s) already; see {self.cfg.state / 'coordinator.log'}")
                    resubmits += 1
                    log.warning("run %s ended before the rounds finished; submitting again (resume from disk)", self.run_id)
                    self.submit()
            if self.superlink.proc is not None and self.superlink.proc.poll() is not None:
                raise CoordinatorError(f"the SuperLink exited (code {self.superlink.proc.returncode}); see {self.superlink.log_file}")
            if deadline is not None and time.monotonic() > deadline:
                raise CoordinatorError(f"rounds not finished within {timeout:.0f} s; state in {self.cfg.state}")
            time.sleep(poll_s)

    def stop(self) -> None:
        self.superlink.stop()
