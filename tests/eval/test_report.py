"""Reports: tables and plots from a results store, comparing only runs measured alike."""

from __future__ import annotations

import sqlite3

import pytest

from fedmerge.cli import main
from fedmerge.eval.errors import MixedSettings
from fedmerge.eval.plots import family_colours, methods_figure, rounds_figure, vs_base_figure
from fedmerge.eval.report import comparisons, markdown_table, rounds_table, runs, table_rows, task_columns, write_report
from fedmerge.eval.store import GateRecord, ResultsStore, ScoreRecord

TASKS = ["medqa", "pubmedqa", "mmlu_pm"]
FIVE_SHOT = {"num_fewshot": 5, "item_limit": 20.0, "seed": 1234, "n": 20, "task_version": "1.0"}


def _add(store, run, label, role, rnd, accs, ses=(0.01, 0.02, 0.03), settings=FIVE_SHOT, strategy=None):
    store.append_scores(ScoreRecord(run_id=run, task=t, metric="acc", value=v, stderr=s, label=label, role=role, round=rnd,
                                    strategy=strategy, **settings)
                        for t, v, s in zip(TASKS, accs, ses))


@pytest.fixture()
def filled_store(tmp_path):
    store = ResultsStore(tmp_path / "results.db")
    _add(store, "b", "base", "base", None, [0.40, 0.50, 0.60])
    _add(store, "p1", "hospital-a", "parent", None, [0.45, 0.52, 0.58])
    _add(store, "p2", "hospital-b", "parent", None, [0.42, 0.55, 0.61])
    for rnd, (t, s) in enumerate([(0.44, 0.47), (0.46, 0.48), (0.47, 0.50)]):
        _add(store, f"ties{rnd}", "ties", "merge", rnd, [t, 0.55, 0.62], strategy="ties")
        _add(store, f"slerp{rnd}", "slerp", "merge", rnd, [s, 0.53, 0.6123], strategy="slerp")
    store.record_gate(GateRecord(published=False, reason="mean acc too low", round=1, label="ties", score=0.5, reference=0.55, reference_kind="previous"))
    return store


def test_table_rows_and_cells(filled_store):
    all_runs = runs(filled_store)
    rows = table_rows(all_runs)
    assert [(r.label, r.role, r.round) for r in rows] == [
        ("base", "base", None), ("hospital-a", "parent", None), ("hospital-b", "parent", None), ("slerp", "merge", 2), ("ties", "merge", 2)]
    md = markdown_table(rows, task_columns(all_runs))
    lines = md.splitlines()
    # Every row states its shots, items and seed; every task column its version.
    assert lines[0] == "| Model | Role | Round | Shots | Items | Seed | medqa (v1.0) | pubmedqa (v1.0) | mmlu_pm (v1.0) | Average |"
    # base: mean 0.5; stderr of the mean sqrt(.01^2+.02^2+.03^2)/3 = 0.012472
    assert lines[2] == "| base | base | input | 5 | 20 (limit 20) | 1234 | 40.00 ± 1.00 | 50.00 ± 2.00 | 60.00 ± 3.00 | 50.00 ± 1.25 |"
    # slerp: best medqa (0.50) and best average ((0.50+0.53+0.6123)/3 = 54.74 > ties' 54.67)
    assert lines[5] == "| slerp | merge | 2 | 5 | 20 (limit 20) | 1234 | **50.00 ± 1.00** | 53.00 ± 2.00 | 61.23 ± 3.00 | **54.74 ± 1.25** |"
    assert lines[6] == "| ties | merge | 2 | 5 | 20 (limit 20) | 1234 | 47.00 ± 1.00 | **55.00 ± 2.00** | **62.00 ± 3.00** | 54.67 ± 1.25 |"


def test_write_report_and_cli(filled_store, tmp_path, capsys):
    files = write_report(filled_store.path, tmp_path / "rep")
    text = files.markdown.read_text()
    assert "## Models: 5-shot, 20 items per task (limit 20), seed 1234" in text
    assert "Task versions: medqa 1.0, pubmedqa 1.0, mmlu_pm 1.0." in text
    assert "| 1 | ties | **refused** | 50.00 | previous 55.00 | mean acc too low |" in text
    assert "| 2 | ties | - | 54.67 | 47.00 | 55.00 | 62.00 |" in text
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


# ----------------------------------------------------------------------------- mixed settings


