"""What the demo writes: the terminal table, ``report.md``, ``summary.md``, the plots, ``results.json``.

Every number is computed here from the scores of the run; nothing is typed in by hand. With
several worlds (``--seeds``) the table pools them: a model's accuracy on an exam is the mean over
worlds, and every interval resamples the pooled items (strata: one per world and exam).

For every merge (each round the federation published, and each strategy merged again from the
first round's contributions) the report gives its gain in mean accuracy over the exams against
the best hospital of its world (the hospital with the highest mean on the test exams: the
strongest single model, the comparison the demo has to win) and against task arithmetic, with
the paired bootstrap 95 % interval (``fedmerge.demo.stats``). General medicine is reported apart
from the specialties, and a scatter of the two marks the models no other beats on both.

Choosing the best hospital with test scores is a choice of the *comparison*, made after the run;
nothing the federation published was chosen on a test item.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedmerge.demo.config import DemoConfig, paper_merges
from fedmerge.demo.knowledge import GENERAL
from fedmerge.demo.stats import PairedGain, pair_items, paired_bootstrap, pareto_front
from fedmerge.demo.world import task_name

TASK_ARITHMETIC = "task_arithmetic"
PAPER_LABELS = frozenset(m.label for m in paper_merges())  # the paper's six methods and its hierarchical rule
FEDERATION = "federation round"


@dataclass(frozen=True)
class DemoFiles:
    markdown: Path
    summary: Path
    results: Path
    table: str
    headline: str
    plots: list[Path]


@dataclass
class PooledRow:
    """One model over every world: per-exam accuracy (mean over worlds) and its paired gains."""

    key: str
    label: str  # the label in the first world (a published model's label names its method there)
    role: str
    scores: dict[str, float]
    vs_best: PairedGain | None = None
    vs_ta: PairedGain | None = None
    round: int | None = None

    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores)

    def general(self) -> float:
        return self.scores[task_name(GENERAL)]

    def specialties(self) -> float:
        spec = [v for t, v in self.scores.items() if t != task_name(GENERAL)]
        return sum(spec) / len(spec)


def best_parent(rows) -> Any:
    """The hospital model with the highest mean test accuracy in one world (ties: the first)."""
    parents = [r for r in rows if r.role == "parent"]
    tasks = list(parents[0].scores)
    return max(parents, key=lambda r: (r.mean(tasks), -parents.index(r)))


def _items(world_run, row) -> dict[str, dict[str, float]]:
    return {f"{world_run.seed}/{t}": per for t, per in row.items.items()}


def pooled_rows(worlds, iterations: int = 2000) -> list[PooledRow]:
    """Every model key present in every world, in the first world's order, with paired gains."""
    first = worlds[0]
    tasks = first.world.task_names
    keys = [r.key for r in first.rows if all(any(x.key == r.key for x in w.rows) for w in worlds)]
    out = []
    for key in keys:
        per_world = [next(x for x in w.rows if x.key == key) for w in worlds]
        row0 = per_world[0]
        scores = {t: sum(r.scores[t][0] for r in per_world) / len(per_world) for t in tasks}
        pooled = PooledRow(key=key, label=row0.label if len(worlds) == 1 else key, role=row0.role, scores=scores, round=row0.round)
        if row0.role == "merge":
            a: dict[str, dict[str, float]] = {}
            best: dict[str, dict[str, float]] = {}
            ta: dict[str, dict[str, float]] = {}
            have_ta = True
            for w, r in zip(worlds, per_world):
                a.update(_items(w, r))
                best.update(_items(w, best_parent(w.rows)))
                ta_row = next((x for x in w.rows if x.key == TASK_ARITHMETIC), None)
                if ta_row is None:
                    have_ta = False
                else:
                    ta.update(_items(w, ta_row))
            if all(a.values()):
                pa, pb = pair_items(a, best)
                pooled.vs_best = paired_bootstrap(pa, pb, iterations=iterations)
                if have_ta and key != TASK_ARITHMETIC:
                    pa, pt = pair_items(a, ta)
                    pooled.vs_ta = paired_bootstrap(pa, pt, iterations=iterations)
        out.append(pooled)
    return out


def _short(task: str) -> str:
    return task.removeprefix("demo_")


