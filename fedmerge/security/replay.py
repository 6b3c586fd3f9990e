"""Replay protection that survives restarts: the rounds and nonces already accepted per sender.

A package is refused when its round is older than the last round accepted from its sender
(stale), or when its nonce was accepted before (replayed). Nonces of rounds older than the last
one are dropped from the file: such packages are refused as stale anyway, so the file stays as
small as one round's worth of nonces per sender. With ``strict_rounds`` a sender may contribute
only once per round.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from fedmerge.checkpoints.atomic import write_json_atomic
from fedmerge.security.errors import ReplayedNonce, SecurityError, StaleRound

GUARD_FORMAT = "fedmerge-replay/1"


class ReplayGuard:
    """Seen (sender, nonce) pairs and the last accepted round per sender, persisted as JSON."""

    def __init__(self, path: str | os.PathLike[str] | None = None, strict_rounds: bool = False):
        self.path = Path(path) if path is not None else None
        self.strict_rounds = strict_rounds
        self._lock = threading.Lock()
        self._state: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            self._state = self._read()

    def _read(self) -> dict[str, dict]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != GUARD_FORMAT or not isinstance(data.get("senders"), dict):
                raise ValueError(f"format is not {GUARD_FORMAT!r}")
            state = {}
            for sender, s in data["senders"].items():
                state[str(sender)] = {"last_round": int(s["last_round"]), "nonces": set(map(str, s["nonces"]))}
            return state
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SecurityError(f"{self.path}: replay guard file is damaged ({exc}); restore it from a backup, never delete it", path=self.path) from None

    def _write(self) -> None:
        if self.path is None:
            return
        data = {"format": GUARD_FORMAT, "senders": {s: {"last_round": v["last_round"], "nonces": sorted(v["nonces"])} for s, v in sorted(self._state.items())}}
        write_json_atomic(self.path, data, indent=None)

    @contextmanager
    def _locked(self):
        """Thread lock plus an advisory file lock, so two processes sharing the file agree."""
        with self._lock:
            if self.path is None:
                yield
                return
            import fcntl

            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    if self.path.exists():
                        self._state = self._read()
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _check(self, sender: str, round_id: int, nonce: str) -> None:
        s = self._state.get(sender)
        if s is None:
            return
        if nonce in s["nonces"]:
            raise ReplayedNonce(f"package from {sender!r} with nonce {nonce} was already accepted; a replay is refused", sender=sender)
        last = s["last_round"]
        if round_id < last or (self.strict_rounds and round_id == last):
            raise StaleRound(f"package from {sender!r} is for round {round_id}, but round {last} was already accepted from it; send a package for the current round", sender=sender)

    def check(self, sender: str, round_id: int, nonce: str) -> None:
        """Raise ``StaleRound`` / ``ReplayedNonce`` without recording anything."""
        with self._locked():
            self._check(sender, round_id, nonce)

    def record(self, sender: str, round_id: int, nonce: str) -> None:
        """Check again and remember the package as accepted (atomic with the check)."""
        with self._locked():
            self._check(sender, round_id, nonce)
            s = self._state.setdefault(sender, {"last_round": round_id, "nonces": set()})
            if round_id > s["last_round"]:
                s["last_round"] = round_id
                s["nonces"] = set()
            s["nonces"].add(nonce)
            self._write()

    def last_round(self, sender: str) -> int | None:
        s = self._state.get(sender)
        return None if s is None else s["last_round"]
