"""Reports from the results store: tables and plots that compare only what is comparable.

A score depends on how it was measured: the number of few-shot examples, the items scored (the
limit, and how many there were), the seed of few-shot sampling and the version of each task. The
report groups evaluation runs by these settings and never puts runs with different settings in
one table, one bold "best" or one plot: each group gets its own section, titled with its settings,
and every row states them again.

Within a group the table has the shape of the paper's Table IV: one row per model (the base, each
parent fine-tune, each merge at its latest round), one column per task with ``accuracy ± stderr``
in percent, and the mean over tasks. The Round column appears when the group has federation
rounds; the Gate column when the publication gate decided on one of its runs (a refused round is
marked, in the tables and in the round curves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from fedmerge.eval.errors import EvalError, MixedSettings
from fedmerge.eval.store import ResultsStore

_ROLE_ORDER = {"base": 0, "parent": 1, "merge": 2}


@dataclass(frozen=True)
class Settings:
    """How a run was measured; runs are compared only when these are equal."""

    num_fewshot: int | None
    limit: float | None
    seed: int | None
    tasks: tuple[tuple[str, str | None, int | None], ...]  # (task, version, items scored), by task name

    @property
    def recorded(self) -> bool:
        return self.num_fewshot is not None or self.seed is not None

    def shots_text(self) -> str:
        return "?" if self.num_fewshot is None else f"{self.num_fewshot}"

    def limit_text(self) -> str:
        if self.limit is None:
            return "all items"
        return f"limit {int(self.limit) if float(self.limit).is_integer() else self.limit}"

    def items_text(self) -> str:
        counts = sorted({n for _, _, n in self.tasks if n is not None})
        n = "?" if not counts else str(counts[0]) if len(counts) == 1 else "/".join(map(str, counts))
        if not self.recorded:
            return n
        return f"{n} (all)" if self.limit is None else f"{n} ({self.limit_text()})"

    def seed_text(self) -> str:
        return "?" if self.seed is None else str(self.seed)

    def title(self) -> str:
        if not self.recorded:
            return "settings not recorded (shots, limit and seed unknown)"
        counts = sorted({n for _, _, n in self.tasks if n is not None})
        per_task = f"{counts[0]} items per task" if len(counts) == 1 else "items per task: " + ", ".join(f"{t} {n}" for t, _, n in self.tasks)
        return f"{self.num_fewshot}-shot, {per_task} ({self.limit_text()}), seed {self.seed}"

    def version_of(self, task: str) -> str | None:
        return next((v for t, v, _ in self.tasks if t == task), None)


@dataclass
class ReportRow:
    label: str
    role: str
    round: int | None
    run_id: str
    time: str
    scores: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # task -> (value, stderr)
    strategy: str | None = None
    settings: Settings | None = None
    gate: str | None = None  # 'published' | 'refused' when the gate decided on this run

    def mean(self, tasks: list[str]) -> float | None:
        vals = [self.scores[t][0] for t in tasks if t in self.scores]
        return sum(vals) / len(vals) if vals and len(vals) == len(tasks) else None

    def mean_stderr(self, tasks: list[str]) -> float | None:
        """Stderr of the mean over tasks, treating the tasks' estimates as independent."""
        ses = [self.scores[t][1] for t in tasks if t in self.scores]
        if len(ses) != len(tasks) or any(s is None for s in ses):
            return None
        return math.sqrt(sum(s * s for s in ses)) / len(ses)

    @property
    def family(self) -> str:
        """What the row's colour stands for in plots: base, fine-tuned, or the merge method."""
        if self.role == "base":
            return "base"
        if self.role == "parent":
            return "fine-tuned"
        return self.strategy or "merge"


def runs(store: ResultsStore, metric: str = "acc") -> list[ReportRow]:
    """Every evaluation run in the store, oldest first, with its ``metric`` per task and settings."""
    by_run: dict[str, ReportRow] = {}
    measured: dict[str, dict] = {}
    for r in store.scores(metric=metric):
        row = by_run.get(r.run_id)
        if row is None:
            row = by_run[r.run_id] = ReportRow(r.label, r.role, r.round, r.run_id, r.time, strategy=r.strategy)
            measured[r.run_id] = {"shots": r.num_fewshot, "limit": r.item_limit, "seed": r.seed, "tasks": {}}
        if r.value is not None:
            row.scores[r.task] = (r.value, r.stderr)
        measured[r.run_id]["tasks"][r.task] = (r.task_version, r.n)
    decisions = {d.run_id: d.published for d in store.gate_decisions() if d.run_id}
    for run_id, row in by_run.items():
        m = measured[run_id]
        row.settings = Settings(m["shots"], m["limit"], m["seed"], tuple((t, v, n) for t, (v, n) in sorted(m["tasks"].items())))
        if run_id in decisions:
            row.gate = "published" if decisions[run_id] else "refused"
    return list(by_run.values())


