"""Image prompts through the policy stages: SFT builds and trains a vision-language policy, GRPO and PPO take a
step on image prompts with the one-step invariants (ratio 1 on the first minibatch, KL 0), eval scores it with the
gold judge, and a text-only prompt on an image policy (or the reverse) stops with one line."""

from __future__ import annotations

import json
import math

import pytest

from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.pipeline import recipe, run_stage
from rlhf.policy import PolicyModel
from rlhf.tracking import read_metrics


def _rows(out, key="perf/update_seconds"):
    return [r for r in read_metrics(out) if key in r]


def test_sft_builds_a_vision_language_policy_and_trains_it(tmp_path, policy_dir, vit_dir, vision_world):
    cfg = load_config(recipe("sft").Config, None, {
        "output_dir": str(tmp_path / "out"), "model.path": str(policy_dir), "model.vision_tower": str(vit_dir),
        "data.train": str(vision_world / "sft.jsonl"), "data.eval_fraction": 0.2, "data.gold_prompts":
        str(vision_world / "eval_prompts.jsonl"), "data.gold_limit": 4, "generation.max_new_tokens": 4,
        "train.max_steps": 6, "train.batch_size": 8, "train.log_every": 1, "optim.lr": 3e-3,
        "tracking.mode": "disabled"})
    result = run_stage("sft", cfg)
    rows = [r for r in read_metrics(tmp_path / "out") if "loss/total" in r and "train/lr" in r]
    assert rows[-1]["loss/total"] < rows[0]["loss/total"]
    assert math.isfinite(result["metrics"]["eval/loss"]) and "eval/gold_score" in result["metrics"]
    policy = PolicyModel.from_pretrained(str(tmp_path / "out"))
    assert policy.image_inputs is not None and type(policy.model).__name__ == "LlavaForConditionalGeneration"


def test_grpo_step_on_image_prompts_keeps_ratio_one_and_kl_zero(tmp_path, vlm_dir, vision_world):
    run_stage("grpo", load_config(recipe("grpo").Config, None, {
        "output_dir": str(tmp_path / "out"), "model.path": str(vlm_dir), "model.lora": {"r": 4, "alpha": 8},
        "data.prompts": str(vision_world / "rl_prompts.jsonl"), "data.tasks": ["image_add"],
        "rewards": [{"name": "gold", "rule": "verifiable"}], "sampling.n": 4, "sampling.max_new_tokens": 4,
        "rl.prompts_per_step": 2, "rl.micro_batch_size": 4, "rl.epochs": 2, "train.max_steps": 2, "train.log_every": 1,
        "optim.lr": 1e-2, "kl.beta": 0.04, "eval.prompts": str(vision_world / "eval_prompts.jsonl"),
        "eval.tasks": ["image_add"], "eval.limit": 4, "eval.generation.max_new_tokens": 4, "samples_every": 0,
        "tracking.mode": "disabled"}))
    rows = _rows(tmp_path / "out")
    assert rows[0]["train/first_minibatch_ratio_mean"] == 1.0 and rows[0]["train/first_minibatch_approx_kl_old"] == 0.0
    assert rows[0]["train/kl"] == 0.0 and all(math.isfinite(r["loss/total"]) for r in rows)
    assert PolicyModel.from_pretrained(str(tmp_path / "out")).image_inputs is not None


def test_ppo_step_on_image_prompts_with_a_value_head(tmp_path, vlm_dir, vision_world):
    run_stage("ppo", load_config(recipe("ppo").Config, None, {
        "output_dir": str(tmp_path / "out"), "model.path": str(vlm_dir), "critic.kind": "value_head",
        "data.prompts": str(vision_world / "rl_prompts.jsonl"), "data.tasks": ["image_review"],
        "rewards": [{"name": "gold", "rule": "verifiable"}], "sampling.n": 2, "sampling.max_new_tokens": 6,
        "rl.prompts_per_step": 2, "rl.epochs": 2, "rl.minibatches": 2, "rl.micro_batch_size": 2, "train.max_steps": 2,
        "train.log_every": 1, "optim.lr": 1e-3, "kl.beta": 0.1, "kl.target": None, "eval.prompts": None,
        "samples_every": 0, "tracking.mode": "disabled"}))
    rows = _rows(tmp_path / "out")
    assert rows[0]["train/first_minibatch_ratio_mean"] == 1.0 and rows[0]["train/kl"] == 0.0
    assert all(math.isfinite(r["loss/value"]) and math.isfinite(r["value/explained_var"]) for r in rows)


def test_eval_scores_a_vision_policy_with_the_gold_judge(tmp_path, vlm_dir, vision_world):
    run_stage("eval", load_config(recipe("eval").Config, None, {
        "output_dir": str(tmp_path / "out"), "models": {"vlm": str(vlm_dir)},
        "prompts": str(vision_world / "eval_prompts.jsonl"), "limit": 6, "generation.max_new_tokens": 4,
        "generation.samples": 2, "tracking.mode": "disabled"}))
    scores = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]["vlm"]
    assert {"eval/gold_score/image_add", "eval/gold_score/image_review"} <= scores.keys()


def test_text_prompts_on_a_vision_policy_and_images_on_a_text_one(tmp_path, vlm_dir, policy_dir, vision_world):
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"prompt": "<add> 3+4=", "task": "add", "meta": {"answer": 7}}) + "\n")
    base = {"rewards": [{"name": "gold", "rule": "verifiable"}], "sampling.n": 2, "rl.prompts_per_step": 1,
            "rl.micro_batch_size": 2, "train.max_steps": 1, "eval.prompts": None, "tracking.mode": "disabled"}
    with pytest.raises(UserError, match=r"text\.jsonl:1: field 'images' is missing: the model .* is a vision-language"):
        run_stage("grpo", load_config(recipe("grpo").Config, None, {
            **base, "output_dir": str(tmp_path / "a"), "model.path": str(vlm_dir), "data.prompts": str(text)}))
    with pytest.raises(UserError, match=r"rl_prompts\.jsonl:1: field 'images': the model .* is text-only"):
        run_stage("grpo", load_config(recipe("grpo").Config, None, {
            **base, "output_dir": str(tmp_path / "b"), "model.path": str(policy_dir),
            "data.prompts": str(vision_world / "rl_prompts.jsonl")}))
