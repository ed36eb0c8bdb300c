"""The image-conditioned reward model: a vision-language trunk (LLaVA: tower, projector, language model) with a score
head, trained by the reward stage on pairs sampled from a tiny VLM policy on the small vision world, saved as the
VLM's directory plus its head, loaded back, scoring rollouts (Scorer) and starting a PPO critic; and the bad inputs
(image pairs on a text model and the reverse, an image that does not fit max_length)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.config import LoraSettings, ModelSettings
from rlhf.data import load_prompts
from rlhf.errors import UserError
from rlhf.policy import PolicyModel
from rlhf.tracking import read_metrics
from rlhf.vision import images_for, record_images
from reward_models import train
from reward_models.model import REWARD_HEAD_FILE, RewardModel
from reward_models.scoring import RewardComponent, Scorer


def _config(out: Path, **overrides) -> train.Config:
    cfg = {"output_dir": str(out), "model": {"max_length": 64}, "data": {"eval_fraction": 0.25},
           "train": {"max_steps": 3, "batch_size": 8, "log_every": 1},
           "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"}, "stats": {"num_samples": 16},
           "eval": {"batch_size": 16}, "tracking": {"mode": "disabled"}}
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return train.Config.model_validate(cfg)


@pytest.fixture(scope="module")
def image_rm(tmp_path_factory, vlm_dir, vision_world):
    """The reward stage on the small vision world: pairs sampled from the tiny VLM for image_review prompts, an image
    reward model on that VLM trained for three steps (with the auxiliary LM loss), saved. Returns (dir, metrics)."""
    from rlhf.stage import StageContext
    from rlhf.config import TrackingSettings
    from rlhf.tracking import Tracker

    out = tmp_path_factory.mktemp("image-rm")
    cfg = _config(out, model__path=str(vlm_dir), loss__lm_coef=0.1, data__sample={
        "policy": str(vlm_dir), "prompts": str(vision_world / "rl_prompts.jsonl"), "task": "image_review",
        "num_prompts": 8, "samples_per_prompt": 3, "max_new_tokens": 6, "batch_size": 8})
    tracker = Tracker(out, TrackingSettings(mode="disabled"), job_type="reward", name="reward")
    metrics = train.run(cfg, StageContext(name="reward", kind="reward", dir=out, tracker=tracker))
    return out, metrics


def test_reward_stage_samples_image_pairs_and_trains_an_image_reward_model(image_rm, vlm_dir):
    out, metrics = image_rm
    rows = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert rows and all(len(r["images"]) == 1 and Path(r["images"][0]).is_file() for r in rows)
    assert {"prompt", "chosen", "rejected", "images"} <= rows[0].keys()  # TRL's vision preference format
    assert len({r["images"][0] for r in rows}) > 2  # pairs of several images, so some are held out
    samples = [json.loads(line) for line in (out / "policy_samples.jsonl").read_text().splitlines()]
    assert all(len(s["images"]) == 1 for s in samples)
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and metrics["eval/pairs"] > 0
    assert "eval/noise_ceiling" in metrics  # the world's gold scorer reads image_review's meta
    logged = [r for r in read_metrics(out) if "loss/total" in r and "train/lr" in r]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(r["loss/lm"])) for r in logged)
    for name in ("config.json", "model.safetensors", REWARD_HEAD_FILE, "processor_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    # the directory is the VLM's own: a vision-language model loads from it (the head sits beside)
    from transformers import AutoModelForImageTextToText

    assert type(AutoModelForImageTextToText.from_pretrained(out)).__name__ == "LlavaForConditionalGeneration"
    trained = RewardModel.load(str(out))
    before = RewardModel.from_backbone(str(vlm_dir))
    layer = "language_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(trained.hf.model.state_dict()[layer], before.hf.model.state_dict()[layer])
    assert trained.stats["source"] == f"samples of {vlm_dir}" and trained.stats["n"] == 16
    assert metrics["eval/sft_score_mean"] == pytest.approx(trained.stats["mean"], abs=1e-5)


def test_saved_image_reward_model_scores_as_trained_and_reads_the_image(image_rm, vision_world):
    from reward_models.data import load_preferences
    from reward_models.evaluation import evaluate_pairs

    out, metrics = image_rm
    rm = RewardModel.load(str(out))
    pairs = load_preferences(str(out / "preferences.jsonl"), rm.tokenizer)
    # the held-out split of the stage, scored again by the loaded model: the same accuracy
    from reward_models.data import split_by_prompt

    _, held_out = split_by_prompt(pairs, 0.25, 0)
    assert evaluate_pairs(rm, held_out, 16)[0]["eval/accuracy"] == pytest.approx(metrics["eval/accuracy"])
    records = load_prompts(vision_world / "eval_prompts.jsonl")
    records = [r for r in records if r["task"] == "image_review"][:4]
    images = [record_images(r)[0] for r in records]
    prompts, completions = [r["prompt"] for r in records], [" the tent is great ."] * 4
    scores = rm.score(prompts, completions, images=images)
    assert not torch.allclose(scores, rm.score(prompts, completions, images=images[::-1]))  # the image matters
    assert torch.allclose(scores, rm.score(prompts, completions, images=rm.image_inputs.pixel_values(images)))


def test_scorer_scores_an_image_rollout_from_records_or_pixel_values(image_rm, vlm_dir, vision_world):
    out, _ = image_rm
    policy = PolicyModel.from_pretrained(str(vlm_dir))
    records = [r for r in load_prompts(vision_world / "rl_prompts.jsonl") if r["task"] == "image_review"][:3]
    rollout = policy.generate([r["prompt"] for r in records], n=2, max_new_tokens=5, seed=0,
                              images=images_for(records, policy.image_inputs))
    scorer = Scorer([RewardComponent(name="rm", model=str(out)), RewardComponent(name="eos", rule="missing_eos")])
    assert scorer.needs_images
    from_records = scorer.score_rollout(rollout, records)
    from_pixels = scorer.score_rollout(rollout)  # no records: the rollout's pixel values (the same processor)
    assert torch.allclose(from_records.components["rm"], from_pixels.components["rm"], atol=1e-6)
    rm = scorer.models["rm"]
    raw = rm.score(rollout.prompts, rollout.completions, images=[record_images(records[i])[0]
                                                               for i in rollout.prompt_index.tolist()])
    assert torch.allclose(from_records.components["rm"], rm.normalize(raw))
    with pytest.raises(UserError, match="image reward model"):
        scorer.score(rollout.prompts, rollout.completions)  # neither records nor images


def test_ppo_critic_from_an_image_reward_model_gives_values(image_rm, vlm_dir, vision_world, policy_dir):
    from rlhf.critic import CriticSettings, build_critic

    out, _ = image_rm
    policy = PolicyModel.from_pretrained(str(vlm_dir))
    records = [r for r in load_prompts(vision_world / "rl_prompts.jsonl") if r["task"] == "image_review"][:2]
    rollout = policy.generate([r["prompt"] for r in records], n=2, max_new_tokens=5, seed=0,
                              images=images_for(records, policy.image_inputs))
    rewards = [RewardComponent(name="rm", model=str(out))]
    critic = build_critic(CriticSettings(), policy, rewards,  # critic.path null: the first reward model
                          ModelSettings(path=str(vlm_dir)), {})
    values = critic.values(policy, rollout)
    assert values.shape == rollout.response_ids.shape and torch.isfinite(values).all()
    values.sum().backward()  # the critic trains
    assert critic.module.rm.hf.score.weight.grad is not None
    swapped = rollout.select([2, 3, 0, 1])
    swapped.pixel_values = rollout.pixel_values  # the same tokens with the other prompts' images
    with torch.no_grad():
        assert not torch.allclose(critic.values(policy, swapped), critic.values(policy, rollout.select([2, 3, 0, 1])))
    critic.save(out.parent / "ppo", critic.bare(_NoAccelerator()))
    assert RewardModel.load(str(out.parent / "ppo" / "critic")).image_inputs is not None
    text_policy = PolicyModel.from_pretrained(str(policy_dir))
    with pytest.raises(UserError, match="image reward model, but the policy is text-only"):
        build_critic(CriticSettings(), text_policy, rewards, ModelSettings(path=str(policy_dir)), {})


class _NoAccelerator:
    @staticmethod
    def unwrap_model(module):
        return module


def test_lora_image_reward_model_saves_merged_and_loads_the_same(tmp_path, vlm_dir, vision_world):
    rm = RewardModel.from_backbone(str(vlm_dir), lora=LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, param in rm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # an adapter that changes the scores
    records = [r for r in load_prompts(vision_world / "eval_prompts.jsonl") if r["task"] == "image_review"][:3]
    images = [record_images(r)[0] for r in records]
    prompts, completions = [r["prompt"] for r in records], [" the lamp is good ."] * 3
    scores = rm.score(prompts, completions, images=images)
    rm.save(tmp_path / "rm")
    assert (tmp_path / "rm" / "adapter" / "adapter_config.json").is_file()
    assert torch.allclose(RewardModel.load(str(tmp_path / "rm")).score(prompts, completions, images=images), scores,
                          atol=1e-5)


def test_image_pairs_on_a_text_model_and_text_pairs_on_an_image_model(tmp_path, vlm_dir, policy_dir, vision_world):
    from rlhf.stage import StageContext
    from rlhf.config import TrackingSettings
    from rlhf.tracking import Tracker

    def run(model: Path, data: Path, **overrides):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        tracker = Tracker(out, TrackingSettings(mode="disabled"), job_type="reward", name="reward")
        train.run(_config(out, model__path=str(model), data__train=str(data), **overrides),
                  StageContext(name="reward", kind="reward", dir=out, tracker=tracker))

    image_pairs = tmp_path / "image_pairs.jsonl"
    image_pairs.write_text("".join(json.dumps({
        "prompt": "<review> <image>", "chosen": " the tent is great .", "rejected": " bad .",
        "images": [str(vision_world / "images" / "rl" / f"{i:06d}.png")]}) + "\n" for i in range(4)))
    text_pairs = tmp_path / "text_pairs.jsonl"
    text_pairs.write_text("".join(json.dumps({"prompt": "<review> tent", "chosen": " great .", "rejected": " bad ."})
                                  + "\n" for _ in range(4)))
    with pytest.raises(UserError, match=r"image_pairs\.jsonl:1: field 'images': the model .* is text-only"):
        run(policy_dir, image_pairs)
    with pytest.raises(UserError, match=r"text_pairs\.jsonl:1: field 'images' is missing: the model .* is a "
                                        "vision-language model"):
        run(vlm_dir, text_pairs)
    with pytest.raises(UserError, match=r"image_pairs\.jsonl:\d+: the prompt's image \(17 tokens\) and the response do "
                                        r"not fit max_length=12"):
        run(vlm_dir, image_pairs, model__max_length=12)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "<review> <image>", "chosen": " a .", "rejected": " b .",
                                   "images": ["nowhere.png"]}) + "\n")
    with pytest.raises(UserError, match=r"missing\.jsonl:1: field 'images' item 0: image file not found"):
        run(vlm_dir, missing)


def test_ppo_step_with_the_image_reward_model_as_reward_and_critic(image_rm, tmp_path, vlm_dir, vision_world):
    from rlhf.config import load_config
    from rlhf.pipeline import recipe, run_stage

    out_rm, _ = image_rm
    run_stage("ppo", load_config(recipe("ppo").Config, None, {
        "output_dir": str(tmp_path / "out"), "model.path": str(vlm_dir), "critic.kind": "model",
        "data.prompts": str(vision_world / "rl_prompts.jsonl"), "data.tasks": ["image_review"],
        "rewards": [{"name": "rm", "model": str(out_rm)}], "sampling.n": 2, "sampling.max_new_tokens": 5,
        "rl.prompts_per_step": 2, "rl.epochs": 1, "rl.minibatches": 1, "rl.micro_batch_size": 4,
        "train.max_steps": 1, "train.log_every": 1, "optim.lr": 1e-3, "kl.beta": 0.1, "kl.target": None,
        "eval.prompts": None, "samples_every": 0, "tracking.mode": "disabled"}))
    row = [r for r in read_metrics(tmp_path / "out") if "loss/value" in r][0]
    assert torch.isfinite(torch.tensor([row["loss/value"], row["reward/rm"], row["value/explained_var"]])).all()
    assert RewardModel.load(str(tmp_path / "out" / "critic")).image_inputs is not None


def test_a_lora_image_reward_model_is_not_run_as_an_adapter_on_the_policys_base(tmp_path, vlm_dir):
    from reward_models.shared_base import shared_reward_models

    RewardModel.from_backbone(str(vlm_dir), lora=LoraSettings(r=4, alpha=8)).save(tmp_path / "rm")
    policy = PolicyModel.load(ModelSettings(path=str(vlm_dir), lora={"r": 4, "alpha": 8}), device="cpu")
    rewards = [RewardComponent(name="rm", model=str(tmp_path / "rm"), normalize=False)]
    assert shared_reward_models(rewards, policy, str(vlm_dir)) == {}  # the Scorer loads it on its own
    assert Scorer(rewards).models["rm"].image_inputs is not None
