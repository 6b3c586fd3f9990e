"""Paired bootstrap confidence intervals for the difference between two models on the same items.

The report's statistic is a model's *mean accuracy over exams*: the average, over strata (one
stratum per exam, or per (world, exam) when worlds are pooled), of the fraction of the stratum's
items answered right. The gain of model A over model B is that statistic for A minus that for B.

The interval resamples *items*, not models: each bootstrap replicate draws, within every stratum,
as many items as it has, with replacement, and scores both models on the same draw (paired), so
what the two models share (an easy item, a hard one) cancels out. The 95 % interval is the 2.5th
and 97.5th percentile of the replicates' gains (the percentile bootstrap, Efron & Tibshirani,
*An Introduction to the Bootstrap*, 1993, ch. 13). Replicates are drawn from a seeded generator,
so a report is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from fedmerge.errors import FedmergeError


class PairingError(FedmergeError):
    """Two models' item scores cannot be paired: a stratum or an item is missing from one of them."""


@dataclass(frozen=True)
class PairedGain:
    """A - B in mean accuracy over strata, with its paired bootstrap interval (fractions, not %)."""

    estimate: float
    low: float
    high: float
    level: float
    items: int  # paired items over all strata
    iterations: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def width(self) -> float:
        return self.high - self.low

    def as_points(self) -> str:
        """``+4.2 [+1.0, +7.5]`` in accuracy points."""
        return f"{100 * self.estimate:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def pair_items(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Align two ``stratum -> item id -> score`` tables on the same strata and items (sorted ids)."""
    if set(a) != set(b):
        raise PairingError(f"the two models were scored on different strata: {sorted(set(a) ^ set(b))}")
    pa: dict[str, list[float]] = {}
    pb: dict[str, list[float]] = {}
    for stratum in sorted(a):
        ids_a, ids_b = set(a[stratum]), set(b[stratum])
        if ids_a != ids_b:
            missing = sorted(ids_a ^ ids_b)
            raise PairingError(f"stratum {stratum!r}: items scored for only one model, e.g. {missing[:3]}")
        if not ids_a:
            raise PairingError(f"stratum {stratum!r} has no items")
        ids = sorted(ids_a)
        pa[stratum] = [float(a[stratum][i]) for i in ids]
        pb[stratum] = [float(b[stratum][i]) for i in ids]
    return pa, pb


def paired_bootstrap(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    *,
    iterations: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedGain:
    """The gain of A over B (mean over strata of per-stratum accuracy) with its paired interval.

    ``a`` and ``b`` map each stratum to per-item scores in the same item order (``pair_items``).
    """
    import numpy as np

    if not a:
        raise PairingError("no strata to compare")
    if set(a) != set(b):
        raise PairingError(f"the two models were scored on different strata: {sorted(set(a) ^ set(b))}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    replicates = np.zeros(iterations)
    estimate = 0.0
    n_items = 0
    for stratum in sorted(a):
        diff = np.asarray(a[stratum], dtype=float) - np.asarray(b[stratum], dtype=float)
        if diff.ndim != 1 or diff.size == 0 or len(a[stratum]) != len(b[stratum]):
            raise PairingError(f"stratum {stratum!r}: the two models have {len(a[stratum])} and {len(b[stratum])} item scores")
        n = diff.size
        n_items += n
        estimate += diff.mean()
        draws = rng.integers(0, n, size=(iterations, n))
        replicates += diff[draws].mean(axis=1)
    k = len(a)
    estimate /= k
    replicates /= k
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return PairedGain(estimate=float(estimate), low=float(low), high=float(high), level=level, items=n_items, iterations=iterations)


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """The labels no other point beats on both coordinates (higher is better on each), in input order."""
    front = []
    for label, (x, y) in points.items():
        dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for other, (ox, oy) in points.items() if other != label)
        if not dominated:
            front.append(label)
    return front


__all__ = ["PairedGain", "PairingError", "pair_items", "paired_bootstrap", "pareto_front"]
