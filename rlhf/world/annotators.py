"""Simulated human annotators: noisy pairwise preferences derived from the hidden gold score.

They stand in for the people of the preference-collection app, so the whole RLHF path (preferences → reward
model → RL) runs offline, and the learned reward can be checked against the gold score it only saw through noise.
"""

from __future__ import annotations

import math
import random

from rlhf.world.tasks import gold_score


class SimulatedAnnotator:
    """A Bradley-Terry annotator over gold scores.

    ``judge`` returns 1.0 (A preferred), 0.0 (B preferred) or 0.5 (tie). With probability ``tie_rate`` it declares a
    tie; otherwise it prefers A with probability ``sigmoid((gold_a - gold_b) / temperature)`` — the Bradley-Terry
    model the reward model is fit with (Ouyang et al. 2022, eq. 1), so a reward model can recover the gold score
    up to scale. ``temperature == 0`` makes it a perfect judge (a gold tie is then a 0.5).

    Deterministic given ``seed`` and the sequence of calls: every call consumes exactly two random draws, whatever
    the outcome, so one call's result never shifts the randomness of the next.
    """

    def __init__(self, temperature: float = 0.5, tie_rate: float = 0.0, seed: int = 0):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 <= tie_rate <= 1.0:
            raise ValueError(f"tie_rate must be in [0, 1], got {tie_rate}")
        self.temperature = temperature
        self.tie_rate = tie_rate
        self._rng = random.Random(seed)

    def prob_a(self, gold_a: float, gold_b: float) -> float:
        """P(A preferred | not a declared tie)."""
        diff = gold_a - gold_b
        if self.temperature == 0:
            return 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5
        z = diff / self.temperature
        # Numerically stable logistic.
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))

    def judge(self, task: str, prompt: str, completion_a: str, completion_b: str, meta: dict | None) -> float:
        """Compare two completions of one prompt: 1.0 = A preferred, 0.0 = B preferred, 0.5 = tie."""
        tie_draw, pref_draw = self._rng.random(), self._rng.random()
        if tie_draw < self.tie_rate:
            return 0.5
        p = self.prob_a(gold_score(task, prompt, completion_a, meta), gold_score(task, prompt, completion_b, meta))
        if self.temperature == 0 and p == 0.5:
            return 0.5
        return 1.0 if pref_draw < p else 0.0
