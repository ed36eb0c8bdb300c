"""Gold-scored evaluation of a policy on held-out prompts of the demo world's tasks (greedy decoding)."""

from __future__ import annotations

from collections import defaultdict

import torch

from rlhf.data import Record
from rlhf.tracking import progress


@torch.no_grad()
def evaluate_gold(policy, records: list[Record], *, max_new_tokens: int = 48, batch_size: int = 64) -> dict[str, float]:
    """Mean gold score per task (`eval/gold_score/<task>`), their mean (`eval/gold_score`), and response stats.

    Records need `prompt`, `task` (a demo-world task) and `meta`. Greedy decoding makes the number a property
    of the weights, not of a sampling seed.
    """
    from rlhf.world import TASKS, gold_scores

    records = [r for r in records if r.get("task") in TASKS]
    if not records:
        return {}
    scores: dict[str, list[float]] = defaultdict(list)
    lengths, ended = [], []
    batches = range(0, len(records), batch_size)
    for start in progress(batches, total=len(batches), desc="eval"):
        chunk = records[start:start + batch_size]
        rollout = policy.generate([r["prompt"] for r in chunk], max_new_tokens=max_new_tokens, greedy=True)
        tasks = [r["task"] for r in chunk]
        got = gold_scores(tasks, rollout.prompts, rollout.completions, [r.get("meta") or {} for r in chunk])
        for task, score in zip(tasks, got):
            scores[task].append(score)
        lengths.extend(rollout.lengths.tolist())
        ended.extend(rollout.ended.tolist())
    metrics = {f"eval/gold_score/{task}": sum(v) / len(v) for task, v in sorted(scores.items())}
    metrics["eval/gold_score"] = sum(metrics.values()) / len(metrics)
    metrics["eval/response_length"] = sum(lengths) / len(lengths)
    metrics["eval/truncated_frac"] = 1.0 - sum(ended) / len(ended)
    return metrics