@pytest.fixture()
def mixed_store(tmp_path):
    """5-shot 20-item rows, one 0-shot 40-item run that scores highest, and a run whose only
    difference is a task's version."""
    store = ResultsStore(tmp_path / "mixed.db")
    _add(store, "b", "base", "base", None, [0.40, 0.50, 0.60])
    _add(store, "t", "ties", "merge", 1, [0.45, 0.55, 0.62], strategy="ties")
    _add(store, "l", "linear", "merge", 1, [0.44, 0.51, 0.61], strategy="linear")
    zero = {**FIVE_SHOT, "num_fewshot": 0, "item_limit": 40.0, "n": 40}
    _add(store, "z", "ties-0shot", "merge", None, [0.90, 0.90, 0.90], strategy="ties", settings=zero)
    _add(store, "v", "linear-v2", "merge", 1, [0.41, 0.52, 0.63], strategy="linear", settings={**FIVE_SHOT, "task_version": "2.0"})
    return store


def test_rows_with_other_settings_never_share_a_table(mixed_store, tmp_path):
    all_runs = runs(mixed_store)
    groups = comparisons(all_runs)
    assert [[r.label for r in g.rows] for g in groups] == [["base", "linear", "ties"], ["linear-v2"], ["ties-0shot"]]
    assert groups[0].settings.title() == "5-shot, 20 items per task (limit 20), seed 1234"
    assert {g.settings.title() for g in groups[1:]} == {"5-shot, 20 items per task (limit 20), seed 1234",
                                                       "0-shot, 40 items per task (limit 40), seed 1234"}
    # One table for all of them is refused, naming the rows and their settings.
    with pytest.raises(MixedSettings, match=r"ties-0shot: 0-shot, 40 items per task \(limit 40\), seed 1234"):
        markdown_table(table_rows(all_runs), task_columns(all_runs))
    with pytest.raises(MixedSettings, match="linear-v2"):
        rounds_table(all_runs, TASKS)

    files = write_report(mixed_store.path, tmp_path / "rep")
    text = files.markdown.read_text()
    sections = text.split("\n## ")
    assert "runs measured with 3 different settings" in sections[0]
    first, second, third = sections[1:4]
    assert first.startswith("Comparison 1: 5-shot, 20 items per task (limit 20), seed 1234")
    assert "ties-0shot" not in first and "linear-v2" not in first
    # The 0-shot row scores 90 but is bold nowhere: it is alone in its own table.
    assert "| ties-0shot | merge | 0 | 40 (limit 40) | 1234 | 90.00 ± 1.00 |" in third
    assert "**" not in third.split("|---")[1]
    # In the 5-shot table ties is best, as it is among the rows measured alike.
    assert "| ties | merge | 1 | 5 | 20 (limit 20) | 1234 | **45.00 ± 1.00** |" in first
    # The task-version difference is stated in the column head.
    assert "mmlu_pm (v2.0)" in second and "linear-v2" in second
    assert [p.name for p in files.plots] == ["methods.png", "vs_base.png", "rounds.png", "methods-2.png", "rounds-2.png", "methods-3.png"]


def test_old_store_without_versions_still_reports(tmp_path):
    """A store written before task versions were recorded gets the column; its rows say '?'."""
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE scores (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, time TEXT NOT NULL, round INTEGER,"
                " label TEXT NOT NULL, role TEXT NOT NULL, strategy TEXT, params TEXT, fingerprint TEXT, model TEXT, task TEXT NOT NULL,"
                " metric TEXT NOT NULL, value REAL, stderr REAL, n INTEGER, num_fewshot INTEGER, item_limit REAL, seed INTEGER)")
    con.execute("INSERT INTO scores (run_id, time, label, role, task, metric, value, stderr, n) VALUES"
                " ('r', '2024-01-01T00:00:00+00:00', 'base', 'base', 'medqa', 'acc', 0.5, 0.1, 10)")
    con.commit()
    con.close()
    store = ResultsStore(path)
    assert [r.task_version for r in store.scores()] == [None]
    [row] = table_rows(runs(store))
    md = markdown_table([row], ["medqa"])
    assert md.splitlines()[0] == "| Model | Role | Shots | Items | Seed | medqa | Average |"
    assert md.splitlines()[2] == "| base | base | ? | 10 | ? | 50.00 ± 10.00 | 50.00 ± 10.00 |"
    assert comparisons(runs(store))[0].settings.title() == "settings not recorded (shots, limit and seed unknown)"


# ----------------------------------------------------------------------------- gate and rounds


