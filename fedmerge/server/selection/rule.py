"""The rule that picks the published candidate from a table of validation accuracies.

Pure: ``choose(candidates, scores, rule)`` looks at nothing but the table. A scorer (a hospital,
or the central evaluator) counts only when it scored every candidate; its value for a candidate
is its mean accuracy over its own tasks, so a hospital with many validation tasks weighs as much
as one with a single task.

- ``mean``:  value(c) = mean over scorers s of mean_t acc[s][c][t]
- ``worst``: value(c) = min  over scorers s of mean_t acc[s][c][t]   (the worst-served scorer)

The candidate with the highest value is published. Values within ``TIE_TOLERANCE`` of the best
are a tie, which goes to the candidate listed first in the config (the lowest number: c1 before
c2), so the same table always gives the same choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

TIE_TOLERANCE = 1e-9

Rule = Literal["mean", "worst"]
ScoreTable = Mapping[str, Mapping[str, Mapping[str, float]]]  # scorer -> candidate -> task -> accuracy


@dataclass(frozen=True)
class Choice:
    chosen: str | None  # None: no scorer scored every candidate
    values: dict[str, float]  # candidate -> the rule's value
    scorers: list[str]  # the scorers the values rest on
    reason: str


def scorer_means(scores: ScoreTable, candidates: list[str]) -> dict[str, dict[str, float]]:
    """scorer -> candidate -> its mean accuracy over the scorer's tasks, for complete scorers only."""
    out: dict[str, dict[str, float]] = {}
    for scorer in sorted(scores):
        table = scores[scorer]
        if all(table.get(c) for c in candidates):
            out[scorer] = {c: sum(table[c].values()) / len(table[c]) for c in candidates}
    return out


def choose(candidates: list[str], scores: ScoreTable, rule: Rule) -> Choice:
    """The candidate to publish by ``rule`` (see the module docstring), with the reason in words."""
    means = scorer_means(scores, candidates)
    if not candidates or not means:
        return Choice(None, {}, [], "no scorer scored every candidate")
    per_candidate = {c: [m[c] for m in means.values()] for c in candidates}
    if rule == "mean":
        values = {c: sum(v) / len(v) for c, v in per_candidate.items()}
        what = f"mean over {len(means)} scorer(s) of their mean accuracy"
    else:
        values = {c: min(v) for c, v in per_candidate.items()}
        what = f"worst scorer's mean accuracy (over {len(means)} scorer(s))"
    best = max(values.values())
    tied = [c for c in candidates if values[c] >= best - TIE_TOLERANCE]
    chosen = tied[0]
    others = ", ".join(f"{c} {values[c]:.4f}" for c in candidates if c != chosen)
    reason = f"{chosen} has the highest {what}: {values[chosen]:.4f}" + (f" ({others})" if others else "")
    if len(tied) > 1:
        reason += f"; tied with {', '.join(tied[1:])}, the candidate listed first wins"
    return Choice(chosen, values, sorted(means), reason)
