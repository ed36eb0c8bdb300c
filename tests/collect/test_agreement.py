"""Agreement, bias and leaderboard statistics checked against worked examples."""

import math

import pytest

from rlhf.collect import agreement


def test_krippendorff_alpha_matches_published_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", 4 observers x 12 units with missing
    # values; the paper reports nominal alpha = 0.743. Columns are units; None = no rating.
    rows = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[r[u] for r in rows if r[u] is not None] for u in range(12)]
    assert agreement.krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_perfect_and_undefined():
    assert agreement.krippendorff_alpha_nominal([["a", "a"], ["b", "b"], ["tie", "tie", "tie"]]) == 1.0
    # One value in use: no expected disagreement, alpha undefined.
    assert math.isnan(agreement.krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]))
    # Single ratings are not pairable.
    assert math.isnan(agreement.krippendorff_alpha_nominal([["a"], ["b"]]))


def test_krippendorff_alpha_two_raters_by_hand():
    # Units (a,a) (b,b) (a,b): coincidences o_aa=2, o_bb=2, o_ab=o_ba=1; n_a=n_b=3, n=6.
    # alpha = 1 - (6-1) * 2 / (3*3 + 3*3) = 1 - 10/18 = 4/9.
    units = [["a", "a"], ["b", "b"], ["a", "b"]]
    assert agreement.krippendorff_alpha_nominal(units) == pytest.approx(4 / 9)
    assert agreement.percent_agreement(units) == pytest.approx(2 / 3)


def test_left_win_rate_ignores_ties():
    judgments = [("a", "a"), ("b", "a"), ("b", "b"), ("a", "a"), ("tie", "a"), ("both_bad", "b")]
    rate = agreement.left_win_rate(judgments)
    assert rate.n == 4
    assert rate.value == pytest.approx(3 / 4)
    assert rate.low < 0.75 < rate.high


def test_gold_accuracy_counts_ties_and_misses():
    rate = agreement.gold_accuracy([("a", 1.0), ("a", 0.0), ("b", 0.0), ("both_bad", 0.5), ("both_bad", 1.0)])
    assert rate.value == pytest.approx(3 / 5)


def test_bradley_terry_two_players_by_hand():
    # A beats B three times, loses once: maximum likelihood strength ratio 3, so s_A - s_B = ln 3.
    comps = [("A", "B", 1.0)] * 3 + [("A", "B", 0.0)]
    fit = agreement.bradley_terry(["A", "B"], comps, prior=0.0)
    assert fit["A"] - fit["B"] == pytest.approx(math.log(3), abs=1e-6)
    # Ties count as half wins: 2 wins + 2 ties = 3 wins of 4, the same ratio.
    fit_ties = agreement.bradley_terry(["A", "B"], [("A", "B", 1.0)] * 2 + [("B", "A", 0.5)] * 2, prior=0.0)
    assert fit_ties["A"] - fit_ties["B"] == pytest.approx(math.log(3), abs=1e-6)


def test_bradley_terry_recovers_known_strengths():
    true = {"x": 0.0, "y": 1.0, "z": -0.5}
    comps = []
    for i in true:
        for j in true:
            if i < j:
                p = 1 / (1 + math.exp(true[j] - true[i]))
                comps += [(i, j, p)] * 10  # expected outcomes: the MLE is exactly the truth
    fit = agreement.bradley_terry(list(true), comps, prior=0.0)
    for a in true:
        for b in true:
            assert fit[a] - fit[b] == pytest.approx(true[a] - true[b], abs=1e-6)


def test_leaderboard_orders_and_brackets():
    comps = [("good", "bad", 1.0)] * 30 + [("good", "bad", 0.0)] * 10 + [("good", "good", 0.5)] * 5
    rows = agreement.leaderboard(comps, bootstrap=100, seed=1)
    assert [r.name for r in rows] == ["good", "bad"]
    good = rows[0]
    assert good.low <= good.rating <= good.high
    assert good.comparisons == 40  # self-comparisons dropped
    assert good.win_rate == pytest.approx(0.75)
    assert rows[1].rating < 1000 < good.rating
    assert agreement.leaderboard([("only", "only", 1.0)]) == []