def test_gate_refused_rounds_are_marked(filled_store, tmp_path):
    filled_store.record_gate(GateRecord(published=True, reason="ok", round=1, label="slerp", run_id="slerp1"))
    filled_store.record_gate(GateRecord(published=False, reason="too low", round=2, label="ties", run_id="ties2"))
    all_runs = runs(filled_store)
    md = markdown_table(table_rows(all_runs), TASKS)
    assert md.splitlines()[0].endswith("| Average | Gate |")
    assert md.splitlines()[-3].startswith("| ties | merge | 2 |") and md.splitlines()[-3].endswith("| **refused** |")
    rt = rounds_table(all_runs, TASKS)
    assert "| 1 | slerp | published | 54.08 |" in rt and "| 2 | ties | **refused** | 54.67 |" in rt and "| 1 | ties | - |" in rt
    fig = rounds_figure(all_runs, TASKS, base=table_rows(all_runs)[0])
    crosses = [c for ax in fig.axes for c in ax.collections if c.get_label() == "refused by the gate"]
    assert len(crosses) == 1
    # The cross sits on ties' round-2 point of the first panel (medqa 47 %).
    assert [tuple(xy) for xy in crosses[0].get_offsets()] == [(2.0, 47.0)]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["slerp", "ties", "refused by the gate", "base (base)"]


def test_round_column_only_with_rounds(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    _add(store, "b", "base", "base", None, [0.4, 0.5, 0.6])
    _add(store, "m", "ties", "merge", None, [0.5, 0.5, 0.6], strategy="ties")
    md = markdown_table(table_rows(runs(store)), TASKS)
    assert "Round" not in md  # never a column of '-' only
    _add(store, "f", "federation", "merge", 1, [0.5, 0.6, 0.6], strategy="task_arithmetic")
    lines = markdown_table(table_rows(runs(store)), TASKS).splitlines()
    assert [ln.split(" | ")[2] for ln in lines[2:5]] == ["input", "1", "offline"]


# ----------------------------------------------------------------------------- plots


def _many_models(tmp_path):
    store = ResultsStore(tmp_path / "many.db")
    _add(store, "b", "base", "base", None, [0.40, 0.50, 0.60])
    for k, h in enumerate(["cardio", "onco", "neuro"]):
        _add(store, f"p{k}", h, "parent", None, [0.45, 0.50 + k / 100, 0.60])
    for k, d in enumerate([0.1, 0.3, 0.5, 0.7, 0.9]):
        _add(store, f"d{k}", f"dare_ties@{d}", "merge", None, [0.40 + k / 100, 0.50, 0.61], strategy="dare_ties")
    for m in ["linear", "slerp", "ties"]:
        _add(store, m, m, "merge", None, [0.40, 0.50, 0.60], strategy=m)
    return table_rows(runs(store))


def test_method_plot_panels_order_and_colours(tmp_path):
    rows = _many_models(tmp_path)
    fig = methods_figure(rows, TASKS)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == TASKS + ["average"]  # one panel per task, not one crowded chart
    for ax in axes:
        assert len(ax.patches) == len(rows) == 12
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == [r.label for r in rows]  # top to bottom in the table's order
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["base", "fine-tuned", "dare_ties", "linear", "slerp", "ties"]  # families, in table order
    colour = {r.label: tuple(p.get_facecolor()) for r, p in zip(rows, axes[0].patches)}
    dare = {colour[r.label] for r in rows if r.family == "dare_ties"}
    assert len(dare) == 1  # a method's variants share its colour
    assert len({colour[r.label] for r in rows}) == len(legend)  # and families do not share one
    assert list(family_colours(rows)) == legend


def test_zero_differences_are_visible(tmp_path):
    rows = _many_models(tmp_path)
    base = rows[0]
    fig = vs_base_figure(rows, base, TASKS)
    medqa = next(ax for ax in fig.axes if ax.get_title() == "medqa")
    # linear, slerp and ties equal the base on medqa: a tick on the zero line and the value written.
    ticks = [ln for ln in medqa.lines if ln.get_gid() == "zero-difference"]
    assert len(ticks) == 4 and all(list(ln.get_xdata()) == [0] for ln in ticks)  # dare_ties@0.1 is +0 too
    texts = [t.get_text() for t in medqa.texts]
    assert texts.count("±0.0") == 4 and "+4.0" in texts and "+5.0" in texts
    assert "base" not in [t.get_text() for t in medqa.get_yticklabels()]
