"""`rlhf compare` on image prompts: PPO (value head) and GRPO from a tiny vision-language policy on the vision
world's image-rendered addition, the same budget for both, the base evaluated and sample completions shown."""

import json

from .conftest import write_config
from rlhf.compare.runner import run_comparison
from rlhf.tracking import read_metrics


def test_ppo_and_grpo_compare_on_image_prompts(tmp_path, vlm_dir, vision_world):
    cfg = {
        "name": "vision", "output_dir": str(tmp_path / "out"), "base": str(vlm_dir), "seeds": [0],
        "budget": {"samples": 16}, "eval": {"every_samples": 16, "completions": 2},
        "shared": {
            "data.prompts": str(vision_world / "rl_prompts.jsonl"), "data.tasks": ["image_add"],
            "eval.prompts": str(vision_world / "eval_prompts.jsonl"), "eval.tasks": ["image_add"], "eval.limit": 4,
            "rewards": [{"name": "correct", "rule": "verifiable"}],
            "eval.rewards": [{"name": "gold", "rule": "verifiable"}],
            "sampling.max_new_tokens": 4, "eval.generation.max_new_tokens": 4, "eval.generation.samples": 0,
            "rl.prompts_per_step": 2, "sampling.n": 4, "rl.micro_batch_size": 8, "optim.lr": 1.0e-3,
            "train.save_every": 1, "train.log_every": 1,
        },
        "tracking": {"mode": "disabled"},
        "algorithms": {"grpo": {"kind": "grpo"}, "ppo": {"kind": "ppo", "overrides": {"critic.kind": "value_head"}}},
    }
    result = run_comparison(write_config(tmp_path / "vision.yaml", cfg))
    assert result["failed"] == [] and set(result["runs"].values()) == {"complete"}
    runs = json.loads((tmp_path / "out" / "runs.json").read_text())["runs"]
    assert {r["algorithm"] for r in runs} == {"grpo", "ppo"}
    for run in runs:
        assert read_metrics(run["dir"])[-1]["progress/samples"] == 16
    columns = json.loads((tmp_path / "out" / "completions.json").read_text())["columns"]
    assert [c["arm"] for c in columns] == ["base (SFT)", "grpo", "ppo"]
