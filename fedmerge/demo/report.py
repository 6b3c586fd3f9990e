"""What the demo writes: the terminal table, ``report.md``, the plots and ``results.json``.

The model table and the per-method plots come from the evaluator's report module (the same
Table IV shape ``fedmerge report`` prints); this module adds what only the demo knows: the
world, the federation round, the checks that the world has something to merge, the density
sweep, and where the time went.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedmerge.demo.config import DemoConfig
from fedmerge.demo.knowledge import GENERAL
from fedmerge.demo.world import World, task_name


@dataclass(frozen=True)
class DemoFiles:
    markdown: Path
    results: Path
    table: str
    plots: list[Path]


def text_table(rows, tasks: list[str]) -> str:
    """The comparison as aligned plain text: accuracy ± stderr in percent, and the mean."""
    head = ["model"] + [t.removeprefix("demo_") for t in tasks] + ["mean"]
    body = []
    for r in rows:
        cells = [r.label]
        for t in tasks:
            v, se = r.scores[t]
            cells.append(f"{100 * v:5.1f} ± {100 * (se or 0):4.1f}")
        cells.append(f"{100 * r.mean(tasks):5.1f}")
        body.append(cells)
    widths = [max(len(str(c[i])) for c in [head] + body) for i in range(len(head))]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(head), "  ".join("-" * w for w in widths)]
    for r, cells in zip(rows, body):
        if r.role == "merge" and lines[-1] and not lines[-1].startswith("-") and _prev_role(rows, r) != "merge":
            lines.append("  ".join("-" * w for w in widths))
        lines.append(fmt(cells))
    return "\n".join(lines)


def _prev_role(rows, row) -> str | None:
    i = rows.index(row)
    return rows[i - 1].role if i > 0 else None


def world_checks(rows, world: World) -> list[dict[str, Any]]:
    """Does the world have something to merge? Each hospital against the base and the others."""
    base = next(r for r in rows if r.role == "base")
    parents = [r for r in rows if r.role == "parent"]
    checks = []
    for specialty in world.hospitals:
        own = next(r for r in parents if r.label.endswith(f"({specialty})"))
        t = task_name(specialty)
        others = [task_name(s) for s in world.hospitals if s != specialty]
        checks.append(
            {
                "hospital": own.label,
                "own_task": t,
                "own": own.scores[t][0],
                "base_on_own": base.scores[t][0],
                "others_mean": sum(own.scores[o][0] for o in others) / len(others),
                "specialists_on_others_mean": sum(
                    next(p for p in parents if p.label.endswith(f"({o.removeprefix('demo_')})")).scores[o][0] for o in others
                ) / len(others),
                "general": own.scores[task_name(GENERAL)][0],
                "base_general": base.scores[task_name(GENERAL)][0],
            }
        )
    return checks


def sweep_plot(sweep, tasks: list[str], base_row, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [d for d, _ in sweep]
    for t in tasks:
        ys = [100 * r.scores[t][0] for _, r in sweep]
        es = [100 * (r.scores[t][1] or 0) for _, r in sweep]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=t.removeprefix("demo_"), alpha=0.8)
    ax.plot(xs, [100 * r.mean(tasks) for _, r in sweep], "k-", lw=2.5, marker="s", label="mean")
    if base_row is not None:
        ax.axhline(100 * base_row.mean(tasks), color="grey", ls="--", lw=1, label="base mean")
    ax.set_xlabel("DARE-TIES density (fraction of each task vector kept)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("DARE-TIES density sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_demo_report(out: Path, config: DemoConfig, world: World, built: bool, fed, rows, sweep, skipped: dict[str, str],
                      merge_seconds: dict[str, float], stages: dict[str, float], total: float) -> DemoFiles:
    from fedmerge.eval.report import markdown_table, runs, table_rows
    from fedmerge.eval.report import write_report as eval_report
    from fedmerge.eval.store import ResultsStore

    tasks = world.task_names
    table = text_table(rows, tasks)
    evaluation = eval_report(out / "results.db", out / "evaluation")
    plots = list(evaluation.plots)
    base_row = next((r for r in rows if r.role == "base"), None)
    if sweep:
        plots.append(sweep_plot(sweep, tasks, base_row, out / "density_sweep.png"))
    checks = world_checks(rows, world)
    store_rows = table_rows(runs(ResultsStore(out / "results.db")))
    order = {r.label: i for i, r in enumerate(rows)}
    store_rows.sort(key=lambda r: order.get(r.label, len(order)))
    manifest = world.manifest
    rec = fed.record
    merged = rec.get("merge") or {}
    rejected = ", ".join(f"{x['institution']} ({x['error']})" for x in rec.get("rejections", []))

    md: list[str] = [
        "# fedmerge demo: the paper's Table IV in miniature\n",
        f"{len(world.hospitals)} hospitals each fine-tuned the same tiny Mistral base on their own specialty; "
        f"their task vectors went through a federation round (signed{' and sealed' if config.federation.seal else ''} packages, "
        "verified by the coordinator) and were merged with every strategy. Every model was scored by the evaluator "
        f"(lm-evaluation-harness, {config.evaluation.num_fewshot}-shot, continuation scoring, accuracy ± stderr).\n",
        "## Results\n",
        markdown_table(store_rows, tasks),
        "Columns: `demo_general` is general medicine (what the base was pretrained on; it plays HellaSwag's part of "
        "catching forgetting); the others are the hospitals' specialties. Chance is "
        f"{100 / config.world.n_choices:.0f} %.\n",
    ]
    if skipped:
        md += ["Not run: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + ".\n"]
    md += ["## Is there something to merge?\n",
           "| Hospital | own specialty | base on it | its other specialties | their specialists | general | base general |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for c in checks:
        md.append(f"| {c['hospital']} | {100 * c['own']:.1f} | {100 * c['base_on_own']:.1f} | {100 * c['others_mean']:.1f} | "
                  f"{100 * c['specialists_on_others_mean']:.1f} | {100 * c['general']:.1f} | {100 * c['base_general']:.1f} |")
    md.append("")
    if sweep:
        md += ["## DARE-TIES density sweep\n",
               "The paper ran DARE-TIES at density 0.6 only and asked whether higher densities recover what pruning lost.\n",
               "| density | " + " | ".join(t.removeprefix("demo_") for t in tasks) + " | mean |",
               "|---:|" + "---:|" * (len(tasks) + 1)]
        for d, r in sweep:
            md.append(f"| {d:g} | " + " | ".join(f"{100 * r.scores[t][0]:.1f} ± {100 * (r.scores[t][1] or 0):.1f}" for t in tasks)
                      + f" | {100 * r.mean(tasks):.1f} |")
        md += ["", "![density sweep](density_sweep.png)\n"]
    md += ["## Plots\n"] + [f"![{p.stem}]({p.relative_to(out).as_posix()})\n" for p in evaluation.plots]
    md += [
        "## The world\n",
        f"- Model: Mistral architecture, {manifest['parameters'] / 1e6:.2f} M parameters, vocabulary {manifest['vocab_size']} "
        f"(tokenizer trained on the world's text), {config.world.model.num_hidden_layers} layers, hidden {config.world.model.hidden_size}.",
        f"- Base: pretrained {config.world.pretrain.steps} steps on general medicine ({manifest['tokens'][GENERAL]} tokens); "
        f"loss {manifest['losses']['base']['first']:.2f} -> {manifest['losses']['base']['last']:.2f}.",
    ]
    for s in world.hospitals:
        md.append(f"- Hospital {s}: full fine-tune of the base, {config.world.finetune.steps} steps on {s} "
                  f"({manifest['tokens'][s]} tokens); loss {manifest['losses'][s]['first']:.2f} -> {manifest['losses'][s]['last']:.2f}.")
    md += [
        f"- Exams: {', '.join(f'{d} {n}' for d, n in manifest['exam_items'].items())} items; each fact is taught in every "
        "wording but one and asked in that one, so no exam item appears in any training text.",
        f"- Cached at `{world.root}` ({'built in this run' if built else 'reused from the cache'}).\n",
        "## The federation round\n",
        f"- Round {fed.round}: contributors {', '.join(sorted(rec.get('contributions', {})))}; rejected: {rejected or 'none'}.",
        f"- Bytes sent per hospital: {', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in fed.bytes_sent.items())}.",
        f"- Reference fingerprint `{rec.get('reference', {}).get('fingerprint', '?')}`; "
        f"merged model `{merged.get('fingerprint', '?')}`.",
        f"- The round took {fed.seconds:.1f} s; the coordinator's merge {merged.get('seconds', float('nan')):.2f} s.\n",
        "## Where the time went\n",
        "| stage | seconds | share |",
        "|---|---:|---:|",
    ]
    for name, secs in stages.items():
        md.append(f"| {name} | {secs:.1f} | {100 * secs / total:.0f} % |")
    md += [f"| total (before this report) | {total:.1f} | 100 % |", ""]
    if world.manifest.get("seconds") and built:
        md += ["World build: " + ", ".join(f"{k} {v:.1f} s" for k, v in world.manifest["seconds"].items()) + ".\n"]
    md += ["Raw results: `results.json` (every score), `results.db` (the evaluator's store; `fedmerge report results.db`).\n"]
    report = out / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")

    results = {
        "config": config.model_dump(mode="json"),
        "world": {"root": str(world.root), "built_now": built, **{k: v for k, v in manifest.items() if k != "config"}},
        "federation": {"round": fed.round, "institutions": fed.institutions, "bytes_sent": fed.bytes_sent,
                       "installed": fed.installed, "seconds": fed.seconds, "record": _jsonable(rec)},
        "rows": [_row(r) for r in rows],
        "density_sweep": [{"density": d, **_row(r)} for d, r in sweep],
        "skipped": skipped,
        "merge_seconds": merge_seconds,
        "checks": checks,
        "seconds": {**stages, "total": total},
    }
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return DemoFiles(report, path, table, plots)


def _row(r) -> dict[str, Any]:
    d = asdict(r)
    d["scores"] = {t: {"acc": v, "stderr": se} for t, (v, se) in r.scores.items()}
    return d


def _jsonable(x):
    return json.loads(json.dumps(x, default=str, allow_nan=True)) if x is not None else None


__all__ = ["text_table", "world_checks", "write_demo_report", "sweep_plot"]
