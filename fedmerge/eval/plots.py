"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed).

Three views, after the paper's Figures 2-4: accuracy per round for each merge, a per-model bar
chart with standard-error bars, and each model's accuracy difference from the base model.
"""

from __future__ import annotations

import math
from pathlib import Path

_ROLE_COLOURS = {"base": "#7f7f7f", "parent": "#1f77b4", "merge": "#d62728"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _palette(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _task_bars_figure(n_tasks: int, n_bars: int):
    """A figure wide enough for ``n_bars`` bars in each of ``n_tasks`` groups."""
    plt = _plt()
    return plt.subplots(figsize=(max(6.0, 1.2 + n_tasks * (0.9 + 0.25 * n_bars)), 4.2))


def _finish_task_bars(fig, ax, tasks: list[str], path: Path, ylabel: str, title: str) -> Path:
    """Task names under the groups, labels, legend outside the axes; saves and closes the figure."""
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=15 if len(tasks) > 3 else 0, ha="right" if len(tasks) > 3 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def method_bars(rows, tasks: list[str], path: Path, metric: str = "acc") -> Path:
    """Grouped bars: one group per task, one bar per model, error bars of one stderr."""
    n = len(rows)
    width = 0.8 / max(n, 1)
    fig, ax = _task_bars_figure(len(tasks), n)
    colours = _palette(n)
    for i, row in enumerate(rows):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(tasks))]
        vals = [100 * row.scores[t][0] if t in row.scores else math.nan for t in tasks]
        errs = [100 * (row.scores[t][1] or 0.0) if t in row.scores else 0.0 for t in tasks]
        hatch = "//" if row.role == "base" else (".." if row.role == "parent" else None)
        ax.bar(xs, vals, width, yerr=errs, capsize=3, label=f"{row.label} ({row.role})", color=colours[i], hatch=hatch, edgecolor="black", linewidth=0.5)
    return _finish_task_bars(fig, ax, tasks, path, ylabel=f"{metric} (%)", title=f"{metric} per task and model (± 1 stderr)")


def difference_vs_base(rows, base, tasks: list[str], path: Path, metric: str = "acc") -> Path:
    """Bars of (model - base) in points per task; errors combine both stderrs in quadrature."""
    others = [r for r in rows if r is not base]
    n = len(others)
    width = 0.8 / max(n, 1)
    fig, ax = _task_bars_figure(len(tasks), n)
    colours = _palette(n + 1)[1:]
    for i, row in enumerate(others):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(tasks))]
        diffs, errs = [], []
        for t in tasks:
            if t in row.scores and t in base.scores:
                v, se = row.scores[t]
                b, bse = base.scores[t]
                diffs.append(100 * (v - b))
                errs.append(100 * math.sqrt((se or 0.0) ** 2 + (bse or 0.0) ** 2))
            else:
                diffs.append(math.nan)
                errs.append(0.0)
        ax.bar(xs, diffs, width, yerr=errs, capsize=3, label=f"{row.label} ({row.role})", color=colours[i], edgecolor="black", linewidth=0.5)
    ax.axhline(0.0, color="black", linewidth=0.8)
    return _finish_task_bars(fig, ax, tasks, path, ylabel=f"{metric} - base {metric} (points)", title=f"Difference from the base model ({base.label})")


def round_curves(all_runs, tasks: list[str], path: Path, metric: str = "acc", base=None) -> Path:
    """One panel per task plus the mean: ``metric`` against round, one line per model label."""
    plt = _plt()
    panels = list(tasks) + (["mean"] if len(tasks) > 1 else [])
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    labels = list(dict.fromkeys(r.label for r in all_runs if r.round is not None))
    colours = dict(zip(labels, _palette(len(labels))))
    for k, panel in enumerate(panels):
        ax = axes[k // cols][k % cols]
        for label in labels:
            pts = sorted((r.round, r) for r in all_runs if r.label == label and r.round is not None)
            xs, ys, es = [], [], []
            for rnd, r in pts:
                if panel == "mean":
                    m = r.mean(tasks)
                    if m is None:
                        continue
                    xs.append(rnd); ys.append(100 * m); es.append(100 * (r.mean_stderr(tasks) or 0.0))
                elif panel in r.scores:
                    v, se = r.scores[panel]
                    xs.append(rnd); ys.append(100 * v); es.append(100 * (se or 0.0))
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=2, label=label, color=colours[label])
        if base is not None:
            ref = base.mean(tasks) if panel == "mean" else (base.scores.get(panel, (None, None))[0])
            if ref is not None:
                ax.axhline(100 * ref, color="#7f7f7f", linestyle="--", linewidth=1, label=f"{base.label} (base)")
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for k in range(len(panels), nrows * cols):
        axes[k // cols][k % cols].set_visible(False)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(5, len(names)), fontsize=8)
    fig.suptitle(f"{metric} per round")
    fig.tight_layout(rect=(0, 0.05 + 0.03 / nrows, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