def _round_key(row: ReportRow) -> int:
    return row.round if row.round is not None else -1


def table_rows(all_runs: list[ReportRow]) -> list[ReportRow]:
    """The latest run of each (role, label, settings): base first, then parents, then merges."""
    latest: dict[tuple, ReportRow] = {}
    for row in all_runs:  # oldest first: a later run replaces an earlier one
        key = (row.role, row.label, row.settings)
        prev = latest.get(key)
        if prev is None or _round_key(row) >= _round_key(prev):
            latest[key] = row
    return sorted(latest.values(), key=lambda r: (_ROLE_ORDER.get(r.role, 9), r.label))


def task_columns(all_runs: list[ReportRow]) -> list[str]:
    return list(dict.fromkeys(t for row in all_runs for t in row.scores))


@dataclass
class Comparison:
    """Runs measured with the same settings: one table, one set of plots."""

    settings: Settings | None
    runs: list[ReportRow]
    rows: list[ReportRow]
    tasks: list[str]


def comparisons(all_runs: list[ReportRow]) -> list[Comparison]:
    """The runs split by settings; the group with the most models first (then the most recent)."""
    groups: dict[Settings | None, list[ReportRow]] = {}
    for row in all_runs:
        groups.setdefault(row.settings, []).append(row)
    position = {id(r): i for i, r in enumerate(all_runs)}
    out = [Comparison(s, rs, table_rows(rs), task_columns(rs)) for s, rs in groups.items()]
    return sorted(out, key=lambda c: (-len(c.rows), -max(position[id(r)] for r in c.runs)))


def _cell(value: float | None, stderr: float | None, bold: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.2f}" + (f" ± {100 * stderr:.2f}" if stderr is not None else "")
    return f"**{text}**" if bold else text


def round_text(row: ReportRow) -> str:
    if row.round is not None:
        return str(row.round)
    return "input" if row.role in ("base", "parent") else "offline"


def gate_text(row: ReportRow) -> str:
    return {"refused": "**refused**", "published": "published"}.get(row.gate or "", "")


def _same_settings(rows: list[ReportRow]) -> Settings | None:
    found = list(dict.fromkeys(r.settings for r in rows))
    if len(found) > 1:
        detail = "; ".join(f"{', '.join(r.label for r in rows if r.settings == s)}: {s.title() if s else 'unknown'}" for s in found)
        raise MixedSettings(f"these rows were measured with different settings and cannot share a table: {detail}")
    return found[0] if found else None


def markdown_table(rows: list[ReportRow], tasks: list[str], metric: str = "acc") -> str:
    """Table IV shape: model rows, task columns of ``metric ± stderr`` (percent), and the mean.

    Every row states its shots, items and seed; task columns carry their version. Rows measured
    with different settings are refused (``MixedSettings``): split them with ``comparisons``.
    """
    settings = _same_settings(rows)
    show_round = any(r.round is not None for r in rows)
    show_gate = any(r.gate for r in rows)

    def head_of(t: str) -> str:
        v = settings.version_of(t) if settings else None
        return f"{t} (v{v})" if v else t

    head = ["Model", "Role"] + (["Round"] if show_round else []) + ["Shots", "Items", "Seed"] + [head_of(t) for t in tasks] + ["Average"]
    head += ["Gate"] if show_gate else []
    left = len(head) - len(tasks) - 1 - (1 if show_gate else 0)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(tasks) + 1) + (["---"] if show_gate else [])) + "|"]
    best = {}
    for t in tasks:
        vals = [r.scores[t][0] for r in rows if t in r.scores]
        best[t] = max(vals) if vals else None
    means = [r.mean(tasks) for r in rows]
    best_mean = max((m for m in means if m is not None), default=None)
    for row, m in zip(rows, means):
        s = row.settings
        cells = [row.label, row.role] + ([round_text(row)] if show_round else [])
        cells += [s.shots_text(), s.items_text(), s.seed_text()] if s else ["?", "?", "?"]
        for t in tasks:
            v, se = row.scores.get(t, (None, None))
            cells.append(_cell(v, se, bold=v is not None and len(rows) > 1 and v == best[t]))
        cells.append(_cell(m, row.mean_stderr(tasks), bold=m is not None and len(rows) > 1 and m == best_mean))
        cells += [gate_text(row)] if show_gate else []
        lines.append("| " + " | ".join(cells) + " |")
    notes = f"{metric} in percent, ± one standard error; best value per column in bold."
    if show_round:
        notes += " Round: the federation round scored ('input': a model every round starts from; 'offline': scored outside a round)."
    if show_gate:
        notes += " Gate: the publication gate's decision on that run."
    return "\n".join(lines) + f"\n\n{notes}\n"


