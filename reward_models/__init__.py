"""Reward models and rewards: what PPO, GRPO, the comparison and evaluation all score with.

- `model.RewardModel` — r = h·W (+ b) on a decoder (last token) or an encoder ([CLS]); HF
  `AutoModelForSequenceClassification` files with `num_labels=1`, score statistics in `config.json`.
- `train` — the `reward` stage (Bradley-Terry with margins, ties, centering, auxiliary LM loss, LoRA).
- `data` — TRL-format preference pairs: loading, validation, tokenization, collation.
- `losses` — the pure Bradley-Terry loss, pairwise accuracy, expected calibration error.
- `rules` — rule-based rewards (verifiable, exact match, format, length / repetition / missing-EOS penalties, or
  your own `package.module:function`).
- `scoring.Scorer` — the one scoring interface: a weighted sum of reward models and rules.
- `pairs` — demo-world pairs sampled from the SFT policy and labelled by simulated annotators.
"""

from reward_models.model import RewardModel
from reward_models.scoring import RewardComponent, Scorer, Scores

__all__ = ["RewardModel", "RewardComponent", "Scorer", "Scores"]
