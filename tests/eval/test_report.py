"""Reports: the Table IV-shaped Markdown table and the PNG plots, from a results store."""

from __future__ import annotations

import pytest

from fedmerge.cli import main
from fedmerge.eval.report import markdown_table, runs, table_rows, task_columns, write_report
from fedmerge.eval.store import GateRecord, ResultsStore, ScoreRecord

TASKS = ["medqa", "pubmedqa", "mmlu_pm"]


def _add(store, run, label, role, rnd, accs, ses=(0.01, 0.02, 0.03)):
    store.append_scores(ScoreRecord(run_id=run, task=t, metric="acc", value=v, stderr=s, label=label, role=role, round=rnd)
                        for t, v, s in zip(TASKS, accs, ses))


@pytest.fixture()
def filled_store(tmp_path):
    store = ResultsStore(tmp_path / "results.db")
    _add(store, "b", "base", "base", None, [0.40, 0.50, 0.60])
    _add(store, "p1", "hospital-a", "parent", None, [0.45, 0.52, 0.58])
    _add(store, "p2", "hospital-b", "parent", None, [0.42, 0.55, 0.61])
    for rnd, (t, s) in enumerate([(0.44, 0.47), (0.46, 0.48), (0.47, 0.50)]):
        _add(store, f"ties{rnd}", "ties", "merge", rnd, [t, 0.55, 0.62])
        _add(store, f"slerp{rnd}", "slerp", "merge", rnd, [s, 0.53, 0.6123])
    store.record_gate(GateRecord(published=False, reason="mean acc too low", round=1, label="ties", score=0.5, reference=0.55, reference_kind="previous"))
    return store


def test_table_rows_and_cells(filled_store):
    all_runs = runs(filled_store)
    rows = table_rows(all_runs)
    assert [(r.label, r.role, r.round) for r in rows] == [
        ("base", "base", None), ("hospital-a", "parent", None), ("hospital-b", "parent", None), ("slerp", "merge", 2), ("ties", "merge", 2)]
    md = markdown_table(rows, task_columns(all_runs))
    lines = md.splitlines()
    assert lines[0] == "| Model | Role | Round | medqa | pubmedqa | mmlu_pm | Average |"
    # base: mean 0.5; stderr of the mean sqrt(.01^2+.02^2+.03^2)/3 = 0.012472
    assert lines[2] == "| base | base | - | 40.00 ± 1.00 | 50.00 ± 2.00 | 60.00 ± 3.00 | 50.00 ± 1.25 |"
    # slerp: best medqa (0.50) and best average ((0.50+0.53+0.6123)/3 = 54.74 > ties' 54.67)
    assert lines[5] == "| slerp | merge | 2 | **50.00 ± 1.00** | 53.00 ± 2.00 | 61.23 ± 3.00 | **54.74 ± 1.25** |"
    assert lines[6] == "| ties | merge | 2 | 47.00 ± 1.00 | **55.00 ± 2.00** | **62.00 ± 3.00** | 54.67 ± 1.25 |"


def test_write_report_and_cli(filled_store, tmp_path, capsys):
    files = write_report(filled_store.path, tmp_path / "rep")
    text = files.markdown.read_text()
    assert "| 1 | ties | **refused** | 50.00 | previous 55.00 | mean acc too low |" in text
    assert "| 2 | ties | 54.67 | 47.00 | 55.00 | 62.00 |" in text
    assert [p.name for p in files.plots] == ["methods.png", "vs_base.png", "rounds.png"]
    import matplotlib.image as mpimg

    for p in files.plots:
        img = mpimg.imread(p)
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # something is drawn, not a blank canvas
        assert f"![{p.stem}]({p.name})" in text
    assert main(["report", str(filled_store.path), "--out", str(tmp_path / "rep2")]) == 0
    assert sorted(p.name for p in (tmp_path / "rep2").iterdir()) == ["methods.png", "report.md", "rounds.png", "vs_base.png"]
    assert main(["report", str(tmp_path / "missing.db")]) == 1
    assert "missing.db: results store not found" in capsys.readouterr().err
