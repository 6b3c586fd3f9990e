"""The SQLite results store: round trip, concurrent appends from several processes, bad files."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from fedmerge.eval.errors import StoreError
from fedmerge.eval.store import GateRecord, ResultsStore, ScoreRecord

WRITERS = 4
RUNS_PER_WRITER = 20
ROWS_PER_RUN = 5


def _record(run: str, task: str, value: float, **kw) -> ScoreRecord:
    return ScoreRecord(run_id=run, task=task, metric="acc", value=value, stderr=value / 10, label=kw.pop("label", "ties"), **kw)


def test_round_trip(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    recs = [
        _record("run1", "medqa", 0.5, round=3, role="merge", strategy="ties", params={"density": 0.5, "weights": [1, 2]},
                fingerprint="sha256:ab", model="/m", n=100, num_fewshot=5, item_limit=100.0, seed=7),
        _record("run1", "pubmedqa", 0.25, round=3, strategy="ties"),
        _record("run2", "medqa", 0.75, label="base", role="base"),
    ]
    assert store.append_scores(recs) == 3
    got = ResultsStore(tmp_path / "r.db").scores()  # a second handle on the same file
    assert [(r.run_id, r.task, r.value, r.stderr, r.label, r.role) for r in got] == [
        ("run1", "medqa", 0.5, 0.05, "ties", "merge"), ("run1", "pubmedqa", 0.25, 0.025, "ties", "merge"), ("run2", "medqa", 0.75, 0.075, "base", "base")]
    first = got[0]
    assert first.params == {"density": 0.5, "weights": [1, 2]} and first.fingerprint == "sha256:ab" and first.round == 3
    assert (first.model, first.n, first.num_fewshot, first.item_limit, first.seed, first.strategy) == ("/m", 100, 5, 100.0, 7, "ties")
    assert first.time.endswith("+00:00") and first.id is not None
    assert store.run_scores("run1") == {"medqa": {"acc": (0.5, 0.05)}, "pubmedqa": {"acc": (0.25, 0.025)}}
    assert [r.task for r in store.scores(label="ties", task="pubmedqa")] == ["pubmedqa"]
    assert store.latest_run(role="base") == "run2" and store.latest_run(role="parent") is None
    # A person can query it with plain SQL.
    rows = sqlite3.connect(tmp_path / "r.db").execute("SELECT label, round, task, value FROM scores WHERE role='merge' ORDER BY task").fetchall()
    assert rows == [("ties", 3, "medqa", 0.5), ("ties", 3, "pubmedqa", 0.25)]


def test_gate_records_round_trip(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    assert store.last_published() is None
    a = store.record_gate(GateRecord(published=True, reason="ok", round=1, run_id="r1", score=0.5, reference=0.4, reference_kind="base", margin=0.02))
    store.record_gate(GateRecord(published=False, reason="too low", round=2, run_id="r2", score=0.1, reference=0.5, reference_kind="previous", margin=0.02))
    decisions = store.gate_decisions()
    assert [(d.published, d.reason, d.round) for d in decisions] == [(True, "ok", 1), (False, "too low", 2)]
    assert store.last_published().run_id == "r1" and store.last_published().id == a.id


def test_bad_role_refused_and_nothing_written(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    with pytest.raises(StoreError, match="role 'hospital'"):
        store.append_scores([_record("a", "t", 0.1), _record("a", "t2", 0.2, role="hospital")])
    assert store.scores() == []


def test_not_a_store_file(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="notes.db"):
        ResultsStore(bad)


def _writer(path: str, worker: int) -> None:
    store = ResultsStore(path)
    for r in range(RUNS_PER_WRITER):
        run = f"w{worker}-r{r}"
        store.append_scores(_record(run, f"task{k}", (worker * 1000 + r * 10 + k) / 10000, round=r, label=f"w{worker}") for k in range(ROWS_PER_RUN))
        if r % 5 == 0:
            store.record_gate(GateRecord(published=True, reason=run, run_id=run))


def test_concurrent_appends_from_processes(tmp_path):
    path = tmp_path / "shared.db"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    store = ResultsStore(path)
    assert store.query("PRAGMA integrity_check")[0][0] == "ok"
    rows = store.scores()
    assert len(rows) == WRITERS * RUNS_PER_WRITER * ROWS_PER_RUN
    assert len({r.id for r in rows}) == len(rows)
    # Every run's rows are complete, correct, and contiguous (one transaction each).
    by_run: dict[str, list] = {}
    for r in rows:
        by_run.setdefault(r.run_id, []).append(r)
    assert len(by_run) == WRITERS * RUNS_PER_WRITER
    for run, rs in by_run.items():
        w, r = (int(x[1:]) for x in run.split("-"))
        assert [x.task for x in rs] == [f"task{k}" for k in range(ROWS_PER_RUN)]
        assert [x.value for x in rs] == [(w * 1000 + r * 10 + k) / 10000 for k in range(ROWS_PER_RUN)]
        ids = [x.id for x in rs]
        assert ids == list(range(ids[0], ids[0] + ROWS_PER_RUN))
    assert len(store.gate_decisions()) == WRITERS * (RUNS_PER_WRITER // 5)
