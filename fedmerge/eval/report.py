"""Reports from the results store: the base / parents / merges table and its plots.

The table has the shape of the paper's Table IV: one row per model (the base, each parent
fine-tune, each merge), one column per task with ``accuracy ± stderr`` in percent, and the mean
over tasks. A merge scored over several rounds appears with its latest round; the per-round
history is in the curves plot and in the rounds table below the main one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from fedmerge.eval.errors import EvalError
from fedmerge.eval.store import ResultsStore

_ROLE_ORDER = {"base": 0, "parent": 1, "merge": 2}


@dataclass
class ReportRow:
    label: str
    role: str
    round: int | None
    run_id: str
    time: str
    scores: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # task -> (value, stderr)

    def mean(self, tasks: list[str]) -> float | None:
        vals = [self.scores[t][0] for t in tasks if t in self.scores]
        return sum(vals) / len(vals) if vals and len(vals) == len(tasks) else None

    def mean_stderr(self, tasks: list[str]) -> float | None:
        """Stderr of the mean over tasks, treating the tasks' estimates as independent."""
        ses = [self.scores[t][1] for t in tasks if t in self.scores]
        if len(ses) != len(tasks) or any(s is None for s in ses):
            return None
        return math.sqrt(sum(s * s for s in ses)) / len(ses)


def runs(store: ResultsStore, metric: str = "acc") -> list[ReportRow]:
    """Every evaluation run in the store, oldest first, with its ``metric`` per task."""
    by_run: dict[str, ReportRow] = {}
    for r in store.scores(metric=metric):
        row = by_run.get(r.run_id)
        if row is None:
            row = by_run[r.run_id] = ReportRow(r.label, r.role, r.round, r.run_id, r.time)
        if r.value is not None:
            row.scores[r.task] = (r.value, r.stderr)
    return list(by_run.values())


def table_rows(all_runs: list[ReportRow]) -> list[ReportRow]:
    """The latest run of each (role, label): base first, then parents, then merges."""
    latest: dict[tuple[str, str], ReportRow] = {}
    for row in all_runs:  # oldest first: a later run replaces an earlier one
        key = (row.role, row.label)
        prev = latest.get(key)
        if prev is None or (row.round if row.round is not None else -1) >= (prev.round if prev.round is not None else -1):
            latest[key] = row
    return sorted(latest.values(), key=lambda r: (_ROLE_ORDER.get(r.role, 9), r.label))


def task_columns(all_runs: list[ReportRow]) -> list[str]:
    return list(dict.fromkeys(t for row in all_runs for t in row.scores))


def _cell(value: float | None, stderr: float | None, bold: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.2f}" + (f" ± {100 * stderr:.2f}" if stderr is not None else "")
    return f"**{text}**" if bold else text


def markdown_table(rows: list[ReportRow], tasks: list[str], metric: str = "acc") -> str:
    """Table IV shape: model rows, task columns of ``metric ± stderr`` (percent), and the mean."""
    head = ["Model", "Role", "Round"] + tasks + ["Average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(tasks) + 1)) + "|"]
    best = {}
    for t in tasks:
        vals = [r.scores[t][0] for r in rows if t in r.scores]
        best[t] = max(vals) if vals else None
    means = [r.mean(tasks) for r in rows]
    best_mean = max((m for m in means if m is not None), default=None)
    for row, m in zip(rows, means):
        cells = [row.label, row.role, "-" if row.round is None else str(row.round)]
        for t in tasks:
            v, se = row.scores.get(t, (None, None))
            cells.append(_cell(v, se, bold=v is not None and len(rows) > 1 and v == best[t]))
        cells.append(_cell(m, row.mean_stderr(tasks), bold=m is not None and len(rows) > 1 and m == best_mean))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{metric} in percent, ± one standard error; best value per column in bold.\n"


def rounds_table(all_runs: list[ReportRow], tasks: list[str]) -> str:
    lines = ["| Round | Model | Mean | " + " | ".join(tasks) + " |", "|---:|---|---:|" + "---:|" * len(tasks)]
    for row in sorted((r for r in all_runs if r.round is not None), key=lambda r: (r.round, r.label)):
        m = row.mean(tasks)
        cells = [str(row.round), row.label, _cell(m, None)] + [_cell(row.scores.get(t, (None, None))[0], None) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gate_table(store: ResultsStore) -> str:
    decisions = store.gate_decisions()
    if not decisions:
        return ""
    lines = ["| Round | Model | Published | Score | Reference | Reason |", "|---:|---|---|---:|---|---|"]
    for d in decisions:
        ref = "-" if d.reference is None else f"{d.reference_kind} {100 * d.reference:.2f}"
        score = "-" if d.score is None else f"{100 * d.score:.2f}"
        lines.append(f"| {'-' if d.round is None else d.round} | {d.label or '-'} | {'yes' if d.published else '**refused**'} | {score} | {ref} | {d.reason} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    plots: list[Path]


def write_report(store_path: str | Path, out_dir: str | Path, metric: str = "acc") -> ReportFiles:
    """Write ``report.md`` and the PNG plots for everything in the store at ``store_path``."""
    from fedmerge.eval import plots

    store_path = Path(store_path)
    if not store_path.is_file():
        raise EvalError(f"{store_path}: results store not found")
    store = ResultsStore(store_path)
    all_runs = runs(store, metric)
    if not all_runs:
        raise EvalError(f"{store_path}: no {metric} scores in this results store")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = task_columns(all_runs)
    rows = table_rows(all_runs)
    made: list[Path] = []
    made.append(plots.method_bars(rows, tasks, out / "methods.png", metric))
    base = next((r for r in rows if r.role == "base"), None)
    if base is not None and len(rows) > 1:
        made.append(plots.difference_vs_base(rows, base, tasks, out / "vs_base.png", metric))
    if any(r.round is not None for r in all_runs):
        made.append(plots.round_curves(all_runs, tasks, out / "rounds.png", metric, base=base))
    parts = [
        "# Evaluation report\n",
        f"Results store: `{store_path}`; {len(all_runs)} evaluation run(s), {len(tasks)} task(s).\n",
        "## Models\n",
        markdown_table(rows, tasks, metric),
    ]
    if any(r.round is not None for r in all_runs):
        parts += ["## Rounds\n", rounds_table(all_runs, tasks)]
    gates = gate_table(store)
    if gates:
        parts += ["## Publication gate\n", gates]
    parts += ["## Plots\n"] + [f"![{p.stem}]({p.name})\n" for p in made]
    md = out / "report.md"
    md.write_text("\n".join(parts), encoding="utf-8")
    return ReportFiles(md, made)


__all__ = ["ReportRow", "ReportFiles", "runs", "table_rows", "task_columns", "markdown_table", "write_report"]
