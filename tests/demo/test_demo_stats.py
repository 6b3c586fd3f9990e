"""The report's statistics: paired bootstrap intervals and the Pareto front, on hand-built samples."""

from __future__ import annotations

import pytest

from fedmerge.demo.stats import PairingError, pair_items, paired_bootstrap, pareto_front


def _paired(n: int, a_right: int, b_right: int) -> tuple[list[float], list[float]]:
    """n items; A answers the first a_right right, B the first b_right (so they share the easy ones)."""
    return [1.0 if i < a_right else 0.0 for i in range(n)], [1.0 if i < b_right else 0.0 for i in range(n)]


def test_known_difference_is_estimated_exactly_and_inside_the_interval():
    a, b = _paired(100, 70, 60)
    gain = paired_bootstrap({"exam": a}, {"exam": b}, iterations=4000, seed=1)
    assert gain.estimate == pytest.approx(0.10)
    assert gain.contains(0.10) and gain.low > 0.0
    # Paired: only the 10 items where the models differ vary; the gain is a binomial mean of
    # those 10 discordant items over 100, so its standard error is sqrt(0.1 * 0.9 / 100) = 0.03
    # and the 95 % interval is about 0.10 +- 0.06.
    assert 0.04 <= gain.low <= 0.06 and 0.14 <= gain.high <= 0.16
    assert gain.items == 100 and gain.as_points().startswith("+10.0 [")


def test_identical_models_have_a_zero_width_interval():
    a, _ = _paired(50, 30, 0)
    gain = paired_bootstrap({"exam": a}, {"exam": list(a)})
    assert (gain.estimate, gain.low, gain.high) == (0.0, 0.0, 0.0)


def test_width_shrinks_with_the_number_of_items():
    widths = []
    for n in (40, 160, 640):
        a, b = _paired(n, int(0.6 * n), int(0.5 * n))
        gain = paired_bootstrap({"exam": a}, {"exam": b}, iterations=3000, seed=2)
        assert gain.contains(0.1)
        widths.append(gain.width)
    # the width of a mean's interval goes as 1 / sqrt(n): quadrupling n about halves it
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[1] == pytest.approx(2.0, rel=0.25) and widths[1] / widths[2] == pytest.approx(2.0, rel=0.25)


def test_strata_are_weighted_equally_as_the_mean_over_exams_is():
    # exam x: A +0.5 on 10 items; exam y: A -0.1 on 100 items. Mean over exams: (0.5 - 0.1) / 2.
    ax, bx = _paired(10, 5, 0)
    ay, by = _paired(100, 50, 60)
    gain = paired_bootstrap({"x": ax, "y": ay}, {"x": bx, "y": by}, seed=3)
    assert gain.estimate == pytest.approx(0.2)
    assert gain.contains(0.2)


def test_the_same_seed_gives_the_same_interval():
    a, b = _paired(60, 40, 33)
    assert paired_bootstrap({"e": a}, {"e": b}, seed=7) == paired_bootstrap({"e": a}, {"e": b}, seed=7)


def test_pairing_is_by_item_id_and_refuses_unpaired_items():
    a = {"exam": {"q2": 1.0, "q1": 0.0}}
    b = {"exam": {"q1": 1.0, "q2": 1.0}}
    pa, pb = pair_items(a, b)
    assert pa == {"exam": [0.0, 1.0]} and pb == {"exam": [1.0, 1.0]}
    with pytest.raises(PairingError, match="q3"):
        pair_items(a, {"exam": {"q1": 1.0, "q3": 1.0}})
    with pytest.raises(PairingError, match="other"):
        pair_items(a, {"other": {"q1": 1.0, "q2": 1.0}})


def test_pareto_front():
    points = {"a": (0.9, 0.3), "b": (0.8, 0.5), "c": (0.7, 0.4), "d": (0.6, 0.6), "e": (0.6, 0.6)}
    # c is beaten by b on both; d and e tie (neither beats the other)
    assert pareto_front(points) == ["a", "b", "d", "e"]
