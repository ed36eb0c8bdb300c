"""Evaluation: per-task summaries (greedy, sampled mean, pass@k), paired-bootstrap CIs, the eval stage with a
scoring-interface scorer and a baseline comparison."""

import json

import pytest

from rlhf.config import GenerationSettings, load_config
from rlhf.evaluation import PromptScores, paired_bootstrap, score_prompts, summarize
from rlhf.pipeline import recipe, run_stage
from rlhf.policy import PolicyModel


def test_summarize_per_task_sampled_mean_and_pass_at_k():
    scores = PromptScores(tasks=["add", "add", "review"], greedy=[1.0, 0.0, 0.5],
                          sampled=[[1.0, 0.0], [0.0, 0.0], [0.2, 0.6]], lengths=[3, 5, 4], ended=[True, True, False])
    m = summarize(scores)
    # greedy: add = (1 + 0) / 2 = 0.5, review = 0.5, mean over tasks 0.5
    assert m["eval/gold_score/add"] == 0.5 and m["eval/gold_score/review"] == 0.5 and m["eval/gold_score"] == 0.5
    # sampled mean: add = (0.5 + 0) / 2 = 0.25; review = 0.4
    assert m["eval/sampled/gold_score/add"] == pytest.approx(0.25)
    assert m["eval/sampled/gold_score/review"] == pytest.approx(0.4)
    # pass@2 = best of the 2 samples: add = (1 + 0) / 2 = 0.5; review = 0.6
    assert m["eval/sampled/pass@k/add"] == 0.5 and m["eval/sampled/pass@k/review"] == pytest.approx(0.6)
    assert m["eval/sampled/k"] == 2 and m["eval/response_length"] == 4 and m["eval/truncated_frac"] == pytest.approx(1 / 3)


def test_paired_bootstrap_is_centred_on_the_mean_difference_and_excludes_zero_only_when_it_should():
    a = [0.0] * 50 + [1.0] * 50
    better = [1.0] * 80 + [0.0] * 20  # b − a: +1 on prompts 0-49, 0 on 50-79, −1 on 80-99: mean +0.30
    ci = paired_bootstrap(a, better, n_boot=2000, seed=0)
    assert ci["diff"] == pytest.approx(0.30)
    assert 0 < ci["lo"] < 0.30 < ci["hi"]
    same = paired_bootstrap(a, a)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0}  # identical models: no spread at all
    noisy = paired_bootstrap([0.0, 1.0] * 20, [1.0, 0.0] * 20, seed=1)  # swapped answers, mean difference 0
    assert noisy["lo"] < 0 < noisy["hi"]
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_score_prompts_with_a_custom_score_fn_and_samples(nano_model_dir):
    policy = PolicyModel.from_pretrained(str(nano_model_dir))
    records = [{"prompt": "a b", "answer": "x"}, {"prompt": "c", "answer": "y"}]
    seen = []

    def score_fn(prompts, completions, rows, ended):
        seen.append(len(completions))
        return [float(len(c) > 0) for c in completions]

    out = score_prompts(policy, records, GenerationSettings(max_new_tokens=4, samples=3), score_fn, seed=0)
    assert out.tasks == ["all", "all"] and len(out.greedy) == 2 and [len(s) for s in out.sampled] == [3, 3]
    assert seen == [2, 6]
    again = score_prompts(policy, records, GenerationSettings(max_new_tokens=4, samples=3), score_fn, seed=0)
    assert again.sampled == out.sampled  # seeded


def test_eval_stage_compares_models_against_a_baseline_with_rule_rewards(tmp_path, nano_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i}", "task": "t"}) + "\n" for i in range(5)))
    cfg = load_config(recipe("eval").Config, None, {
        "output_dir": str(tmp_path / "out"), "models": {"a": str(nano_model_dir), "b": str(nano_model_dir)},
        "prompts": str(prompts), "generation": {"max_new_tokens": 4, "samples": 2},
        "rewards": [{"name": "short", "rule": "length_penalty", "params": {"max_words": 1}}], "baseline": "a",
        "tracking.mode": "disabled"})
    metrics = run_stage("eval", cfg)["metrics"]
    assert "eval/a/gold_score/t" in metrics and "eval/b/sampled/gold_score" in metrics
    # the same weights, the same seed: b − a is exactly 0 with a zero-width interval
    assert metrics["eval/b/vs_a/greedy_diff"] == 0.0 and metrics["eval/b/vs_a/sampled_hi"] == 0.0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["baseline"] == "a" and set(results["per_prompt"]) == {"a", "b"}
