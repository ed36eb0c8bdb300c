"""The equal-label-budget experiment of `rlhf loop`: the same judgments spent in rounds on the current policy
(configs/loop/demo.yaml: 4 × 240) or up front on the SFT policy (configs/loop/upfront.yaml: 1 × 960), with equal
RL steps and reward-model steps, over several seeds. Prints final and peak gold, the final reward model's accuracy
on the final policy's own samples, and the KL reached, each with a 95% t interval, and the rounds − up-front
differences with Welch intervals; writes <out>/summary.json and <out>/label_budget.png (gold against RL steps).

    python scripts/label_budget.py --seeds 0 1 2 3 4 [--out runs/label-budget]

Each run is an `rlhf loop` stage in <out>/<arm>/seed-<s> (rerunning skips complete runs); W&B group: label-budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ARMS = {"rounds": "configs/loop/demo.yaml", "upfront": "configs/loop/upfront.yaml"}
MEASURES = {
    "final_gold": "final gold score",
    "peak_gold": "peak gold score",
    "final_rm_policy_accuracy": "final RM accuracy on the final policy's samples",
    "final_kl": "KL to the SFT policy at the end",
}


def run_arm(arm: str, config: str, seed: int, out: Path) -> dict:
    from rlhf.config import load_config
    from rlhf.pipeline import run_stage
    from rlhf.recipes import loop

    cfg = load_config(loop.Config, config, {"seed": seed, "output_dir": str(out / arm / f"seed-{seed}"),
                                            "tracking.group": "label-budget"})
    run_stage("loop", cfg, name=f"{arm}-seed-{seed}", rerun=True)  # a changed arm config replaces its runs
    rows = json.loads((Path(cfg.output_dir) / "rounds.json").read_text())
    curve = [point for row in rows for point in row["gold_curve"]]
    return {
        "final_gold": curve[-1][1], "peak_gold": max(p[1] for p in curve), "final_kl": curve[-1][2],
        "final_rm_policy_accuracy": rows[-1].get("final_rm_policy_accuracy"), "curve": curve,
    }


def base_gold(config: str) -> float:
    """The starting policy's held-out gold score, evaluated as every RL stage of the loop evaluates."""
    from reward_models.scoring import Scorer
    from rlhf.config import ModelSettings, load_config
    from rlhf.data import load_rl_prompts
    from rlhf.evaluation import evaluate_gold, scorer_score_fn
    from rlhf.pipeline import recipe
    from rlhf.policy import PolicyModel
    from rlhf.recipes import loop

    cfg = load_config(loop.Config, config)
    rl = load_config(recipe(cfg.rl.kind).Config, cfg.rl.config, {**cfg.rl.overrides, "model.path": cfg.policy})
    policy = PolicyModel.load(ModelSettings(path=cfg.policy))
    records = load_rl_prompts(rl.eval.prompts, rl.eval.tasks, rl.eval.limit, policy.tokenizer)
    scorer = Scorer(rl.eval.rewards)
    return evaluate_gold(policy, records, rl.eval.generation, scorer_score_fn(scorer), seed=cfg.seed)["eval/gold_score"]


def summarize(results: dict[str, dict[int, dict]]) -> dict:
    from rlhf.compare.report import mean_ci, welch

    summary = {"arms": {}, "difference_rounds_minus_upfront": {}}
    for arm, by_seed in results.items():
        summary["arms"][arm] = {m: mean_ci([r[m] for r in by_seed.values()]) for m in MEASURES}
    for m in MEASURES:
        a = [r[m] for r in results["rounds"].values() if r[m] is not None]
        b = [r[m] for r in results["upfront"].values() if r[m] is not None]
        summary["difference_rounds_minus_upfront"][m] = welch(a, b)
    return summary


def plot(results: dict[str, dict[int, dict]], path: Path, base: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from rlhf.compare.report import t975

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for arm, by_seed in results.items():
        steps = [p[0] for p in next(iter(by_seed.values()))["curve"]]
        golds = np.array([[p[1] for p in r["curve"]] for r in by_seed.values()])
        mean = golds.mean(0)
        half = t975(len(golds)) * golds.std(0, ddof=1) / np.sqrt(len(golds)) if len(golds) > 1 else 0 * mean
        ax.plot(steps, mean, marker="o", label=f"{arm} ({ARMS[arm]})")
        ax.fill_between(steps, mean - half, mean + half, alpha=0.2)
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"the SFT policy ({base:.3f})")
    ax.set_xlabel("GRPO steps (rounds: a new round of judgments every 6)")
    ax.set_ylabel("held-out gold score")
    ax.set_title(f"Equal label budget: rounds vs up front ({len(by_seed)} seeds, 95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="runs/label-budget")
    args = parser.parse_args()
    out = Path(args.out)
    results = {arm: {seed: run_arm(arm, config, seed, out) for seed in args.seeds} for arm, config in ARMS.items()}
    summary = summarize(results)
    base = base_gold(ARMS["rounds"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"seeds": args.seeds, "base_gold": base, **summary, "runs": results},
                                                 indent=2))
    plot(results, out / "label_budget.png", base)
    print(f"the SFT policy's held-out gold score: {base:.3f}")
    print(f"{'measure':<50} {'rounds':>22} {'up front':>22} {'rounds - up front (Welch 95% CI)':>36}")
    for m, label in MEASURES.items():
        cells = [summary["arms"][arm][m] for arm in ARMS]
        d = summary["difference_rounds_minus_upfront"][m]
        text = [f"{c['mean']:.3f} ± {c['half']:.3f}" if c["half"] is not None else "n/a" for c in cells]
        diff = f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d else "n/a"
        print(f"{label:<50} {text[0]:>22} {text[1]:>22} {diff:>36}")
    print(f"wrote {out / 'summary.json'} and {out / 'label_budget.png'}")


if __name__ == "__main__":
    main()
