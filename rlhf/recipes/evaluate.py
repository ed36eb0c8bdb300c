"""Gold-scored evaluation of one or more policies on held-out prompts, side by side.

Steps: 1 prompts and scorer → 2 for each model: load, greedy-decode (and sample n per prompt), score per task →
3 paired-bootstrap CIs of every model against the baseline → 4 table, results.json, bar plot.
"""

from __future__ import annotations

import json

from pydantic import Field

from rlhf.config import GenerationSettings, StageConfig
from rlhf.distributed import process_state
from rlhf.errors import UserError
from rlhf.data import load_prompts, prompt_text
from rlhf.evaluation import check_group_by, format_ci, paired_bootstrap, score_prompts, scorer_score_fn, summarize
from rlhf.policy import PolicyModel
from rlhf.stage import StageContext
from rlhf.vision import check_image_prompts
from rlhf.world import gold_score_fn, gold_task_records
from reward_models.scoring import RewardComponent, Scorer


class Config(StageConfig):
    """`rlhf eval`: compare policies on held-out prompts (gold scorers or your reward components), with CIs."""

    models: dict[str, str] = Field(default_factory=dict, description="label -> model directory (HF format)")
    prompts: str = Field("data/demo/eval_prompts.jsonl", description="held-out prompts with task and meta")
    limit: int | None = Field(None, ge=1, description="use at most this many prompts (null = all)")
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="greedy budget; samples > 0 adds sampled accuracy and pass@k")
    rewards: list[RewardComponent] | None = Field(
        None, description="score with these reward components (rules / reward models) instead of the demo world's gold scorers")
    baseline: str | None = Field(None, description="label every other model is compared with (null = the first model)")
    group_by: list[str] = Field(
        default_factory=list, description="also report per value of these dotted record fields within each task (e.g. meta.format)")


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    # 1. prompts and the scorer ------------------------------------------------------------------------------------
    if not cfg.models:
        raise UserError("config key 'models' names no model: give label -> model directory, e.g. models.sft=runs/demo/sft")
    prompts = load_prompts(cfg.prompts, cfg.limit)
    if cfg.rewards:
        score_fn = scorer_score_fn(Scorer(cfg.rewards))
    else:  # the demo world's gold judge, on the prompts of its own tasks
        prompts, score_fn = gold_task_records(prompts), gold_score_fn
    check_group_by(prompts, cfg.group_by, cfg.prompts)
    if cfg.baseline is not None and cfg.baseline not in cfg.models:
        raise UserError(f"config key 'baseline': '{cfg.baseline}' is not one of the models ({', '.join(cfg.models)})")

    # 2. each model with its own tokenizer (a base model sees action tokens as plain text: it never learned them)
    # under `accelerate launch` each process scores its share of the prompt batches (`process_state()` as accelerator)
    state = process_state()
    per_prompt, results = {}, {}
    for label, path in cfg.models.items():
        policy = PolicyModel.from_pretrained(path)
        check_image_prompts(prompts, policy.image_inputs, path, prompt_of=lambda r: prompt_text(r, policy.tokenizer))
        per_prompt[label] = score_prompts(policy, prompts, cfg.generation, score_fn, seed=cfg.seed, group_by=cfg.group_by,
                                          accelerator=state)
        results[label] = summarize(per_prompt[label])

    # 3. paired bootstrap over prompts: each model minus the baseline (greedy, and sampled when sampled) ---------------
    base = cfg.baseline or next(iter(cfg.models), None)
    comparisons = {}
    for label in cfg.models:
        if label == base or not per_prompt[label].greedy:
            continue
        a, b = per_prompt[base], per_prompt[label]
        comparisons[label] = {}
        # over all prompts, then within each task (the same prompts for both models, so the pairing holds)
        for task in [None, *sorted(set(a.tasks))] if len(set(a.tasks)) > 1 else [None]:
            rows = [i for i, t in enumerate(a.tasks) if task is None or t == task]
            suffix = f"/{task}" if task else ""
            pick = lambda values: [values[i] for i in rows]  # noqa: E731
            comparisons[label][f"greedy{suffix}"] = paired_bootstrap(pick(a.greedy), pick(b.greedy), seed=cfg.seed)
            if a.sampled and b.sampled:
                comparisons[label][f"sampled{suffix}"] = paired_bootstrap(pick(a.sampled_mean()), pick(b.sampled_mean()),
                                                                          seed=cfg.seed)
        for kind, ci in comparisons[label].items():
            results[label].update({f"eval/vs_{base}/{kind}_{k}": v for k, v in ci.items()})

    # 4. report -------------------------------------------------------------------------------------------------
    flat = {f"eval/{label}/{key.removeprefix('eval/')}": v for label, m in results.items() for key, v in m.items()}
    if not state.is_main_process:  # every process holds the gathered results; one writes them
        return flat
    (ctx.dir / "results.json").write_text(json.dumps(
        {"metrics": results, "baseline": base, "comparisons": comparisons,
         "per_prompt": {label: vars(s) for label, s in per_prompt.items()}}, indent=2))
    print(format_table(results))
    for label, cis in comparisons.items():
        print(f"{label} - {base}, mean difference with a 95% paired-bootstrap CI over prompts:")
        for kind, ci in cis.items():
            print(f"  {kind:<20} {format_ci(ci)}")
    plot_scores(results, ctx.dir / "gold_scores.png")
    ctx.tracker.log({**flat, "progress/samples": 0}, step=0)
    return flat



def format_table(results: dict[str, dict[str, float]]) -> str:
    """Rows = tasks, columns = models."""
    labels = list(results)
    keys = sorted({k for m in results.values() for k in m if k.startswith(("eval/gold_score", "eval/sampled/"))
                   and not k.endswith("/k")})
    rows = [["held-out gold score"] + labels]
    for key in keys:
        name = key.removeprefix("eval/").removeprefix("gold_score").lstrip("/") or "mean"
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
