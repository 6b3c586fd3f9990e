"""PNG plots of one comparison (runs with the same settings), readable at a glance.

After the paper's Figures 2-4, drawn so that many models stay legible:

* one small panel per task (and one for the average) instead of one crowded bar group per task;
  models are rows, top to bottom in the table's order, named on the axis (no colour lookup);
* one colour per family (base, fine-tuned, and each merge method: a method's variants, say
  DARE-TIES at several densities, share its colour), legend in the table's order;
* every bar carries its value, and a difference of exactly zero is drawn as a tick on the zero line
  rather than a bar of no width;
* round curves mark the rounds the publication gate refused.

matplotlib with the Agg backend: no display needed. ``*_figure`` functions return the figure
(for inspection); the others save it and return the path.
"""

from __future__ import annotations

import math
from pathlib import Path

_FAMILY_FIXED = {"base": "#7f7f7f", "fine-tuned": "#1f77b4"}
# Distinct, colour-blind-tolerant hues for merge methods, in order of first appearance.
_MERGE_COLOURS = ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                  "#393b79", "#637939", "#843c39", "#7b4173"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]
_ROLE_ORDER = {"base": 0, "parent": 1, "merge": 2}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def family_colours(rows) -> dict[str, str]:
    """Family -> colour, in the order the families first appear in ``rows``."""
    out: dict[str, str] = {}
    merges = 0
    for row in rows:
        fam = row.family
        if fam in out:
            continue
        if fam in _FAMILY_FIXED:
            out[fam] = _FAMILY_FIXED[fam]
        else:
            out[fam] = _MERGE_COLOURS[merges % len(_MERGE_COLOURS)]
            merges += 1
    return out


def _panels(tasks: list[str]) -> list[str]:
    return list(tasks) + (["average"] if len(tasks) > 1 else [])


