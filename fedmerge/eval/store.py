"""The results store: one SQLite file holding every score and every gate decision.

SQLite because a person can query it with the ``sqlite3`` shell (``SELECT label, round, task,
value FROM scores``) and because several processes (a coordinator, an offline ``fedmerge eval``)
may append at once: the file runs in WAL mode, each append is one ``BEGIN IMMEDIATE``
transaction, and writers wait on a busy timeout instead of failing or interleaving rows.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from fedmerge.eval.errors import StoreError

ROLES = ("base", "parent", "merge")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      TEXT NOT NULL,     -- one evaluation of one model (all its tasks)
    time        TEXT NOT NULL,     -- ISO 8601, UTC
    round       INTEGER,           -- federation round; NULL outside a federation
    label       TEXT NOT NULL,     -- what was scored: 'base', a hospital, a merge method
    role        TEXT NOT NULL,     -- base | parent | merge (rows of the report table)
    strategy    TEXT,              -- merge method, when the model is a merge
    params      TEXT,              -- JSON of the merge parameters
    fingerprint TEXT,              -- sha256 over the model's tensors
    model       TEXT,              -- folder scored, or '<in-memory>'
    task        TEXT NOT NULL,
    metric      TEXT NOT NULL,     -- acc, acc_norm, ...
    value       REAL,
    stderr      REAL,
    n           INTEGER,           -- items scored
    num_fewshot INTEGER,
    item_limit  REAL,
    seed        INTEGER,
    task_version TEXT              -- the task's version (its config's metadata), as lm-eval reports it
);
CREATE INDEX IF NOT EXISTS scores_label_round ON scores(label, round);
CREATE INDEX IF NOT EXISTS scores_run ON scores(run_id);
CREATE TABLE IF NOT EXISTS gate_decisions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    time           TEXT NOT NULL,
    round          INTEGER,
    label          TEXT,
    fingerprint    TEXT,
    run_id         TEXT,
    published      INTEGER NOT NULL,   -- 1 = may be published, 0 = refused
    reason         TEXT NOT NULL,
    metric         TEXT,
    score          REAL,               -- candidate's score on the gate metric
    reference      REAL,               -- the score it was compared with
    reference_kind TEXT,               -- previous | base | none
    margin         REAL
);
"""

# Columns added after the first stores were written: (table, column, SQL type).
_ADDED_COLUMNS = [("scores", "task_version", "TEXT")]


@dataclass(frozen=True)
class ScoreRecord:
    run_id: str
    task: str
    metric: str
    value: float | None
    stderr: float | None
    label: str
    role: str = "merge"
    round: int | None = None
    strategy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None
    model: str | None = None
    n: int | None = None
    num_fewshot: int | None = None
    item_limit: float | None = None
    seed: int | None = None
    task_version: str | None = None
    time: str = ""
    id: int | None = None


