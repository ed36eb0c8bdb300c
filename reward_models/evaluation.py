"""Held-out evaluation of a reward model on preference pairs: accuracy, margin, calibration, score histogram."""

from __future__ import annotations

from pathlib import Path

import torch

from reward_models.data import PreferencePair
from reward_models.losses import bradley_terry_loss, expected_calibration_error, pairwise_accuracy
from reward_models.model import RewardModel


@torch.no_grad()
def evaluate_pairs(rm: RewardModel, pairs: list[PreferencePair], batch_size: int = 64,
                   ece_bins: int = 10) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Score both sides of every pair. Returns (metrics, chosen scores (N,), rejected scores (N,)).

    metrics: `eval/accuracy` (strict pairs with r_c > r_r), `eval/margin` (mean r_c − r_r over strict pairs),
    `eval/ece` (calibration of σ(r_c − r_r), see `expected_calibration_error`), `eval/loss` (the Bradley-Terry loss
    with margins and ties, as in training), `eval/pairs`.
    """
    # score each distinct (prompt, image, response) once: K-wise comparisons share responses
    keys = [(p.prompt, p.image_key, p.chosen) for p in pairs] + [(p.prompt, p.image_key, p.rejected) for p in pairs]
    image_of = {}  # key -> the image (PIL) of the first pair with that key
    for key, p in zip(keys, pairs + pairs):
        image_of.setdefault(key, p.images[0] if p.images else None)
    distinct = list(image_of)
    row = {key: i for i, key in enumerate(distinct)}
    images = [image_of[k] for k in distinct] if rm.image_inputs is not None else None
    scores = rm.score([k[0] for k in distinct], [k[2] for k in distinct], batch_size, images=images)
    chosen = scores[[row[(p.prompt, p.image_key, p.chosen)] for p in pairs]]
    rejected = scores[[row[(p.prompt, p.image_key, p.rejected)] for p in pairs]]
    label = torch.tensor([p.label for p in pairs])
    margin = torch.tensor([p.margin for p in pairs])
    loss, _ = bradley_terry_loss(chosen, rejected, margin, label)
    strict = label == 1.0
    diff = chosen - rejected
    metrics = {
        "eval/accuracy": pairwise_accuracy(diff, label).item(),
        "eval/margin": diff[strict].mean().item() if strict.any() else float("nan"),
        "eval/ece": expected_calibration_error(diff[strict], ece_bins).item(),
        "eval/loss": loss.item(),
        "eval/pairs": float(len(pairs)),
    }
    return metrics, chosen, rejected


def plot_score_histogram(chosen: torch.Tensor, rejected: torch.Tensor, path: str | Path, bins: int = 40,
                         title: str = "reward model scores on held-out pairs") -> Path:
    """Overlaid histograms of chosen and rejected scores (a good reward model separates them). Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    lo, hi = min(chosen.min(), rejected.min()).item(), max(chosen.max(), rejected.max()).item()
    edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1).tolist()
    ax.hist(rejected.tolist(), bins=edges, alpha=0.6, label="rejected", color="tab:red")
    ax.hist(chosen.tolist(), bins=edges, alpha=0.6, label="chosen", color="tab:green")
    ax.set_xlabel("score r")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
