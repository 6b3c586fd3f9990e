"""Every round's record, persisted as JSON next to the round's spool, and the question "where do we resume?".

A round's ``record.json`` moves through statuses: ``open`` (collecting), ``merged`` (the signed
model is on disk), ``completed`` (pushed back), or ``failed`` (no quorum). The coordinator resumes
at the first round that is not ``completed``; a ``merged`` round is pushed again, not merged again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fedmerge.checkpoints.atomic import write_json_atomic


class RoundLedger:
    def __init__(self, state_dir: str | os.PathLike[str]):
        self.state = Path(state_dir)
        (self.state / "rounds").mkdir(parents=True, exist_ok=True)

    def path(self, round_id: int) -> Path:
        return self.state / "rounds" / f"round-{round_id:04d}" / "record.json"

    def load(self, round_id: int) -> dict[str, Any] | None:
        p = self.path(round_id)
        return json.loads(p.read_text()) if p.exists() else None

    def save(self, record: dict[str, Any]) -> None:
        record["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json_atomic(self.path(int(record["round"])), record)

    def new(self, round_id: int, **fields: Any) -> dict[str, Any]:
        record = {
            "round": round_id,
            "status": "open",
            "sampled": [],
            "contributors": [],
            "rejections": [],
            "dropped": [],
            "events": [],
        }
        record.update(fields)
        return record

    def records(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted((self.state / "rounds").glob("round-*/record.json")):
            out.append(json.loads(p.read_text()))
        return out

    def last_completed(self) -> int:
        done = [r["round"] for r in self.records() if r["status"] == "completed"]
        return max(done, default=0)

    def model_dir(self, round_id: int) -> Path:
        return self.state / "models" / f"round-{round_id:04d}"
