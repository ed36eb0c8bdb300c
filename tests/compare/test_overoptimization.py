"""Gao et al. (2023)'s over-optimization forms: fitted on exact curves they give back α, β and the peak."""

import math

import pytest

from rlhf.compare.overoptimization import fit_gao, gao_curve


def test_the_rl_form_is_recovered_with_its_peak():
    d = [0.5, 1.0, 1.5, 2.0, 3.0]
    gain = [x * (0.3 - 0.1 * math.log(x)) for x in d]  # α 0.3, β 0.1: peak at exp(0.3/0.1 − 1) = e², gain 0.1·e²
    fit = fit_gao([0.0, *d], [0.0, *gain], "rl")  # the reference point (d = 0) is dropped: R(0) = 0 by the form
    assert fit["alpha"] == pytest.approx(0.3, abs=1e-9) and fit["beta"] == pytest.approx(0.1, abs=1e-9)
    assert fit["d_peak"] == pytest.approx(math.e ** 2) and fit["gain_peak"] == pytest.approx(0.1 * math.e ** 2)
    assert fit["points"] == 5 and fit["rmse"] < 1e-12
    assert gao_curve(fit, [0.0, 1.0]) == pytest.approx([0.0, 0.3])


def test_the_best_of_n_form_peaks_at_alpha_over_two_beta():
    d = [0.5, 1.0, 2.0, 3.0]
    fit = fit_gao(d, [x * (0.4 - 0.1 * x) for x in d], "bon")
    assert (fit["alpha"], fit["beta"]) == pytest.approx((0.4, 0.1))
    assert (fit["d_peak"], fit["gain_peak"]) == pytest.approx((2.0, 0.4))


def test_a_curve_that_has_not_turned_has_no_peak_and_too_few_points_no_fit():
    d = [0.5, 1.0, 2.0]
    fit = fit_gao(d, [x * (0.2 + 0.05 * math.log(x)) for x in d], "rl")  # β = −0.05: still rising
    assert fit["beta"] == pytest.approx(-0.05) and fit["d_peak"] is None and fit["gain_peak"] is None
    assert fit_gao([1.0], [0.1]) is None and fit_gao([0.0, 0.0], [0.0, 0.0]) is None


def _run(arm: str, seed: int, kls: list[float], gains: list[float], g0: float):
    from rlhf.compare.report import RunResult

    rows = []
    for i, (kl, gain) in enumerate(zip(kls, gains), start=1):
        rows.append({"progress/samples": 64 * i, "train/kl": kl})  # the step's row
        rows.append({"progress/samples": 64 * i, "eval/gold_score": g0 + gain})  # the evaluation at that step
    return RunResult(plan={"arm": arm, "seed": seed}, status="complete", error=None, rows=rows)


def test_the_report_fits_each_arm_on_every_seeds_evaluations_against_root_kl():
    from rlhf.compare.report import gao_findings, gao_fits

    g0, form = 0.4, lambda d: d * (0.3 - 0.1 * math.log(d))  # peak at d = e², beyond what the runs reach
    runs = [_run("ppo", 0, [0.25, 1.0, 4.0], [form(0.5), form(1.0), form(2.0)], g0),
            _run("ppo", 1, [-0.01, 2.25, 9.0], [0.0, form(1.5), form(3.0)], g0),  # a sampled KL below 0 is d = 0
            _run("flat", 0, [1.0, 4.0], [0.05, 0.05], g0)]
    fits = gao_fits(runs, ["ppo", "flat", "none"], "progress/samples", {"eval/gold_score": g0})
    assert set(fits) == {"ppo", "flat"}
    assert (fits["ppo"]["alpha"], fits["ppo"]["beta"], fits["ppo"]["points"]) == pytest.approx((0.3, 0.1, 5))
    assert fits["ppo"]["d_max"] == pytest.approx(3.0) and fits["ppo"]["d_peak"] == pytest.approx(math.e ** 2)
    lines = gao_findings(fits)
    assert lines[0].startswith("ppo: gold gain against d = √KL fits d(α − β·log d) (Gao et al. 2023) with α 0.300, "
                               "β 0.100") and "beyond the largest d reached (3.00)" in lines[0]
    assert gao_fits(runs, ["ppo"], "progress/samples", {}) == {}, "no base gold: no gain to fit"
