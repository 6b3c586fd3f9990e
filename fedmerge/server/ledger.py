"""Every round's record on disk (``rounds/round-NNNN/record.json``), and where to resume.

Each save is atomic (written beside, fsynced, renamed), so a reader (``fedmerge status``, a
restarted coordinator) sees the record before or after a decision, never half of it. The
coordinator resumes at the first round whose status is not terminal (completed or refused); a
``merged`` round is evaluated or pushed again, not merged again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from fedmerge.checkpoints.atomic import write_json_atomic
from fedmerge.configfile import describe_validation_error
from fedmerge.server.errors import RecordFormatError
from fedmerge.server.record import RECORD_FORMAT, EventKind, RoundEvent, RoundRecord, RoundStatus


class RoundLedger:
    def __init__(self, state_dir: str | os.PathLike[str], create: bool = True):
        self.state = Path(state_dir)
        if create:
            (self.state / "rounds").mkdir(parents=True, exist_ok=True)

    def path(self, round_id: int) -> Path:
        return self.state / "rounds" / f"round-{round_id:04d}" / "record.json"

    def model_dir(self, round_id: int) -> Path:
        return self.state / "models" / f"round-{round_id:04d}"

    def load(self, round_id: int) -> RoundRecord | None:
        p = self.path(round_id)
        return self._read(p) if p.exists() else None

    def save(self, record: RoundRecord) -> None:
        record.updated_at = time.time()
        write_json_atomic(self.path(record.round), record.model_dump(mode="json"))

    def records(self) -> list[RoundRecord]:
        return [self._read(p) for p in sorted((self.state / "rounds").glob("round-*/record.json"))]

    def last_done(self) -> int:
        """The highest round the loop is done with (completed or refused by the gate)."""
        return max((r.round for r in self.records() if r.status.terminal), default=0)

    def last_published(self, before: int | None = None) -> RoundRecord | None:
        """The newest completed round (below ``before``): the model hospitals hold as current."""
        done = [r for r in self.records() if r.status == RoundStatus.COMPLETED and (before is None or r.round < before)]
        return max(done, key=lambda r: r.round, default=None)

    @staticmethod
    def _read(path: Path) -> RoundRecord:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RecordFormatError(f"{path}: unreadable round record ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise RecordFormatError(
                f"{path}: a round record from an earlier fedmerge (format {data.get('format') if isinstance(data, dict) else None!r}, "
                f"this one reads {RECORD_FORMAT!r}); move the state_dir aside and run the rounds again"
            )
        try:
            return RoundRecord.model_validate(data)
        except ValidationError as exc:
            raise RecordFormatError(f"{path}: {describe_validation_error(exc)}") from None


@dataclass(frozen=True)
class Progress:
    """How far a federation's rounds are, from their records: what ``status --watch`` and the coordinator wait for."""

    done: int  # rounds completed or refused by the gate
    planned: int
    failed: RoundRecord | None  # the last round, when it failed (the coordinator stopped there)

    @classmethod
    def of(cls, records: list[RoundRecord], planned: int) -> "Progress":
        last = records[-1] if records else None
        return cls(sum(1 for r in records if r.status.terminal), planned, last if last is not None and last.status == RoundStatus.FAILED else None)

    @property
    def finished(self) -> bool:
        return self.failed is not None or self.done >= self.planned


class RoundJournal:
    """One round's record as it is being decided: every decision saved, then announced.

    ``emit`` appends the event to the record, saves the record atomically, and only then hands
    the event to ``on_event``: whatever a callback does (report progress, stop the process to
    test a restart), the decision it is told about is already on disk.
    """

    def __init__(self, ledger: RoundLedger, record: RoundRecord, on_event: Callable[[RoundEvent], None] | None = None):
        self.ledger = ledger
        self.record = record
        self.on_event = on_event

    def save(self) -> None:
        self.ledger.save(self.record)

    def emit(self, kind: EventKind, *, institution: str | None = None, node: int | None = None, detail: str = "") -> RoundEvent:
        event = RoundEvent(round=self.record.round, kind=kind, institution=institution, node=node, detail=detail)
        self.record.events.append(event)
        self.save()
        if self.on_event is not None:
            self.on_event(event)
        return event
