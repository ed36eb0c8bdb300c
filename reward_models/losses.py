"""Pure reward-model losses and calibration metrics. Only torch is imported (the lead may move these into
`rlhf/losses.py`).

Bradley-Terry (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, eq. 1): the probability that the chosen
response wins is σ(r_c − r_r), and the loss is its negative log-likelihood. Written as a binary cross-entropy with a
soft target y, one formula covers strict preferences (y = 1) and ties (y = 0.5):

    z    = r_c − r_r − m            (m = per-pair margin, Llama 2 §3.2.2; 0 for ties)
    loss = −y·log σ(z) − (1 − y)·log σ(−z)

For y = 1 this is exactly TRL's `−logsigmoid(r_c − r_r − margin)`; for a tie it is symmetric in the two responses
and minimal at r_c = r_r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean Bradley-Terry loss over pairs, plus the reward-centering regularizer.

    Args:
        chosen_scores, rejected_scores: r_c, r_r. Shape: (B,).
        margin: required score gap m per pair (ignored where label is 0.5). Shape: (B,); None = 0.
        label: P(chosen wins) per pair: 1.0 = strict preference, 0.5 = tie. Shape: (B,); None = all 1.0.
        center_coef: weight of coef · mean((r_c + r_r)²), which pins the mean score near 0 (Eisenstein et al.
            2023, "Helping or Herding?"; TRL `center_rewards_coefficient`).

    Returns:
        (loss, metrics) with metrics `loss/bt`, `loss/center`, `train/accuracy` (over non-tie pairs; an exact score
        tie counts one half) and `train/margin` (mean r_c − r_r), all detached.
    """
    diff = chosen_scores.float() - rejected_scores.float()
    target = torch.ones_like(diff) if label is None else label.to(diff.dtype)
    shift = torch.zeros_like(diff) if margin is None else margin.to(diff.dtype) * (target == 1.0)
    bt = F.binary_cross_entropy_with_logits(diff - shift, target)
    center = center_coef * ((chosen_scores.float() + rejected_scores.float()) ** 2).mean()
    metrics = {
        "loss/bt": bt.detach(),
        "loss/center": center.detach(),
        "train/accuracy": pairwise_accuracy(diff.detach(), target),
        "train/margin": diff.detach().mean(),
    }
    return bt + center, metrics


def pairwise_accuracy(diff: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of strict pairs ranked right: 1 where r_c − r_r > 0, ½ where it is exactly 0. Ties are skipped.

    Shape: diff, label (B,) -> scalar (NaN when every pair is a tie).
    """
    strict = torch.ones_like(diff, dtype=torch.bool) if label is None else label != 0.5
    credit = (diff > 0).float() + 0.5 * (diff == 0).float()
    return credit[strict].mean() if strict.any() else torch.tensor(float("nan"))


def expected_calibration_error(diff: torch.Tensor, n_bins: int = 10) -> torch.Tensor:
    """ECE of the model's pairwise probability p = σ(r_c − r_r) on strict pairs (Guo et al. 2017).

    Each pair is a binary prediction with confidence max(p, 1 − p) that is correct when p > ½ (the chosen response
    won). Pairs are binned by confidence into `n_bins` equal-width bins on [½, 1]; ECE = Σ_b (n_b / n)·|acc_b −
    conf_b|. A model whose "80% sure" pairs are right 80% of the time scores 0. Shape: diff (B,) -> scalar.
    """
    p = torch.sigmoid(diff.float())
    confidence = torch.maximum(p, 1 - p)
    correct = (p > 0.5).float() + 0.5 * (p == 0.5).float()
    # bin index over [0.5, 1]; confidence 1.0 falls in the last bin
    bins = ((confidence - 0.5) * 2 * n_bins).long().clamp(max=n_bins - 1)
    ece = torch.zeros((), dtype=torch.float32)
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return ece
