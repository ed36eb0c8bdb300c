"""The Bradley-Terry loss, accuracy and calibration error against hand computations."""

import math

import pytest
import torch

from reward_models.losses import bradley_terry_loss, expected_calibration_error, pairwise_accuracy


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bt_loss_matches_hand_computation_with_margin_and_tie():
    chosen = torch.tensor([2.0, 0.5, 1.0])
    rejected = torch.tensor([1.0, 1.5, 0.2])
    margin = torch.tensor([0.5, 0.0, 3.0])  # the tie's margin must be ignored
    label = torch.tensor([1.0, 1.0, 0.5])
    # pair 0: −log σ(2 − 1 − 0.5);  pair 1: −log σ(0.5 − 1.5);  pair 2 (tie): −½ log σ(0.8) − ½ log σ(−0.8)
    expected = (-log_sigmoid(0.5) - log_sigmoid(-1.0) - 0.5 * log_sigmoid(0.8) - 0.5 * log_sigmoid(-0.8)) / 3
    loss, metrics = bradley_terry_loss(chosen, rejected, margin, label)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["loss/bt"].item() == pytest.approx(expected, rel=1e-6)
    assert metrics["train/accuracy"].item() == pytest.approx(0.5)  # the tie is not counted
    assert metrics["train/margin"].item() == pytest.approx((1.0 - 1.0 + 0.8) / 3)


def test_bt_loss_equals_trl_formula_without_ties():
    chosen, rejected, margin = torch.randn(8), torch.randn(8), torch.rand(8)
    loss, _ = bradley_terry_loss(chosen, rejected, margin)
    trl = -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean()  # RewardTrainer.compute_loss
    assert loss.item() == pytest.approx(trl.item(), rel=1e-6)


def test_tie_loss_is_symmetric_and_minimal_at_equal_scores():
    label = torch.tensor([0.5])
    a, b = torch.tensor([1.3]), torch.tensor([0.1])
    forward, _ = bradley_terry_loss(a, b, label=label)
    backward, _ = bradley_terry_loss(b, a, label=label)
    equal, _ = bradley_terry_loss(a, a, label=label)
    assert forward.item() == pytest.approx(backward.item())
    assert equal.item() == pytest.approx(math.log(2))
    assert forward.item() > equal.item()


def test_centering_term_is_coef_times_mean_square_of_sums():
    chosen, rejected = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    plain, _ = bradley_terry_loss(chosen, rejected)
    centered, metrics = bradley_terry_loss(chosen, rejected, center_coef=0.1)
    expected_center = 0.1 * ((4.0 ** 2) + (-1.5) ** 2) / 2
    assert metrics["loss/center"].item() == pytest.approx(expected_center)
    assert centered.item() == pytest.approx(plain.item() + expected_center)


def test_pairwise_accuracy_counts_exact_ties_half():
    diff = torch.tensor([1.0, -1.0, 0.0, 2.0])
    assert pairwise_accuracy(diff).item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_ece_by_hand():
    # σ(d) = 0.9 for d = ln 9: confidence 0.9. Three such pairs right, one wrong (d = −ln 9, conf 0.9, p < ½).
    d = math.log(9)
    diff = torch.tensor([d, d, d, -d])
    # one bin: accuracy 0.75, confidence 0.9 -> ECE 0.15
    assert expected_calibration_error(diff).item() == pytest.approx(0.15, abs=1e-6)
    # perfectly calibrated: confidence 0.75 (d = ln 3), right 3 of 4 times
    d = math.log(3)
    assert expected_calibration_error(torch.tensor([d, d, d, -d])).item() == pytest.approx(0.0, abs=1e-6)