def rounds_table(all_runs: list[ReportRow], tasks: list[str]) -> str:
    """Every scored round of one comparison, the gate's decision beside it."""
    _same_settings(all_runs)
    lines = ["| Round | Model | Gate | Mean | " + " | ".join(tasks) + " |", "|---:|---|---|---:|" + "---:|" * len(tasks)]
    for row in sorted((r for r in all_runs if r.round is not None), key=lambda r: (r.round, r.label)):
        m = row.mean(tasks)
        cells = [str(row.round), row.label, gate_text(row) or "-", _cell(m, None)] + [_cell(row.scores.get(t, (None, None))[0], None) for t in tasks]
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


def _versions_line(settings: Settings | None, tasks: list[str]) -> str:
    if settings is None:
        return ""
    known = [(t, settings.version_of(t)) for t in tasks]
    if not any(v for _, v in known):
        return "Task versions: not recorded.\n"
    return "Task versions: " + ", ".join(f"{t} {v or '?'}" for t, v in known) + ".\n"


def write_report(store_path: str | Path, out_dir: str | Path, metric: str = "acc") -> ReportFiles:
    """Write ``report.md`` and the PNG plots for everything in the store at ``store_path``.

    One section per group of settings; the first group's plots are ``methods.png``,
    ``vs_base.png`` and ``rounds.png``, group k's carry ``-k`` before the extension.
    """
    from fedmerge.checkpoints.atomic import write_text_atomic
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
    groups = comparisons(all_runs)
    parts = ["# Evaluation report\n",
             f"Results store: `{store_path}`; {len(all_runs)} evaluation run(s), {len(task_columns(all_runs))} task(s).\n"]
    if len(groups) > 1:
        parts.append(f"The store holds runs measured with {len(groups)} different settings (shots, items, seed or task "
                     "versions). Each is reported in its own section; no row is compared with a row of other settings.\n")
    made: list[Path] = []
    for k, group in enumerate(groups, start=1):
        suffix = "" if k == 1 else f"-{k}"
        title = group.settings.title() if group.settings else "settings not recorded"
        heading = "## Models" if len(groups) == 1 else f"## Comparison {k}"
        parts += [f"{heading}: {title}\n", _versions_line(group.settings, group.tasks), markdown_table(group.rows, group.tasks, metric)]
        if any(r.round is not None for r in group.runs):
            parts += ["### Rounds\n", rounds_table(group.runs, group.tasks)]
        colours = plots.family_colours(group.rows)  # the same colour for a family in every plot
        figs = [plots.method_bars(group.rows, group.tasks, out / f"methods{suffix}.png", metric, subtitle=title, colours=colours)]
        base = next((r for r in group.rows if r.role == "base"), None)
        if base is not None and len(group.rows) > 1:
            figs.append(plots.difference_vs_base(group.rows, base, group.tasks, out / f"vs_base{suffix}.png", metric, subtitle=title,
                                                 colours=colours))
        if any(r.round is not None for r in group.runs):
            figs.append(plots.round_curves(group.runs, group.tasks, out / f"rounds{suffix}.png", metric, base=base, subtitle=title,
                                           colours=colours))
        parts += [f"![{p.stem}]({p.name})\n" for p in figs]
        made += figs
    gates = gate_table(store)
    if gates:
        parts += ["## Publication gate\n", gates]
    md = out / "report.md"
    write_text_atomic(md, "\n".join(parts))
    return ReportFiles(md, made)


__all__ = ["ReportRow", "ReportFiles", "Settings", "Comparison", "runs", "table_rows", "task_columns", "comparisons",
           "markdown_table", "rounds_table", "write_report"]
