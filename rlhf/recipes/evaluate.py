"""Gold-scored evaluation of one or more policies on held-out prompts, side by side.

Steps: 1 prompts → 2 for each model: load, greedy-decode, gold-score per task → 3 table, results.json, bar plot.
"""

from __future__ import annotations

import json

from pydantic import Field

from rlhf.config import StageConfig
from rlhf.data import load_prompts
from rlhf.evaluation import evaluate_gold
from rlhf.policy import PolicyModel
from rlhf.recipes.sft import GenerationSettings
from rlhf.stage import StageContext


class Config(StageConfig):
    """`rlhf eval`: compare policies on the demo world's gold scorers."""

    models: dict[str, str] = Field(default_factory=dict, description="label -> model directory (HF format)")
    prompts: str = Field("data/demo/eval_prompts.jsonl", description="held-out prompts with task and meta")
    limit: int | None = Field(None, description="use at most this many prompts (null = all)")
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="greedy decoding budget")


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    # 1. prompts ------------------------------------------------------------------------------------------------
    prompts = load_prompts(cfg.prompts, cfg.limit)

    # 2. each model with its own tokenizer (a base model sees action tokens as plain text: it never learned them)
    results: dict[str, dict[str, float]] = {}
    for label, path in cfg.models.items():
        policy = PolicyModel.from_pretrained(path)
        results[label] = evaluate_gold(policy, prompts, **cfg.generation.model_dump())

    # 3. report -------------------------------------------------------------------------------------------------
    (ctx.dir / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    plot_scores(results, ctx.dir / "gold_scores.png")
    flat = {f"eval/{label}/{key.removeprefix('eval/')}": v for label, m in results.items() for key, v in m.items()}
    ctx.tracker.log({**flat, "progress/samples": 0}, step=0)
    return flat


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Rows = tasks, columns = models."""
    labels = list(results)
    keys = sorted({k for m in results.values() for k in m if k.startswith("eval/gold_score")})
    rows = [["held-out gold score"] + labels]
    for key in keys:
        name = key.removeprefix("eval/gold_score").lstrip("/") or "mean"
        rows.append([name] + [f"{results[label].get(key, float('nan')):.3f}" for label in labels])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def plot_scores(results: dict[str, dict[str, float]], path) -> None:
    """Grouped bars: one group per task, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({k.removeprefix("eval/gold_score/") for m in results.values() for k in m if k.startswith("eval/gold_score/")})
    if not tasks:
        return
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.2))
    width = 0.8 / max(1, len(results))
    for i, (label, metrics) in enumerate(results.items()):
        xs = [t + i * width for t in range(len(tasks))]
        ax.bar(xs, [metrics.get(f"eval/gold_score/{t}", 0.0) for t in tasks], width, label=label)
    ax.set_xticks([t + width * (len(results) - 1) / 2 for t in range(len(tasks))], tasks)
    ax.set_ylabel("held-out gold score")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
