"""Pure statistics over judgments: inter-annotator agreement, position bias, gold accuracy, Bradley-Terry leaderboard.

Nothing here touches the database or the web app; inputs are plain lists so every function can be checked by hand.
Labels are the canonical choices stored with a judgment: "a", "b", "tie", "both_bad".
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from itertools import permutations

import numpy as np

ELO_SCALE = 400.0 / math.log(10.0)  # log-strength -> Elo points, the convention of Chatbot Arena's BT leaderboard
ELO_BASE = 1000.0


def krippendorff_alpha_nominal(units: list[list]) -> float:
    """Krippendorff's alpha for nominal labels; `units[u]` holds the labels the raters gave unit u.

    Units with fewer than two labels are not pairable and are ignored (missing ratings are simply absent). Returns
    NaN when alpha is undefined: fewer than two pairable values or only one label value in use (no expected
    disagreement). Formula (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability", sec. C):
    coincidences o_ck = sum_u sum_{i != j} [v_ui = c][v_uj = k] / (m_u - 1);  n_c = sum_k o_ck;
    alpha = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c * n_k.
    """
    coincidences: Counter = Counter()
    for labels in units:
        m = len(labels)
        if m < 2:
            continue
        for i, j in permutations(range(m), 2):
            coincidences[(labels[i], labels[j])] += 1.0 / (m - 1)
    n_c: Counter = Counter()
    for (c, _k), weight in coincidences.items():
        n_c[c] += weight
    n = sum(n_c.values())
    observed = sum(w for (c, k), w in coincidences.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k)
    if n < 2 or expected == 0:
        return float("nan")
    return 1.0 - (n - 1) * observed / expected


def percent_agreement(units: list[list]) -> float:
    """Fraction of rater pairs within a unit that gave the same label (NaN when no unit has two labels)."""
    agree = total = 0
    for labels in units:
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                total += 1
                agree += labels[i] == labels[j]
    return agree / total if total else float("nan")


@dataclass(frozen=True)
class Rate:
    """A proportion with its count and a 95% Wilson score interval (NaN fields when n == 0)."""

    value: float
    n: int
    low: float
    high: float


def wilson_rate(successes: int, n: int, z: float = 1.96) -> Rate:
    """`successes / n` with the Wilson score interval (better than the normal approximation for small n)."""
    if n == 0:
        nan = float("nan")
        return Rate(nan, 0, nan, nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Rate(p, n, max(0.0, centre - half), min(1.0, centre + half))


def left_win_rate(judgments: list[tuple[str, str]]) -> Rate:
    """Position bias: among decisive judgments `(choice, left)` ("a"/"b" each), how often the left response won.

    0.5 means no position bias; ties and "both bad" carry no side and are excluded.
    """
    decisive = [(choice, left) for choice, left in judgments if choice in ("a", "b")]
    return wilson_rate(sum(choice == left for choice, left in decisive), len(decisive))


def gold_accuracy(pairs: list[tuple[str, float]]) -> Rate:
    """Accuracy on gold items: `(choice, gold_label)` with gold_label 1.0 = A better, 0.0 = B better, 0.5 = tie.

    "both_bad" on a gold item counts as a miss unless the gold answer is a tie.
    """
    expected = {1.0: "a", 0.0: "b", 0.5: "tie"}
    hits = sum(choice == expected[label] or (label == 0.5 and choice == "both_bad") for choice, label in pairs)
    return wilson_rate(hits, len(pairs))


# ---------------------------------------------------------------------------------------------------------------
# Bradley-Terry leaderboard


def bradley_terry(
    players: list[str], comparisons: list[tuple[str, str, float]], prior: float = 0.5, iters: int = 1000
) -> dict[str, float]:
    """Fit Bradley-Terry log-strengths by the MM algorithm (Hunter 2004, eq. 3), ties counted as half wins.

    `comparisons` holds `(first, second, outcome)` with outcome 1.0 = first won, 0.0 = second won, 0.5 = tie.
    `prior` adds that many virtual ties between every two players, which keeps strengths finite when one player
    never lost and connects players that never met (0 = plain maximum likelihood). Returns log-strengths that sum
    to zero; P(i beats j) = sigmoid(s_i - s_j).
    """
    index = {p: i for i, p in enumerate(players)}
    k = len(players)
    wins = np.zeros((k, k))  # wins[i, j] = (half-)wins of i over j
    for first, second, outcome in comparisons:
        i, j = index[first], index[second]
        wins[i, j] += outcome
        wins[j, i] += 1.0 - outcome
    wins += prior * 0.5 * (1 - np.eye(k))
    games = wins + wins.T
    total_wins = wins.sum(axis=1)
    strength = np.ones(k)
    for _ in range(iters):
        denom = (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        updated = np.where(denom > 0, total_wins / np.where(denom > 0, denom, 1.0), strength)
        updated = np.maximum(updated, 1e-300)
        updated /= np.exp(np.mean(np.log(updated)))  # geometric mean 1: BT is defined up to a common factor
        if np.max(np.abs(np.log(updated) - np.log(strength))) < 1e-10:
            strength = updated
            break
        strength = updated
    log_strength = np.log(strength)
    return {p: float(log_strength[index[p]]) for p in players}


@dataclass(frozen=True)
class LeaderboardRow:
    """One checkpoint on the leaderboard: Elo-scaled BT rating with a bootstrap percentile interval."""

    name: str
    rating: float
    low: float
    high: float
    comparisons: int
    win_rate: float  # ties as half wins, over this player's own comparisons


def leaderboard(
    comparisons: list[tuple[str, str, float]], bootstrap: int = 200, seed: int = 0, prior: float = 0.5
) -> list[LeaderboardRow]:
    """Bradley-Terry leaderboard with a 95% bootstrap interval (comparisons resampled with replacement).

    Ratings are Elo-scaled (`1000 + 400/ln 10 * log-strength`) and sorted best first. Comparisons of a player
    with itself carry no information and are dropped.
    """
    comparisons = [c for c in comparisons if c[0] != c[1]]
    players = sorted({c[0] for c in comparisons} | {c[1] for c in comparisons})
    if len(players) < 2:
        return []
    point = bradley_terry(players, comparisons, prior)
    rng = np.random.default_rng(seed)
    samples = np.empty((bootstrap, len(players)))
    for b in range(bootstrap):
        picks = rng.integers(0, len(comparisons), size=len(comparisons))
        fit = bradley_terry(players, [comparisons[i] for i in picks], prior)
        samples[b] = [fit[p] for p in players]
    rows = []
    for col, player in enumerate(players):
        mine = [(o if a == player else 1.0 - o) for a, b_, o in comparisons if player in (a, b_)]
        low, high = (np.percentile(samples[:, col], [2.5, 97.5]) if bootstrap else (point[player], point[player]))
        rows.append(
            LeaderboardRow(
                name=player,
                rating=ELO_BASE + ELO_SCALE * point[player],
                low=ELO_BASE + ELO_SCALE * float(low),
                high=ELO_BASE + ELO_SCALE * float(high),
                comparisons=len(mine),
                win_rate=float(np.mean(mine)),
            )
        )
    return sorted(rows, key=lambda r: r.rating, reverse=True)