def _grid(n_panels: int, n_bars: int):
    plt = _plt()
    cols = min(3, n_panels)
    grid_rows = math.ceil(n_panels / cols)
    panel_h = 0.9 + 0.3 * max(n_bars, 1)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(1.8 + 3.6 * cols, 1.3 + panel_h * grid_rows), squeeze=False, sharey=True)
    for k in range(n_panels, grid_rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    return fig, [axes[k // cols][k % cols] for k in range(n_panels)], grid_rows


def _value(row, panel: str, tasks: list[str]) -> tuple[float, float]:
    """(value, stderr) in percent of one row in one panel; NaN when the row lacks it."""
    if panel == "average":
        m = row.mean(tasks)
        return (math.nan, 0.0) if m is None else (100 * m, 100 * (row.mean_stderr(tasks) or 0.0))
    if panel not in row.scores:
        return math.nan, 0.0
    v, se = row.scores[panel]
    return 100 * v, 100 * (se or 0.0)


def _legend_and_title(fig, colours: dict[str, str], title: str, subtitle: str | None, n_bars: int) -> None:
    """Title (and settings) on top, the family legend under it in table order, panels below."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, edgecolor="black", linewidth=0.5, label=f) for f, c in colours.items()]
    height = fig.get_size_inches()[1]
    title_in = 0.7 if subtitle else 0.45
    legend_in = 0.3 * math.ceil(len(handles) / 6)
    fig.tight_layout()
    # Room on top for the title and legend; between panel rows for tick labels, axis label and title
    # (about 0.95 in, as a fraction of one panel's height).
    fig.subplots_adjust(top=1 - (title_in + legend_in + 0.35) / height, hspace=0.95 / (0.3 * max(n_bars, 1) + 0.2))
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11, y=1 - 0.08 / height)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - title_in / height), ncol=min(6, len(handles)),
               fontsize=8, frameon=False)


def _label_bars(ax, ys, values, errs, zero_marks: bool, colours) -> None:
    span = max([abs(v) + e for v, e in zip(values, errs) if not math.isnan(v)] + [1.0])
    for y, v, e, c in zip(ys, values, errs, colours):
        if math.isnan(v):
            ax.text(0, y, " n/a", va="center", ha="left", fontsize=7, color="#555555")
            continue
        if zero_marks and v == 0:
            ax.plot([0], [y], marker="|", markersize=11, markeredgewidth=2.5, color=c, zorder=3, gid="zero-difference")
            text = "±0.0"
        else:
            text = f"{v:+.1f}" if zero_marks else f"{v:.1f}"
        x = v + (e if v >= 0 else -e) + 0.02 * span * (1 if v >= 0 else -1)
        ax.text(x, y, text, va="center", ha="left" if v >= 0 else "right", fontsize=7)


def methods_figure(rows, tasks: list[str], metric: str = "acc", subtitle: str | None = None, colours: dict[str, str] | None = None):
    """One panel per task (and the average): each model's ``metric`` with one-stderr bars."""
    colours = colours or family_colours(rows)
    panels = _panels(tasks)
    fig, axes, _ = _grid(len(panels), len(rows))
    ys = list(range(len(rows)))
    bar_colours = [colours[r.family] for r in rows]
    # One scale for every panel, so bars of different tasks compare by length.
    top = max([v + e for r in rows for v, e in (_value(r, p, tasks) for p in panels) if not math.isnan(v)] + [1.0])
    for ax, panel in zip(axes, panels):
        vals, errs = zip(*(_value(r, panel, tasks) for r in rows)) if rows else ((), ())
        _bar_panel(ax, ys, vals, errs, bar_colours, zero_marks=False)
        ax.set_xlim(0, top * 1.2)
        _style_panel(ax, panel, f"{metric} (%)")
    _row_labels(axes[0], ys, [r.label for r in rows])
    _legend_and_title(fig, colours, f"{metric} per task and model (± 1 stderr)", subtitle, len(rows))
    return fig


def _differences(others, base, panel: str, tasks: list[str]) -> tuple[list[float], list[float]]:
    """(model - base, the two stderrs combined) per row, in points; NaN where either lacks it."""
    b, bse = _value(base, panel, tasks)
    diffs, errs = [], []
    for r in others:
        v, se = _value(r, panel, tasks)
        d = v - b if not (math.isnan(v) or math.isnan(b)) else math.nan
        diffs.append(d)
        errs.append(math.sqrt(se ** 2 + bse ** 2) if not math.isnan(d) else 0.0)
    return diffs, errs


def _bar_panel(ax, ys, values, errs, colours, zero_marks: bool) -> None:
    """Horizontal bars with their error bars and value labels; a NaN draws no bar."""
    ax.barh(ys, [0 if math.isnan(v) else v for v in values], xerr=errs, color=colours, edgecolor="black", linewidth=0.5,
            capsize=2, error_kw={"elinewidth": 0.8})
    _label_bars(ax, ys, values, errs, zero_marks=zero_marks, colours=colours)


def _style_panel(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(labelsize=8)


def _row_labels(ax, ys, labels: list[str]) -> None:
    """The model names on the first panel, top to bottom in the rows' order."""
    ax.set_yticks(ys)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()


def vs_base_figure(rows, base, tasks: list[str], metric: str = "acc", subtitle: str | None = None, colours: dict[str, str] | None = None):
    """One panel per task (and the average): each model's ``metric`` minus the base's, in points."""
    others = [r for r in rows if r is not base]
    colours = colours or family_colours(rows)
    panels = _panels(tasks)
    fig, axes, _ = _grid(len(panels), len(others))
    ys = list(range(len(others)))
    bar_colours = [colours[r.family] for r in others]
    per_panel = {p: _differences(others, base, p, tasks) for p in panels}
    span = max([abs(d) + e for diffs, errs in per_panel.values() for d, e in zip(diffs, errs) if not math.isnan(d)] + [1.0])
    for ax, panel in zip(axes, panels):
        diffs, errs = per_panel[panel]
        ax.axvline(0.0, color="black", linewidth=0.8)
        _bar_panel(ax, ys, diffs, errs, bar_colours, zero_marks=True)
        ax.set_xlim(-span * 1.35, span * 1.35)
        _style_panel(ax, panel, f"{metric} - base (points)")
    _row_labels(axes[0], ys, [r.label for r in others])
    _legend_and_title(fig, {f: c for f, c in colours.items() if any(r.family == f for r in others)},
                      f"Difference from the base model ({base.label})", subtitle, len(others))
    return fig


def rounds_figure(all_runs, tasks: list[str], metric: str = "acc", base=None, subtitle: str | None = None,
                  colours: dict[str, str] | None = None):
    """One panel per task plus the mean: ``metric`` against round, one line per model label;
    rounds the publication gate refused are crossed out."""
    plt = _plt()
    panels = list(tasks) + (["mean"] if len(tasks) > 1 else [])
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows + 0.8), squeeze=False)
    with_rounds = [r for r in all_runs if r.round is not None]
    ordered = sorted(dict.fromkeys((_ROLE_ORDER.get(r.role, 9), r.label) for r in with_rounds))
    labels = [label for _, label in ordered]
    firsts = {label: next(r for r in with_rounds if r.label == label) for label in labels}
    colours = colours or family_colours([firsts[label] for label in labels])
    marker_of: dict[str, str] = {}
    per_family: dict[str, int] = {}
    for label in labels:
        fam = firsts[label].family
        marker_of[label] = _MARKERS[per_family.get(fam, 0) % len(_MARKERS)]
        per_family[fam] = per_family.get(fam, 0) + 1
    refused_drawn = False
    for k, panel in enumerate(panels):
        ax = axes[k // cols][k % cols]
        for label in labels:
            pts = sorted(((r.round, r) for r in with_rounds if r.label == label), key=lambda p: p[0])
            xs, ys, es, refused = [], [], [], []
            for rnd, r in pts:
                v, se = _value(r, "average" if panel == "mean" else panel, tasks)
                if math.isnan(v):
                    continue
                xs.append(rnd)
                ys.append(v)
                es.append(se)
                if r.gate == "refused":
                    refused.append((rnd, v))
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker=marker_of[label], capsize=2, label=label, color=colours.get(firsts[label].family, "black"))
            if refused:
                ax.scatter([x for x, _ in refused], [y for _, y in refused], marker="x", s=90, linewidths=2, color="black", zorder=4,
                           label=None if refused_drawn else "refused by the gate")
                refused_drawn = True
        if base is not None:
            ref, _ = _value(base, "average" if panel == "mean" else panel, tasks)
            if not math.isnan(ref):
                ax.axhline(ref, color="#7f7f7f", linestyle="--", linewidth=1, label=f"{base.label} (base)")
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for k in range(len(panels), nrows * cols):
        axes[k // cols][k % cols].set_visible(False)
    found: dict[str, object] = {}
    for ax in (axes[k // cols][k % cols] for k in range(len(panels))):
        for h, n in zip(*ax.get_legend_handles_labels()):
            found.setdefault(n, h)
    # Models in the table's order, then the marks.
    names = [n for n in labels if n in found] + [n for n in found if n not in labels]
    handles = [found[n] for n in names]
    fig.legend(handles, names, loc="lower center", ncol=min(5, len(names)), fontsize=8)
    fig.suptitle(f"{metric} per round" + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0.06 + 0.04 / nrows, 1, 0.93))
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def method_bars(rows, tasks: list[str], path: Path, metric: str = "acc", subtitle: str | None = None,
                colours: dict[str, str] | None = None) -> Path:
    return _save(methods_figure(rows, tasks, metric, subtitle, colours), path)


def difference_vs_base(rows, base, tasks: list[str], path: Path, metric: str = "acc", subtitle: str | None = None,
                       colours: dict[str, str] | None = None) -> Path:
    return _save(vs_base_figure(rows, base, tasks, metric, subtitle, colours), path)


def round_curves(all_runs, tasks: list[str], path: Path, metric: str = "acc", base=None, subtitle: str | None = None,
                 colours: dict[str, str] | None = None) -> Path:
    return _save(rounds_figure(all_runs, tasks, metric, base, subtitle, colours), path)
