"""Best-of-n baseline: the analytic KL, the exact expectation over n-subsets, and its fit in the report."""

import itertools
import json
import math
import random

import pytest

from rlhf.compare.best_of_n import best_of_n_curve, bon_kl, expected_best_of_n


def test_the_kl_of_best_of_n_is_log_n_minus_n_minus_one_over_n():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl(64) == pytest.approx(math.log(64) - 63 / 64)
    with pytest.raises(ValueError):
        bon_kl(0)


def test_best_of_n_by_hand():
    reward, gold = [1.0, 3.0, 2.0], [10.0, 30.0, 20.0]
    assert expected_best_of_n(reward, gold, 1) == pytest.approx(20.0)  # a random sample
    assert expected_best_of_n(reward, gold, 3) == pytest.approx(30.0)  # the reward's favourite
    # subsets {0,1} -> sample 1 (30), {0,2} -> sample 2 (20), {1,2} -> sample 1 (30)
    assert expected_best_of_n(reward, gold, 2) == pytest.approx(80 / 3)


def test_the_estimate_equals_the_mean_over_every_subset():
    rng = random.Random(0)
    reward = [rng.gauss(0, 1) for _ in range(9)]
    gold = [rng.random() for _ in range(9)]
    for n in range(1, 10):
        subsets = list(itertools.combinations(range(9), n))
        brute = sum(gold[max(s, key=lambda i: reward[i])] for s in subsets) / len(subsets)
        assert expected_best_of_n(reward, gold, n) == pytest.approx(brute)


def test_the_curve_averages_prompts_and_carries_the_analytic_distance():
    reward = [[0.0, 1.0], [1.0, 0.0]]
    gold = [[0.0, 1.0], [0.5, 0.0]]
    rows = best_of_n_curve(reward, gold, [1, 2])
    assert [r["n"] for r in rows] == [1.0, 2.0]
    assert rows[0]["gold"] == pytest.approx((0.5 + 0.25) / 2) and rows[1]["gold"] == pytest.approx((1.0 + 0.5) / 2)
    assert rows[1]["reward"] == pytest.approx(1.0) and rows[1]["d"] == pytest.approx(math.sqrt(bon_kl(2)))


def test_the_report_fits_the_best_of_n_form_and_plots_the_baseline(tmp_path):
    from rlhf.compare.report import BEST_OF_N, best_of_n_fit, gao_findings

    g0, alpha, beta = 0.4, 0.5, 0.2
    curve = [{"n": float(n), "d": math.sqrt(bon_kl(n)), "gold": g0 + math.sqrt(bon_kl(n)) * (alpha - beta * math.sqrt(bon_kl(n)))}
             for n in (1, 2, 4, 8, 16, 32, 64)]
    bon = {"samples": 64, "curve": curve}
    fit = best_of_n_fit(bon, {"eval/gold_score": g0})
    assert fit["form"] == "bon" and (fit["alpha"], fit["beta"]) == pytest.approx((alpha, beta))
    assert fit["d_peak"] == pytest.approx(alpha / (2 * beta))
    line = gao_findings({BEST_OF_N: fit})[0]
    assert line.startswith("best-of-n: gold gain against d = √KL fits d(α − β·d)") and "n = 1 … 64" in line
    assert best_of_n_fit(bon, {}) is None  # no base gold: no gain
    json.dumps(fit)  # goes into summary.json as it is


def test_the_comparison_runs_the_baseline_on_the_held_out_prompts(tiny_comparison):
    _, out, _ = tiny_comparison
    bon = json.loads((out / "best_of_n.json").read_text())
    assert bon["prompts"] == 4 and bon["samples"] == 4
    assert [row["n"] for row in bon["curve"]] == [1.0, 2.0, 4.0]
    assert [row["kl"] for row in bon["curve"]] == pytest.approx([bon_kl(1), bon_kl(2), bon_kl(4)])
    rewards = [row["reward"] for row in bon["curve"]]
    assert rewards == sorted(rewards), "the expected best reward grows with n"
    assert all(0.0 <= row["gold"] <= 1.0 for row in bon["curve"])