@dataclass(frozen=True)
class GateRecord:
    published: bool
    reason: str
    round: int | None = None
    label: str | None = None
    fingerprint: str | None = None
    run_id: str | None = None
    metric: str | None = None
    score: float | None = None
    reference: float | None = None
    reference_kind: str = "none"
    margin: float | None = None
    time: str = ""
    id: int | None = None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class ResultsStore:
    """Append-only score and gate-decision tables in one SQLite file."""

    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    # ----------------------------------------------------------------- connections

    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open results store: {exc}") from None
        con.row_factory = sqlite3.Row
        return con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            self._begin_immediate(con)
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: results store write failed: {exc}") from None
        finally:
            con.close()

    def _begin_immediate(self, con: sqlite3.Connection) -> None:
        # The busy timeout covers most contention; a short retry loop covers the rest
        # (e.g. while another process switches the file to WAL).
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                con.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _init_schema(self) -> None:
        con = self._connect()
        try:
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    con.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise StoreError(f"{self.path}: cannot open results store: {exc}") from None
                    time.sleep(0.05)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a results store (SQLite) file: {exc}") from None
        finally:
            con.close()
        con = self._connect()
        try:
            con.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            self._add_missing_columns(con)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: cannot create the results tables: {exc}") from None
        finally:
            con.close()

    def _add_missing_columns(self, con: sqlite3.Connection) -> None:
        """Stores written before a column existed get it (empty for their old rows)."""
        for table, column, kind in _ADDED_COLUMNS:
            have = {row["name"] for row in con.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._begin_immediate(con)
                try:
                    have = {row["name"] for row in con.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise

    # ----------------------------------------------------------------- writing

    def append_scores(self, records: Iterable[ScoreRecord]) -> int:
        """Append score rows in one transaction (all or none). Returns the number written."""
        rows = []
        now = utc_now()
        for r in records:
            if r.role not in ROLES:
                raise StoreError(f"score role {r.role!r} is not one of {', '.join(ROLES)}")
            rows.append(
                (
                    r.run_id, r.time or now, r.round, r.label, r.role, r.strategy,
                    json.dumps(r.params, sort_keys=True, default=str), r.fingerprint, r.model,
                    r.task, r.metric, r.value, r.stderr, r.n, r.num_fewshot, r.item_limit, r.seed, r.task_version,
                )
            )
        with self._write() as con:
            con.executemany(
                "INSERT INTO scores (run_id, time, round, label, role, strategy, params, fingerprint, model,"
                " task, metric, value, stderr, n, num_fewshot, item_limit, seed, task_version)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        return len(rows)

    def record_gate(self, decision: GateRecord) -> GateRecord:
        rec = GateRecord(**{**asdict(decision), "time": decision.time or utc_now()})
        with self._write() as con:
            cur = con.execute(
                "INSERT INTO gate_decisions (time, round, label, fingerprint, run_id, published, reason, metric,"
                " score, reference, reference_kind, margin) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.time, rec.round, rec.label, rec.fingerprint, rec.run_id, int(rec.published), rec.reason,
                 rec.metric, rec.score, rec.reference, rec.reference_kind, rec.margin),
            )
            rec = GateRecord(**{**asdict(rec), "id": cur.lastrowid})
        return rec

    # ----------------------------------------------------------------- reading

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        """Run a read-only SQL query (for people and reports)."""
        con = self._connect()
        try:
            return list(con.execute(sql, params))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: query failed: {exc}") from None
        finally:
            con.close()

    def scores(self, *, task: str | None = None, metric: str | None = None, label: str | None = None,
               role: str | None = None, round: int | None = None, run_id: str | None = None) -> list[ScoreRecord]:
        where, args = [], []
        for col, val in (("task", task), ("metric", metric), ("label", label), ("role", role), ("round", round), ("run_id", run_id)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "SELECT * FROM scores" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return [_score_from_row(r) for r in self.query(sql, tuple(args))]

    def gate_decisions(self) -> list[GateRecord]:
        return [_gate_from_row(r) for r in self.query("SELECT * FROM gate_decisions ORDER BY id")]

    def last_published(self) -> GateRecord | None:
        rows = self.query("SELECT * FROM gate_decisions WHERE published = 1 ORDER BY id DESC LIMIT 1")
        return _gate_from_row(rows[0]) if rows else None

    def run_scores(self, run_id: str) -> dict[str, dict[str, tuple[float | None, float | None]]]:
        """``{task: {metric: (value, stderr)}}`` of one evaluation run."""
        out: dict[str, dict[str, tuple[float | None, float | None]]] = {}
        for r in self.scores(run_id=run_id):
            out.setdefault(r.task, {})[r.metric] = (r.value, r.stderr)
        return out

    def latest_run(self, *, role: str | None = None, label: str | None = None) -> str | None:
        where, args = [], []
        if role:
            where.append("role = ?")
            args.append(role)
        if label:
            where.append("label = ?")
            args.append(label)
        sql = "SELECT run_id FROM scores" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT 1"
        rows = self.query(sql, tuple(args))
        return rows[0]["run_id"] if rows else None


def _score_from_row(r: sqlite3.Row) -> ScoreRecord:
    d = dict(r)
    d["params"] = json.loads(d["params"]) if d.get("params") else {}
    return ScoreRecord(**d)


def _gate_from_row(r: sqlite3.Row) -> GateRecord:
    d = dict(r)
    d["published"] = bool(d["published"])
    return GateRecord(**d)
