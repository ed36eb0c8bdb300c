"""Best-of-n as a baseline arm for the over-optimization plot: sample N responses per held-out prompt from the base
policy once, and for each n ≤ N take the one the training reward scores highest; its gold score against
d = √KL(best-of-n ‖ base), where the KL has the closed form log n − (n − 1)/n (Stiennon et al. 2020; Gao et al. 2023).

The gold of best-of-n is the exact expectation over all n-subsets of the N samples, not of the first n, so every
n uses all N samples (the unbiased estimator of Gao et al.): with the samples sorted by reward ascending, sample i
(1-based) is the best of a uniformly random n-subset with probability C(i − 1, n − 1) / C(N, n).
"""

from __future__ import annotations

import math
from typing import Sequence


def bon_kl(n: int) -> float:
    """KL(best-of-n ‖ base) in nats, per sequence: log n − (n − 1)/n (0 for n = 1)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def expected_best_of_n(reward: Sequence[float], gold: Sequence[float], n: int) -> float:
    """E[gold of the highest-reward sample among n drawn without replacement from these N] (ties in reward are
    broken by position, as a stable sort leaves them)."""
    total = len(reward)
    if len(gold) != total:
        raise ValueError("reward and gold need one value per sample")
    if not 1 <= n <= total:
        raise ValueError(f"n must be between 1 and the {total} samples, got {n}")
    order = sorted(range(total), key=lambda i: reward[i])
    subsets = math.comb(total, n)
    return sum(math.comb(rank, n - 1) / subsets * gold[i] for rank, i in enumerate(order))


def best_of_n_curve(reward: Sequence[Sequence[float]], gold: Sequence[Sequence[float]],
                    ns: Sequence[int]) -> list[dict[str, float]]:
    """Per n: {n, kl, d, gold, reward}, means over prompts of best-of-n (`reward[p][j]`, `gold[p][j]`: sample j of
    prompt p)."""
    if not reward or len(reward) != len(gold):
        raise ValueError("need the samples of at least one prompt, with rewards and gold scores alike")
    rows = []
    for n in ns:
        g = sum(expected_best_of_n(r, s, n) for r, s in zip(reward, gold)) / len(reward)
        r_best = sum(expected_best_of_n(r, r, n) for r in reward) / len(reward)
        kl = bon_kl(n)
        rows.append({"n": float(n), "kl": kl, "d": math.sqrt(kl), "gold": g, "reward": r_best})
    return rows
