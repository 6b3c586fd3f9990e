"""The selection rule on hand-built score tables, and the scores reply both sides agree on."""

from __future__ import annotations

import pytest

from fedmerge.protocol import ProtocolError, read_scores, scores_meta
from fedmerge.server.selection import choose

# Three hospitals, three candidates. c3 is best on average but ruins hospital-b's specialty;
# c2 is nobody's favourite but serves everyone.
TABLE = {
    "hospital-a": {"c1": {"val": 0.50}, "c2": {"val": 0.60}, "c3": {"val": 0.80}},
    "hospital-b": {"c1": {"val": 0.50}, "c2": {"val": 0.55}, "c3": {"val": 0.30}},
    "hospital-c": {"c1": {"val": 0.50}, "c2": {"val": 0.60}, "c3": {"val": 0.85}},
}


def test_mean_and_worst_choose_differently():
    mean = choose(["c1", "c2", "c3"], TABLE, "mean")
    assert mean.chosen == "c3"
    assert mean.values == pytest.approx({"c1": 0.50, "c2": (0.60 + 0.55 + 0.60) / 3, "c3": (0.80 + 0.30 + 0.85) / 3})
    worst = choose(["c1", "c2", "c3"], TABLE, "worst")
    assert worst.chosen == "c2"
    assert worst.values == pytest.approx({"c1": 0.50, "c2": 0.55, "c3": 0.30})
    assert worst.scorers == ["hospital-a", "hospital-b", "hospital-c"]
    assert worst.reason == "c2 has the highest worst scorer's mean accuracy (over 3 scorer(s)): 0.5500 (c1 0.5000, c3 0.3000)"


def test_each_scorer_weighs_its_own_mean_whatever_its_number_of_tasks():
    # hospital-a has three validation tasks, hospital-b one: per-scorer means first, then the rule.
    table = {
        "hospital-a": {"c1": {"t1": 0.9, "t2": 0.9, "t3": 0.9}, "c2": {"t1": 0.6, "t2": 0.6, "t3": 0.6}},
        "hospital-b": {"c1": {"u": 0.1}, "c2": {"u": 0.6}},
    }
    out = choose(["c1", "c2"], table, "mean")
    # pooled over the four task scores c1 would win (0.7 vs 0.6); per scorer it is 0.5 vs 0.6
    assert out.values == pytest.approx({"c1": 0.5, "c2": 0.6}) and out.chosen == "c2"


def test_a_tie_goes_to_the_candidate_listed_first():
    table = {"h": {"c1": {"v": 0.4}, "c2": {"v": 0.7}, "c3": {"v": 0.7}}}
    out = choose(["c1", "c2", "c3"], table, "mean")
    assert out.chosen == "c2" and "tied with c3, the candidate listed first wins" in out.reason
    # the same table, listed in another order, picks the other one: order alone decides a tie
    assert choose(["c3", "c2", "c1"], table, "mean").chosen == "c3"


def test_scorers_that_missed_a_candidate_do_not_count():
    table = {**TABLE, "hospital-d": {"c1": {"val": 1.0}}}  # scored only c1: not counted
    assert choose(["c1", "c2", "c3"], table, "worst").values == choose(["c1", "c2", "c3"], TABLE, "worst").values
    none = choose(["c1", "c2"], {"hospital-d": {"c1": {"val": 1.0}}}, "mean")
    assert none.chosen is None and none.values == {} and none.reason == "no scorer scored every candidate"


# -- the scores reply ------------------------------------------------------------------------------
def test_a_scores_reply_holds_the_round_and_one_number_per_candidate_and_task():
    meta = scores_meta(3, {"c1": {"val_a": 0.25, "val_b": 1}, "c2": {"val_a": 0.5, "val_b": 0.0}})
    assert meta == {"round": 3, "acc/c1/val_a": 0.25, "acc/c1/val_b": 1.0, "acc/c2/val_a": 0.5, "acc/c2/val_b": 0.0}
    assert read_scores(meta, 3, ["c1", "c2"]) == {"c1": {"val_a": 0.25, "val_b": 1.0}, "c2": {"val_a": 0.5, "val_b": 0.0}}
    assert read_scores(scores_meta(3, {"c1": {"a/b": 0.5}}), 3, ["c1"]) == {"c1": {"a/b": 0.5}}  # a task name may hold '/'


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"round": 2, "acc/c1/v": 0.5, "acc/c2/v": 0.5}, "scores for round 2, asked for round 3"),
        ({"round": 3, "acc/c1/v": 0.5, "acc/c2/v": 0.5, "model": "path/x"}, "unexpected field 'model'"),
        ({"round": 3, "acc/c1/v": 0.5, "acc/c2/v": 1.5}, "candidate c2, task 'v': '1.5' is not an accuracy in [0, 1]"),
        ({"round": 3, "acc/c1/v": 0.5, "acc/c2/v": float("nan")}, "is not an accuracy"),
        ({"round": 3, "acc/c1/v": 0.5, "acc/c2/v": "0.5"}, "is not an accuracy"),
        ({"round": 3, "acc/c1/v": 0.5, "acc/c2/v": True}, "is not an accuracy"),
        ({"round": 3, "acc/c1/v": 0.5}, "no scores for candidate(s) c2"),
        ({"round": 3, "acc/c1/v": 0.5, "acc/c2/v": 0.5, "acc/c9/v": 0.5}, "a score for 'c9', which was not asked for"),
        ({"round": 3, "acc/c1/v": 0.5, "acc/c2/w": 0.5}, "candidate c2 was scored on other tasks than c1"),
        ({"round": 3, "acc/c1/": 0.5, "acc/c2/v": 0.5}, "no task name"),
    ],
)
def test_a_scores_reply_with_anything_else_is_refused(meta, message):
    with pytest.raises(ProtocolError) as err:
        read_scores(meta, 3, ["c1", "c2"])
    assert message in str(err.value)
