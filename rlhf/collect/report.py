"""Collection statistics from stored judgment rows: progress, per-annotator counts and gold accuracy, agreement,
position bias and the checkpoint leaderboard. Used by the admin page, `/api/stats`, the CLI and the stage."""

from __future__ import annotations

import math
from collections import defaultdict

from rlhf.collect import agreement

OUTCOME = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}  # Bradley-Terry outcome for source_a; both bad = no order


def comparisons(rows: list[dict]) -> list[tuple[str, str, float]]:
    """(source_a, source_b, outcome) for every judgment of a regular pair (gold items compare no checkpoints)."""
    return [(r["source_a"], r["source_b"], OUTCOME[r["choice"]]) for r in rows if r["gold_label"] is None]


def summarize(rows: list[dict], overlap: int, pair_counts: dict[str, int], bootstrap: int = 200, seed: int = 0) -> dict:
    """Everything the admin page shows, as plain JSON-ready values (NaN becomes None)."""
    regular = [r for r in rows if r["gold_label"] is None]
    by_pair: dict[int, list[str]] = defaultdict(list)
    for r in regular:
        by_pair[r["pair_id"]].append(r["choice"])
    units = list(by_pair.values())

    per_annotator: dict[str, dict] = {}
    for name in sorted({r["annotator"] for r in rows}):
        mine = [r for r in rows if r["annotator"] == name]
        gold = agreement.gold_accuracy([(r["choice"], r["gold_label"]) for r in mine if r["gold_label"] is not None])
        bias = agreement.left_win_rate([(r["choice"], r["left"]) for r in mine])
        per_annotator[name] = {
            "judgments": len(mine),
            "gold_items": gold.n,
            "gold_accuracy": _clean(gold.value),
            "left_win_rate": _clean(bias.value),
            "decisive_judgments": bias.n,  # what the left-win rate is a rate of
        }

    gold_all = agreement.gold_accuracy([(r["choice"], r["gold_label"]) for r in rows if r["gold_label"] is not None])
    bias_all = agreement.left_win_rate([(r["choice"], r["left"]) for r in rows])
    board = agreement.leaderboard(comparisons(rows), bootstrap=bootstrap, seed=seed)
    target = pair_counts["pairs"] * overlap
    return {
        "judgments": len(rows),
        "pairs": pair_counts["pairs"],
        "gold_pairs": pair_counts["gold_pairs"],
        "pairs_complete": sum(len(v) >= overlap for v in units),
        "target_judgments": target,
        "progress": _clean(pair_counts["regular_judgments"] / target) if target else None,
        "alpha": _clean(agreement.krippendorff_alpha_nominal(units)),
        "percent_agreement": _clean(agreement.percent_agreement(units)),
        "agreement_pairs": sum(len(v) >= 2 for v in units),  # the pairs agreement is measured on
        "left_win_rate": _clean(bias_all.value),
        "left_win_low": _clean(bias_all.low),
        "left_win_high": _clean(bias_all.high),
        "decisive_judgments": bias_all.n,
        "gold_accuracy": _clean(gold_all.value),
        "gold_judgments": gold_all.n,
        "annotators": per_annotator,
        "leaderboard": [row.__dict__ for row in board],
    }


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)