def text_table(rows: list[PooledRow], tasks: list[str]) -> str:
    """The comparison as aligned plain text: accuracy in percent per exam, the mean, the gain over the best hospital."""
    head = ["model"] + [_short(t) for t in tasks] + ["mean", "vs best hospital [95% CI]"]
    body = []
    for r in rows:
        cells = [r.label] + [f"{100 * r.scores[t]:.1f}" for t in tasks] + [f"{100 * r.mean():.1f}"]
        cells.append(r.vs_best.as_points() if r.vs_best else "")
        body.append(cells)
    widths = [max(len(c[i]) for c in [head] + body) for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [fmt(head), rule]
    previous = None
    for r, cells in zip(rows, body):
        group = _group(r)
        if previous is not None and group != previous:
            lines.append(rule)
        lines.append(fmt(cells))
        previous = group
    return "\n".join(lines)


def _group(r: PooledRow) -> str:
    return "federation" if r.key.startswith(FEDERATION) else r.role


def markdown_table(rows: list[PooledRow], tasks: list[str]) -> str:
    head = ["model"] + [_short(t) for t in tasks] + ["mean", "specialties", "vs best hospital [95% CI]", "vs task arithmetic [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r.label] + [f"{100 * r.scores[t]:.1f}" for t in tasks]
        cells += [f"{100 * r.mean():.1f}", f"{100 * r.specialties():.1f}",
                  r.vs_best.as_points() if r.vs_best else "", r.vs_ta.as_points() if r.vs_ta else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def world_checks(rows, world) -> list[dict[str, Any]]:
    """Does the world have something to merge? Each hospital against the base and the others."""
    base = next(r for r in rows if r.role == "base")
    parents = [r for r in rows if r.role == "parent"]
    checks = []
    for specialty in world.hospitals:
        own = next(r for r in parents if r.label.endswith(f"({specialty})"))
        t = task_name(specialty)
        others = [task_name(s) for s in world.hospitals if s != specialty]
        checks.append({
            "hospital": own.label,
            "own_task": t,
            "own": own.scores[t][0],
            "base_on_own": base.scores[t][0],
            "others_mean": sum(own.scores[o][0] for o in others) / len(others),
            "specialists_on_others_mean": sum(
                next(p for p in parents if p.label.endswith(f"({_short(o)})")).scores[o][0] for o in others) / len(others),
            "general": own.scores[task_name(GENERAL)][0],
            "base_general": base.scores[task_name(GENERAL)][0],
        })
    return checks


def last_round_by_world(worlds) -> list[dict[str, Any]]:
    """Per world: the last round's published model against that world's best hospital (the must-show)."""
    out = []
    for w in worlds:
        tasks = w.world.task_names
        last = w.fed.last
        row = next(r for r in w.rows if r.key == f"{FEDERATION} {last.round}")
        best = best_parent(w.rows)
        gain = paired_bootstrap(*pair_items(_items(w, row), _items(w, best)))
        out.append({"seed": w.seed, "published": row.label, "mean": row.mean(tasks), "general": row.scores[task_name(GENERAL)][0],
                    "best_hospital": best.label, "best_hospital_mean": best.mean(tasks), "gain": gain})
    return out


# -- plots --------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rounds_plot(worlds, tasks: list[str], path: Path) -> Path:
    """Each exam's accuracy of the federation's published model per round (round 0: the base), mean over worlds."""
    plt = _plt()
    n_rounds = len(worlds[0].fed.rounds)
    xs = list(range(0, n_rounds + 1))

    def series(task: str | None) -> list[float]:
        ys = []
        for x in xs:
            vals = []
            for w in worlds:
                row = next(r for r in w.rows if r.role == "base") if x == 0 else next(r for r in w.rows if r.key == f"{FEDERATION} {x}")
                vals.append(row.mean(tasks) if task is None else row.scores[task][0])
            ys.append(100 * sum(vals) / len(vals))
        return ys

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for t in tasks:
        ax.plot(xs, series(t), marker="o", label=_short(t), alpha=0.85, lw=2.2 if t == task_name(GENERAL) else 1.5,
                ls="-" if t == task_name(GENERAL) else "--")
    ax.plot(xs, series(None), "k-", lw=2.8, marker="s", label="mean over exams")
    best = 100 * sum(best_parent(w.rows).mean(tasks) for w in worlds) / len(worlds)
    ax.axhline(best, color="grey", ls=":", lw=1.5, label="best hospital (mean)")
    ax.set_xticks(xs, ["base"] + [str(x) for x in xs[1:]])
    ax.set_xlabel("federation round (the model it published)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("The federation's published model, round by round" + (f" ({len(worlds)} worlds)" if len(worlds) > 1 else ""))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scatter_plot(rows: list[PooledRow], path: Path) -> Path:
    """General medicine against the specialties' mean for every model; the Pareto front marked."""
    plt = _plt()
    points = {r.label: (100 * r.specialties(), 100 * r.general()) for r in rows}
    front = pareto_front(points)
    colours = {"base": "tab:grey", "parent": "tab:blue", "merge": "tab:orange", "federation": "tab:red"}
    names = {"base": "base", "parent": "hospital", "merge": "merge of the first round's contributions", "federation": "published by the federation"}
    fig, ax = plt.subplots(figsize=(9, 5.2))
    for i, r in enumerate(rows):
        x, y = points[r.label]
        on_front = r.label in front
        ax.scatter([x], [y], s=80 if on_front else 35, color=colours[_group(r)], edgecolor="black" if on_front else "none", zorder=3)
        short = r.label.split(" (")[0] if r.role == "parent" else r.label.replace("federation round ", "round ").split(" (")[0]
        ax.annotate(short, (x, y), textcoords="offset points", xytext=(5, 4 if i % 2 else -9), fontsize=7)
    fx = sorted((points[label] for label in front), key=lambda p: p[0])
    ax.plot([p[0] for p in fx], [p[1] for p in fx], color="black", lw=1, ls="--", zorder=2, marker="o", mfc="none", ms=12,
            label="Pareto front (circled)")
    for g, c in colours.items():
        ax.scatter([], [], color=c, label=names[g])
    ax.set_xlabel("specialties: mean accuracy (%)")
    ax.set_ylabel("general medicine: accuracy (%)")
    ax.set_title("General medicine kept against specialties gained, every model")
    ax.margins(x=0.1, y=0.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_plot(worlds, tasks: list[str], path: Path) -> Path:
    plt = _plt()
    densities = [d for d, _ in worlds[0].sweep]

    def at(i: int, t: str | None) -> float:
        vals = [(w.sweep[i][1].mean(tasks) if t is None else w.sweep[i][1].scores[t][0]) for w in worlds]
        return 100 * sum(vals) / len(vals)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for t in tasks:
        ax.plot(densities, [at(i, t) for i in range(len(densities))], marker="o", label=_short(t), alpha=0.8)
    ax.plot(densities, [at(i, None) for i in range(len(densities))], "k-", lw=2.5, marker="s", label="mean")
    ax.set_xlabel("DARE-TIES density (fraction of each task vector kept)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("DARE-TIES density sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the report -----------------------------------------------------------------------------------------
def headline(worlds, rows: list[PooledRow]) -> str:
    """Two lines for the terminal: the last round's published model against the best hospital."""
    last = next(r for r in rows if r.key == f"{FEDERATION} {len(worlds[0].fed.rounds)}")
    per_world = last_round_by_world(worlds)
    pooled = f" ({len(worlds)} worlds pooled; per world: " + ", ".join(f"{100 * p['gain'].estimate:+.1f}" for p in per_world) + ")" if len(worlds) > 1 else ""
    gain = last.vs_best.as_points() if last.vs_best else "?"
    return (f"{last.label if len(worlds) == 1 else last.key}: mean {100 * last.mean():.1f}, general medicine {100 * last.general():.1f}\n"
            f"against the best hospital: {gain} points (paired bootstrap 95 % CI){pooled}")


def summary_markdown(config: DemoConfig, worlds, rows: list[PooledRow]) -> str:
    """The headline, the table and the per-world check: what docs/demo.md quotes."""
    tasks = worlds[0].world.task_names
    per_world = last_round_by_world(worlds)
    last_key = f"{FEDERATION} {len(worlds[0].fed.rounds)}"
    last = next(r for r in rows if r.key == last_key)
    sel = config.federation.selection
    chosen_by = (f"chosen among {len(sel.candidates)} candidates by the {sel.rule} hospital's accuracy on "
                 + ("each hospital's private validation split" if sel.mode == "federated" else "the consortium's validation split")
                 if sel.mode != "none" else f"the configured {config.federation.method}")
    seeds = ", ".join(str(w.seed) for w in worlds)
    lines = [
        f"**The federation's published model of round {len(worlds[0].fed.rounds)}** ({chosen_by}; no test item read): "
        f"mean accuracy {100 * last.mean():.1f} over the {len(tasks)} exams, general medicine {100 * last.general():.1f}, "
        f"specialties {100 * last.specialties():.1f}; "
        + (f"{last.vs_best.as_points()} points over the best hospital (paired bootstrap 95 % CI over "
           f"{last.vs_best.items} items{f', {len(worlds)} worlds pooled' if len(worlds) > 1 else ''})." if last.vs_best else ""),
        "",
        f"World seed(s) {seeds}; {len(tasks)} exams of {worlds[0].world.manifest['exam_items'][GENERAL]['test']} items each per world; "
        f"accuracy in percent{' (mean over worlds)' if len(worlds) > 1 else ''}.",
        "",
        markdown_table(rows, tasks),
        "| world seed | published in the last round | mean | general | best hospital (mean) | gain [95% CI] |",
        "|---:|---|---:|---:|---|---:|",
    ]
    for p in per_world:
        lines.append(f"| {p['seed']} | {p['published']} | {100 * p['mean']:.1f} | {100 * p['general']:.1f} | "
                     f"{p['best_hospital']} ({100 * p['best_hospital_mean']:.1f}) | {p['gain'].as_points()} |")
    gains = [p["gain"].estimate for p in per_world]
    lines += ["", f"Gain of the last round's model over the best hospital: mean {100 * sum(gains) / len(gains):+.1f} points over "
              f"{len(per_world)} world(s), lowest {100 * min(gains):+.1f}; general medicine lowest {100 * min(p['general'] for p in per_world):.1f} %.", ""]
    return "\n".join(lines)


def _selection_section(w) -> list[str]:
    """Per round: what was published, what each hospital did before it, and every validation score."""
    md = []
    for r in w.fed.rounds:
        sel = r.record.get("selection") or {}
        local = ", ".join(f"{inst} " + (f"trained {u['steps']} steps (loss {u['first_loss']:.2f} -> {u['last_loss']:.2f})" if u.get("trained")
                                        else "sent its fine-tune") for inst, u in r.local.items() if u)
        md.append(f"- Round {r.round}: published `{r.label}`"
                  + (f"; before it: {local}" if local else "")
                  + f"; contributors {', '.join(sorted(r.record.get('contributions', {})))}"
                  + (f"; reference {r.record['reference']['kind']}" if r.record.get("reference") else "") + ".")
        scores = sel.get("scores") or {}
        if sel.get("candidates"):
            scorers = sorted(scores)
            md += ["", f"  Validation accuracy (each scorer's mean over its validation tasks; rule `{sel.get('rule')}`"
                   + ("; fallback to the configured strategy" if sel.get("fallback") else "") + "):", "",
                   "  | candidate | " + " | ".join(scorers) + " | rule | published |",
                   "  |---|" + "---:|" * (len(scorers) + 1) + "---|"]
            for c in sel["candidates"]:
                cells = []
                for scorer in scorers:
                    per_task = scores[scorer].get(c["id"]) or {}
                    cells.append(f"{100 * sum(per_task.values()) / len(per_task):.1f}" if per_task else "-")
                value = (sel.get("values") or {}).get(c["id"])
                md.append(f"  | {c['id']} {c['label']} | " + " | ".join(cells) + f" | {'-' if value is None else format(100 * value, '.1f')} | "
                          + ("yes" if c["id"] == sel.get("chosen") else "") + " |")
            for f in sel.get("failures") or []:
                md.append(f"  - {f['scorer']} did not score: {f['reason']}")
            md.append("")
    return md


def write_demo_report(out: Path, config: DemoConfig, worlds, stages: dict[str, float], total: float) -> DemoFiles:
    from fedmerge.eval.report import write_report as eval_report

    first = worlds[0]
    tasks = first.world.task_names
    rows = pooled_rows(worlds)
    table = text_table(rows, tasks)
    plots = [rounds_plot(worlds, tasks, out / "rounds.png"), scatter_plot(rows, out / "general_vs_specialties.png")]
    if first.sweep:
        plots.append(sweep_plot(worlds, tasks, out / "density_sweep.png"))
    evaluation_dirs = []
    for w in worlds:
        ev = eval_report(w.store, w.store.parent / "evaluation")
        evaluation_dirs.append(w.store.parent / "evaluation")
        plots += list(ev.plots)
    summary = summary_markdown(config, worlds, rows)
    front = pareto_front({r.label: (r.specialties(), r.general()) for r in rows})
    paper = [r for r in rows if r.key in PAPER_LABELS]
    best_paper = max(paper, key=lambda r: r.mean()) if paper else None
    manifest = first.world.manifest
    wcfg = config.world
    fed = config.federation

    md: list[str] = [
        "# fedmerge demo: a federation of hospitals against its best hospital\n",
        f"{len(first.world.hospitals)} hospitals each hold a full fine-tune of one tiny Mistral base on their own specialty. "
        f"They ran {fed.rounds} federation round(s): signed{' and sealed' if fed.seal else ''} delta packages"
        + (f" ({fed.compression}-encoded, as were the candidates and the pushed models)" if fed.compression != "none" else "")
        + ", verified by the coordinator"
        + (f"; between rounds each hospital trained the current global model for {fed.local_training.steps} steps on its own text"
           if fed.local_training else "")
        + (f"; each round the coordinator published one of {len(fed.selection.candidates)} candidate merges, chosen by the "
           f"{fed.selection.rule} hospital's accuracy on validation data ({fed.selection.mode})" if fed.selection.mode != "none" else "")
        + f". The first round's contributions were also merged with every strategy below. Every model was scored on test exams "
        f"no choice ever read (lm-evaluation-harness, {config.evaluation.num_fewshot}-shot, continuation scoring).\n",
        "## Summary\n",
        summary,
        "How to read it: the base knows general medicine and is at chance (25 %) on the specialties; each hospital knows its "
        "own specialty and has lost some general medicine. `vs best hospital` is the gain in mean accuracy over the exams against "
        "the hospital with the highest mean in the same world, paired on the same items; `vs task arithmetic` likewise against "
        "`task_arithmetic` merged from the same first-round contributions. An interval that contains 0 is no evidence of a difference.\n",
        "## The paper's question\n",
    ]
    if best_paper is not None and best_paper.vs_best is not None:
        hier = next((r for r in rows if r.key == "hierarchical"), None)
        md.append(f"Of the paper's methods (linear, task arithmetic, TIES, DARE-TIES, DELLA, Breadcrumbs and its hierarchical rule), "
                  f"merged once from the hospitals' fine-tunes, the best mean is `{best_paper.label}` at {100 * best_paper.mean():.1f}: "
                  f"{best_paper.vs_best.as_points()} points against the best hospital."
                  + (f" The hierarchical rule: {hier.vs_best.as_points()}." if hier is not None and hier.vs_best else "")
                  + " The rows after them are the weights-only methods added since, on the same inputs.\n")
    md += [
        "## Rounds\n",
        "![rounds](rounds.png)\n",
    ]
    for w in worlds:
        if len(worlds) > 1:
            md.append(f"World seed {w.seed}:\n")
        md += _selection_section(w)
        md.append("")
    md += [
        "## General medicine against the specialties\n",
        "![general vs specialties](general_vs_specialties.png)\n",
        f"On the Pareto front (no other model is better on both): {', '.join(f'`{x}`' for x in front)}.\n",
        "## Is there something to merge?\n",
        "| world | hospital | own specialty | base on it | its other specialties | their specialists | general | base general |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in worlds:
        for c in world_checks(w.rows, w.world):
            md.append(f"| {w.seed} | {c['hospital']} | {100 * c['own']:.1f} | {100 * c['base_on_own']:.1f} | {100 * c['others_mean']:.1f} | "
                      f"{100 * c['specialists_on_others_mean']:.1f} | {100 * c['general']:.1f} | {100 * c['base_general']:.1f} |")
    md.append("")
    if first.sweep:
        md += ["## DARE-TIES density sweep\n",
               "The paper ran DARE-TIES at density 0.6 only and asked whether higher densities recover what pruning lost.\n",
               "| density | " + " | ".join(_short(t) for t in tasks) + " | mean |",
               "|---:|" + "---:|" * (len(tasks) + 1)]
        for i, (d, _) in enumerate(first.sweep):
            vals = {t: sum(w.sweep[i][1].scores[t][0] for w in worlds) / len(worlds) for t in tasks}
            md.append(f"| {d:g} | " + " | ".join(f"{100 * vals[t]:.1f}" for t in tasks) + f" | {100 * sum(vals.values()) / len(vals):.1f} |")
        md += ["", "![density sweep](density_sweep.png)\n"]
    skipped = {k: v for w in worlds for k, v in w.skipped.items()}
    if skipped:
        md += ["Not run: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + ".\n"]
    md += ["## The evaluator's own reports\n"]
    md += [f"- `{d.relative_to(out).as_posix()}/`" for d in evaluation_dirs] + [""]
    md += [
        "## The world\n",
        f"- Model: Mistral architecture, {manifest['parameters'] / 1e6:.2f} M parameters, vocabulary {manifest['vocab_size']}, "
        f"{wcfg.model.num_hidden_layers} layers, hidden {wcfg.model.hidden_size}.",
        f"- Base: pretrained {wcfg.pretrain.steps} steps on general medicine; each hospital: a full fine-tune of the base, "
        f"{wcfg.finetune.steps} steps on its specialty.",
        f"- Knowledge: {wcfg.conditions_per_domain} test conditions and {wcfg.validation_conditions} validation conditions per domain, "
        f"3 facts each; the test exams ask only test conditions ({manifest['exam_items'][GENERAL]['test']} items per exam), the "
        f"validation splits only validation conditions ({manifest['exam_items'][GENERAL]['validation']} items per domain). "
        "Each hospital validates on general medicine and its own specialty; each fact is asked in the one wording its training "
        "text leaves out.",
    ]
    for w in worlds:
        md.append(f"- World seed {w.seed}: `{w.world.root}` ({'built in this run' if w.built else 'reused from the cache'}); "
                  f"federation {w.fed.seconds:.1f} s, bytes sent per hospital: "
                  + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in w.fed.bytes_sent.items()) + ".")
    md += ["", "## Where the time went\n", "| stage | seconds | share |", "|---|---:|---:|"]
    for name, secs in stages.items():
        md.append(f"| {name} | {secs:.1f} | {100 * secs / total:.0f} % |")
    md += [f"| total (before this report) | {total:.1f} | 100 % |", "",
           "Raw results: `results.json` (every score, every round's record), the evaluator's store `results.db` "
           "(`fedmerge report results.db`).\n"]
    report = out / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    summary_path = out / "summary.md"
    summary_path.write_text(summary, encoding="utf-8")

    results = {
        "config": config.model_dump(mode="json"),
        "seeds": [w.seed for w in worlds],
        "tasks": tasks,
        "rows": [_row(w, r) for w in worlds for r in w.rows],
        "pooled": [_pooled(r) for r in rows],
        "last_round": [{**p, "gain": asdict(p["gain"])} for p in last_round_by_world(worlds)],
        "worlds": [_world(w) for w in worlds],
        "items": {str(w.seed): _item_table(w) for w in worlds},
        "seconds": {**stages, "total": total},
    }
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return DemoFiles(report, summary_path, path, table, headline(worlds, rows), plots)


def _row(w, r) -> dict[str, Any]:
    return {"seed": w.seed, "label": r.label, "key": r.key, "role": r.role, "method": r.method, "parameters": r.parameters,
            "round": r.round, "scores": {t: {"acc": v, "stderr": se} for t, (v, se) in r.scores.items()},
            "mean": r.mean(list(r.scores)), "seconds": r.seconds}


def _pooled(r: PooledRow) -> dict[str, Any]:
    return {"key": r.key, "label": r.label, "role": r.role, "round": r.round, "scores": {t: {"acc": v} for t, v in r.scores.items()},
            "mean": r.mean(), "general": r.general(), "specialties": r.specialties(),
            "vs_best_hospital": asdict(r.vs_best) if r.vs_best else None, "vs_task_arithmetic": asdict(r.vs_ta) if r.vs_ta else None}


def _world(w) -> dict[str, Any]:
    manifest = {k: v for k, v in w.world.manifest.items() if k != "config"}
    return {
        "seed": w.seed, "root": str(w.world.root), "built_now": w.built, "manifest": manifest,
        "best_hospital": best_parent(w.rows).label,
        "federation": {
            "rounds": [{"round": r.round, "label": r.label, "method": r.method, "parameters": r.parameters, "local": r.local,
                        "record": r.record} for r in w.fed.rounds],
            "institutions": w.fed.institutions, "bytes_sent": w.fed.bytes_sent, "installed": w.fed.installed, "seconds": w.fed.seconds,
        },
        "checks": world_checks(w.rows, w.world),
        "density_sweep": [{"density": d, "label": r.label} for d, r in w.sweep],
        "skipped": w.skipped,
        "merge_seconds": w.merge_seconds,
    }


def _item_table(w) -> dict[str, Any]:
    """task -> item ids (sorted) and, per model label, a string of 1/0 in that order."""
    out = {}
    for t in w.world.task_names:
        ids = sorted(next(iter(w.rows)).items.get(t, {}))
        out[t] = {"ids": ids, "correct": {r.label: "".join("1" if r.items.get(t, {}).get(i) else "0" for i in ids) for r in w.rows}}
    return out


__all__ = ["text_table", "markdown_table", "world_checks", "write_demo_report", "pooled_rows", "best_parent", "PooledRow", "DemoFiles"]
