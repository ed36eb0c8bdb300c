"""DPO on image pairs with a tiny vision-language policy: both rows of a pair read the pair's image (and so does the
reference, live or precomputed); one step from the reference start has loss log 2 and zero implicit rewards, a few
steps lower the loss, swapping the images changes the log-probs; image pairs on a text policy (or the reverse) stop
with one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.config import ModelSettings, load_config
from rlhf.errors import UserError
from rlhf.pipeline import recipe, run_stage
from rlhf.policy import PolicyModel
from rlhf.recipes.dpo import pair_rollout, sequence_logps, tokenize_pairs
from rlhf.tracking import read_metrics
from reward_models.data import load_preferences

LOG2 = math.log(2.0)
GOOD = [" the tent is great .", " i love it .", " it works well ."]
BAD = [" bad .", " it broke .", " the tent is poor ."]


@pytest.fixture(scope="module")
def image_pairs(tmp_path_factory, vision_world):
    """Pairs about 8 images of the vision world (absolute paths), 3 a prompt, in TRL's vision preference format."""
    root = tmp_path_factory.mktemp("dpo-images")
    rows = []
    for line in (vision_world / "rl_prompts.jsonl").read_text().splitlines()[:8]:
        record = json.loads(line)
        image = str(vision_world / record["images"][0])
        for j in range(3):
            rows.append({"prompt": record["prompt"], "chosen": GOOD[j], "rejected": BAD[(j + len(rows)) % 3],
                         "images": [image], "task": record["task"], "meta": record["meta"]})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


def _cfg(tmp_path, model_dir, pairs, vision_world, **overrides):
    base = {"output_dir": str(tmp_path / "out"), "model.path": str(model_dir), "data.train": str(pairs),
            "data.eval_fraction": 0.25, "train.max_steps": 4, "train.batch_size": 6, "train.log_every": 1,
            "optim.lr": 3e-3, "loss.beta": 0.5, "eval.gold_prompts": str(vision_world / "eval_prompts.jsonl"),
            "eval.gold_limit": 4, "eval.generation.max_new_tokens": 4, "tracking.mode": "disabled"}
    return load_config(recipe("dpo").Config, None, {**base, **overrides})


def _rows(out):
    return [r for r in read_metrics(out) if "perf/reference_seconds" in r]


def test_dpo_on_image_pairs_starts_at_log_2_and_learns(tmp_path, vlm_dir, image_pairs, vision_world):
    result = run_stage("dpo", _cfg(tmp_path, vlm_dir, image_pairs, vision_world))
    rows = _rows(tmp_path / "out")
    assert len(rows) == 4
    assert rows[0]["loss/dpo"] == pytest.approx(LOG2, abs=1e-6)  # the policy is its reference at step 0
    assert rows[0]["train/reward_chosen"] == 0.0 and rows[0]["train/margin"] == 0.0
    losses = [r["loss/dpo"] for r in rows]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * LOG2  # 0.69 -> 0.46 -> 0.32 -> 0.27
    assert rows[-1]["train/margin"] > 0.0
    metrics = result["metrics"]
    assert {"eval/accuracy", "eval/loss", "eval/gold_score"} <= set(metrics)
    assert PolicyModel.from_pretrained(str(tmp_path / "out")).image_inputs is not None


def test_precomputed_reference_on_images_trains_exactly_as_the_live_one(tmp_path, vlm_dir, image_pairs, vision_world):
    args = {"train.max_steps": 2, "eval.gold_prompts": None}
    live = run_stage("dpo", _cfg(tmp_path / "live", vlm_dir, image_pairs, vision_world, **args))["metrics"]
    pre = run_stage("dpo", _cfg(tmp_path / "pre", vlm_dir, image_pairs, vision_world, precompute_ref=True,
                                **args))["metrics"]
    shared = {k for k in live if k.startswith(("loss/", "train/", "eval/accuracy", "eval/margin", "eval/loss"))}
    assert {k: pre[k] for k in shared} == pytest.approx({k: live[k] for k in shared}, rel=1e-4, abs=1e-6)


def test_lora_dpo_on_image_pairs_starts_from_its_reference(tmp_path, vlm_dir, image_pairs, vision_world):
    run_stage("dpo", _cfg(tmp_path, vlm_dir, image_pairs, vision_world, **{
        "model.lora": {"r": 4, "alpha": 8}, "train.max_steps": 2, "eval.gold_prompts": None}))
    rows = _rows(tmp_path / "out")
    assert rows[0]["loss/dpo"] == pytest.approx(LOG2, abs=1e-6) and rows[0]["train/margin"] == 0.0
    assert rows[-1]["train/margin"] != 0.0


def test_both_rows_of_a_pair_share_its_image_and_the_image_matters(vlm_dir, image_pairs):
    policy = PolicyModel.load(ModelSettings(path=str(vlm_dir)), device="cpu")
    pairs = load_preferences(str(image_pairs), policy.tokenizer)[::3][:4]  # four pairs, four different images
    tokens, counts = tokenize_pairs(pairs, policy.tokenizer, 64, policy.image_inputs)
    n_image = policy.image_inputs.tokens_per_image
    image_id = policy.tokenizer.convert_tokens_to_ids(policy.image_inputs.token)
    assert counts["data/responses_cut"] == 0 and all(t.prompt.count(image_id) == n_image for t in tokens)
    rollout = pair_rollout(tokens, policy.tokenizer.pad_token_id, policy.image_inputs)
    b = len(tokens)
    assert rollout.pixel_values.shape[0] == 2 * b
    assert torch.equal(rollout.pixel_values[:b], rollout.pixel_values[b:])  # chosen row i and rejected row i
    with torch.no_grad():
        logps, _ = sequence_logps(policy, rollout)
        rollout.pixel_values = rollout.pixel_values.roll(1, dims=0)  # each row gets another pair's image
        swapped, _ = sequence_logps(policy, rollout)
    assert torch.isfinite(logps).all() and not torch.allclose(logps, swapped)


def test_image_pairs_on_a_text_policy_and_text_pairs_on_an_image_policy(tmp_path, vlm_dir, policy_dir, image_pairs,
                                                                        vision_world):
    with pytest.raises(UserError, match=r"pairs\.jsonl:1: field 'images': the model .* is text-only"):
        run_stage("dpo", _cfg(tmp_path / "a", policy_dir, image_pairs, vision_world, **{"eval.gold_prompts": None}))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"prompt": f"<review> tent {i}", "chosen": " good .", "rejected": " bad ."})
                            + "\n" for i in range(4)))
    with pytest.raises(UserError, match=r"text\.jsonl:1: field 'images' is missing: the model .* is a vision-language"):
        run_stage("dpo", _cfg(tmp_path / "b", vlm_dir, text, vision_world, **{"eval.gold_prompts": None}))
    demo_gold = tmp_path / "gold.jsonl"  # text-only gold prompts for an image policy
    demo_gold.write_text(json.dumps({"prompt": "<add> 1+2=", "task": "add", "meta": {"answer": 3}}) + "\n")
    with pytest.raises(UserError, match=r"gold\.jsonl:1: field 'images' is missing"):
        run_stage("dpo", _cfg(tmp_path / "c", vlm_dir, image_pairs, vision_world, **{"eval.gold_prompts": str(demo_gold)}))
