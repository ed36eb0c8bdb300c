"""GRPO stage: smoke runs of every estimator, LoRA, β = 0 never runs the reference, μ > 1 uses stored old log-probs,
eval through the scoring interface on a user's own prompts, resume after SIGKILL."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import SamplingSettings, load_config
from rlhf.pipeline import recipe, run_stage
from rlhf.policy import PolicyModel
from rlhf.rollout import make_experience
from rlhf.stage import read_manifest
from rlhf.tracking import read_metrics
from reward_models.scoring import RewardComponent, Scorer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """Eight addition prompts of the demo world (training) and four held-out ones."""
    d = tmp_path_factory.mktemp("grpo-data")
    rows = [json.loads(x) for x in (ROOT / "data/demo/rl_prompts.jsonl").read_text().splitlines()]
    adds = [r for r in rows if r["task"] == "add"][:8]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in adds))
    evals = [json.loads(x) for x in (ROOT / "data/demo/eval_prompts.jsonl").read_text().splitlines()][:4]
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return d


def _cfg(tmp_path, policy_dir, prompts_file, **overrides):
    # a length-based rule as well, so that rewards vary inside groups even for an untrained policy
    rewards = [{"name": "correct", "rule": "verifiable"},
               {"name": "short", "rule": "length_penalty", "params": {"max_words": 1}, "weight": 0.5}]
    base = {
        "output_dir": str(tmp_path / "out"), "model.path": str(policy_dir), "data.prompts": str(prompts_file / "train.jsonl"),
        "rewards": rewards, "sampling.n": 4, "sampling.max_new_tokens": 6, "rl.prompts_per_step": 2,
        "rl.micro_batch_size": 4, "train.max_steps": 2, "train.log_every": 1, "optim.lr": 1e-2,
        "reward.missing_eos_score": None,  # the untrained policy rarely stops within 6 tokens
        "eval.prompts": str(prompts_file / "eval.jsonl"),
        "eval.generation.max_new_tokens": 6, "samples_every": 1, "tracking.mode": "disabled",
    }
    return load_config(recipe("grpo").Config, None, {**base, **overrides})


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_every_estimator_trains_and_writes_a_policy(tmp_path, policy_dir, prompts_file, advantage):
    result = run_stage("grpo", _cfg(tmp_path, policy_dir, prompts_file, **{"loss.advantage": advantage}))
    out = tmp_path / "out"
    rows = read_metrics(out)
    train = [r for r in rows if "perf/update_seconds" in r]
    assert len(train) == 2 and all(math.isfinite(r["loss/total"]) for r in train)
    for key in ("train/reward", "train/reward_std", "train/frac_zero_std_groups", "train/clip_frac_low",
                "train/clip_frac_high", "train/approx_kl_old", "train/kl", "train/kl_coef", "train/entropy",
                "reward/correct", "reward/short", "perf/generate_seconds", "perf/score_seconds",
                "perf/reference_seconds", "perf/update_seconds", "progress/samples"):
        assert key in train[-1], key
    assert train[-1]["progress/samples"] == 2 * 2 * 4
    assert "eval/gold_score" in result["metrics"]
    assert read_manifest(out)["status"] == "complete"
    assert PolicyModel.from_pretrained(str(out)).generate(["<add> 1+2="], max_new_tokens=3, seed=0).completions
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and {"prompt", "completion", "reward", "advantage"} <= set(samples[0])


def test_a_smoke_run_changes_every_trainable_parameter(tmp_path, policy_dir, prompts_file):
    run_stage("grpo", _cfg(tmp_path, policy_dir, prompts_file, **{"kl.beta": 0.0}))
    before = load_file(str(policy_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not move: {unchanged}"


def test_lora_trains_adapters_and_uses_the_base_as_reference(tmp_path, policy_dir, prompts_file):
    cfg = _cfg(tmp_path, policy_dir, prompts_file, **{"model.lora": {"r": 4, "alpha": 8}, "rl.epochs": 2})
    result = run_stage("grpo", cfg)
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    rows = [r for r in read_metrics(tmp_path / "out") if "train/kl" in r]
    # the first rollout is sampled before any update: policy == reference, so KL is exactly 0 there
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(result["metrics"]["loss/policy"])


def test_beta_zero_never_runs_the_reference(tmp_path, policy_dir, prompts_file, monkeypatch):
    def forbidden(self):
        raise AssertionError("the reference must not run when beta = 0")

    monkeypatch.setattr(PolicyModel, "reference", forbidden)
    run_stage("grpo", _cfg(tmp_path, policy_dir, prompts_file, **{"kl.beta": 0.0, "rl.epochs": 2}))
    rows = [r for r in read_metrics(tmp_path / "out") if "perf/update_seconds" in r]
    assert "train/kl" not in rows[-1] and "loss/kl" not in rows[-1]


def test_on_policy_update_has_ratio_one_and_off_policy_uses_stored_old_logprobs(tmp_path, policy_dir, prompts_file):
    # μ = 1, one minibatch: no old log-probs are computed; the ratio is exactly 1 and nothing clips
    run_stage("grpo", _cfg(tmp_path / "a", policy_dir, prompts_file, **{"train.max_steps": 1}))
    row = [r for r in read_metrics(tmp_path / "a" / "out") if "train/ratio_mean" in r][0]
    assert row["train/ratio_mean"] == 1.0 and row["train/approx_kl_old"] == 0.0 and row["train/clip_frac"] == 0.0
    assert "perf/old_logprobs_seconds" not in row
    # μ = 2 at a large lr: the second pass sees a moved policy against the stored old log-probs, so ratios leave 1
    run_stage("grpo", _cfg(tmp_path / "b", policy_dir, prompts_file, **{"train.max_steps": 1, "rl.epochs": 2, "optim.lr": 0.05}))
    row = [r for r in read_metrics(tmp_path / "b" / "out") if "train/ratio_mean" in r][0]
    assert "perf/old_logprobs_seconds" in row and row["train/approx_kl_old"] > 0


def test_dynamic_sampling_gsp_o_truncation_mask_and_adaptive_kl_run(tmp_path, policy_dir, prompts_file):
    result = run_stage("grpo", _cfg(tmp_path, policy_dir, prompts_file, **{
        "loss.dynamic_sampling": True, "loss.ratio_level": "sequence", "loss.mask_truncated": True,
        "loss.eps_high": 0.28, "kl.target": 1.0, "kl.horizon": 100, "kl.importance_weighted": True, "rl.minibatches": 2}))
    rows = [r for r in read_metrics(tmp_path / "out") if "train/kl_coef" in r]
    assert rows[0]["train/kl_coef"] == pytest.approx(0.04)
    assert rows[-1]["train/kl_coef"] != pytest.approx(0.04), "the adaptive controller moved β"
    assert all(1 <= r["train/sampling_rounds"] <= 3 for r in rows)
    assert math.isfinite(result["metrics"]["loss/policy"])


def test_user_prompts_with_rule_rewards_log_eval_through_the_scorer(tmp_path, policy_dir):
    # prompts of the user's own, no demo-world task: the eval scores with the training rule instead of nothing
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"<add> {i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(6)))
    cfg = _cfg(tmp_path, policy_dir, data.parent, **{
        "data.prompts": str(data), "eval.prompts": str(data),
        "rewards": [{"name": "exact", "rule": "exact_match", "params": {"field": "answer"}},
                    {"name": "short", "rule": "length_penalty", "params": {"max_words": 1}}]})
    result = run_stage("grpo", cfg)
    assert "eval/gold_score" in result["metrics"] and "eval/gold_score/all" in result["metrics"]
    assert "eval/rm_score" not in result["metrics"]  # eval scored by the training rewards themselves
    # a separate gold scorer: the training reward of the same completions is logged next to it (over-optimization)
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path / "out2")})
    cfg.eval.rewards = [RewardComponent(name="exact", rule="exact_match", params={"field": "answer"})]
    metrics = run_stage("grpo", cfg)["metrics"]
    assert "eval/rm_score" in metrics and metrics["eval/rm_score"] <= metrics["eval/gold_score"]


def test_make_experience_shapes_and_phases(policy_dir, prompts_file):
    policy = PolicyModel.load(load_config(recipe("grpo").Config, None, {"model.path": str(policy_dir)}).model,
                              with_reference=True)
    records = [json.loads(x) for x in (prompts_file / "train.jsonl").read_text().splitlines()][:3]
    scorer = Scorer([RewardComponent(name="correct", rule="verifiable")])
    exp = make_experience(policy, scorer, records, SamplingSettings(n=2, max_new_tokens=5), seed=1, with_reference=True)
    b, t = exp.rollout.response_ids.shape
    assert b == 6 and exp.old_logprobs.shape == (b, t) and exp.ref_logprobs.shape == (b, t)
    assert torch.equal(exp.rollout.prompt_index, torch.tensor([0, 0, 1, 1, 2, 2]))
    # without adapters or training the policy is its reference
    assert torch.allclose(exp.old_logprobs, exp.ref_logprobs)
    assert set(exp.timings) == {"generate", "score", "old_logprobs", "reference"}
    part = exp.select([1, 4])
    assert part.rollout.prompts == [exp.rollout.prompts[1], exp.rollout.prompts[4]]
    assert torch.equal(part.old_logprobs, exp.old_logprobs[[1, 4]]) and part.scores.shape == (2,)


def _rlhf(*args):
    return subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigkill_mid_stage_resumes_to_the_same_final_metrics(tmp_path, kill_and_resume, policy_dir, prompts_file):
    args = ["grpo", f"model.path={policy_dir}", f"data.prompts={prompts_file / 'train.jsonl'}", "sampling.n=4",
            "sampling.max_new_tokens=6", "rl.prompts_per_step=2", "rl.epochs=2", "train.max_steps=8", "train.save_every=2",
            "train.log_every=1",
            "optim.lr=0.01", f"eval.prompts={prompts_file / 'eval.jsonl'}", "eval.generation.max_new_tokens=6",
            "tracking.mode=disabled", "kl.target=1.0", "kl.horizon=50"]
    ref = _rlhf(*args, f"output_dir={tmp_path / 'ref'}")
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    reference = read_manifest(tmp_path / "ref")["metrics"]

    out = tmp_path / "run"
    text = kill_and_resume(args, out)
    assert "resuming grpo from step-" in text
    assert read_manifest(out)["metrics"] == pytest.approx(reference, rel=1e-5, abs=1e-6)
    steps = [r["step"] for r in read_metrics(out) if "perf/update_seconds" in r]
    assert steps == list(range(1, 9))
