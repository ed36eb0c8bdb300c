"""The `reward` stage recipe: toy preferences learned by both backbones, artifacts, resume, demo sampling, configs."""

import json
import re
from pathlib import Path

import pytest
import torch

from rlhf.config import load_config
from rlhf.errors import UserError
from reward_models import train
from reward_models.model import RewardModel

REPO = Path(__file__).resolve().parents[2]


def toy_config(backbone_dir: Path, data: Path, out: Path, **overrides) -> train.Config:
    cfg = {
        "output_dir": str(out),
        "model": {"path": str(backbone_dir), "max_length": 32},
        "data": {"train": str(data), "eval_fraction": 0.25},
        "train": {"max_steps": 12, "batch_size": 16, "log_every": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
        "stats": {"num_samples": 16},
        "tracking": {"mode": "disabled"},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return train.Config.model_validate(cfg)


@pytest.mark.parametrize("which", ["decoder_dir", "encoder_dir"])
def test_both_backbones_learn_a_separable_toy_preference(which, request, tmp_path, write_jsonl, toy_pairs, make_ctx):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_pairs(96))
    cfg = toy_config(request.getfixturevalue(which), data, tmp_path / "rm")
    metrics = train.run(cfg, make_ctx(tmp_path / "rm"))
    assert metrics["eval/accuracy"] >= 0.95
    assert metrics["eval/pairs"] >= 12  # 2 of the 8 toy prompts, with all of their pairs
    assert "eval/noise_ceiling" not in metrics  # no demo-world task in these pairs


def test_stage_artifacts_losses_and_stats(decoder_dir, tmp_path, write_jsonl, toy_pairs, make_ctx):
    rows = toy_pairs(40)
    rows[0]["tie"] = True
    rows[1]["margin"] = 1.0
    data = write_jsonl(tmp_path / "toy.jsonl", rows)
    out = tmp_path / "rm"
    before = RewardModel.from_backbone(str(decoder_dir)).hf.model.layers[0].mlp.up_proj.weight.clone()
    cfg = toy_config(decoder_dir, data, out, train__max_steps=3, train__log_every=1, loss__lm_coef=0.5,
                     loss__center_coef=0.1)
    metrics = train.run(cfg, make_ctx(out))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "eval_scores.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/bt", "loss/lm", "loss/center", "train/accuracy", "progress/samples"} <= set(rows[0])
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows if "loss/total" in r)
    rm = RewardModel.load(str(out))
    assert not torch.equal(rm.hf.model.layers[0].mlp.up_proj.weight, before)  # the trunk trained, not just the head
    assert rm.stats["source"] == "responses of the training pairs" and rm.stats["n"] == 16
    assert metrics["eval/sft_score_mean"] == pytest.approx(rm.stats["mean"])
    for key in ("eval/accuracy", "eval/margin", "eval/ece", "eval/loss"):
        assert key in metrics


def test_resume_continues_exactly(decoder_dir, tmp_path, write_jsonl, toy_pairs, make_ctx):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_pairs(40))
    straight = toy_config(decoder_dir, data, tmp_path / "a", train__max_steps=4)
    train.run(straight, make_ctx(tmp_path / "a"))
    # the same run with a checkpoint at step 2, then run again from it as the pipeline does after a crash
    cfg = toy_config(decoder_dir, data, tmp_path / "b", train__max_steps=4, train__save_every=2)
    train.run(cfg, make_ctx(tmp_path / "b"))
    assert (tmp_path / "b" / "checkpoints" / "step-000002").is_dir()
    (tmp_path / "b" / "model.safetensors").unlink()
    train.run(cfg, make_ctx(tmp_path / "b", resume=True))
    prompts, completions = ["<review> product: mug"] * 2, [" the mug is great .", " the mug is awful ."]
    torch.testing.assert_close(RewardModel.load(str(tmp_path / "a")).score(prompts, completions),
                               RewardModel.load(str(tmp_path / "b")).score(prompts, completions))


def test_demo_sampling_path_writes_pairs_and_reports_noise_ceiling(decoder_dir, tmp_path, make_ctx):
    from rlhf.policy import PolicyModel

    policy_dir = tmp_path / "policy"
    PolicyModel.from_pretrained(str(decoder_dir)).save(policy_dir)
    out = tmp_path / "rm"
    cfg = toy_config(policy_dir, None, out, train__max_steps=2, data__train=None, data__eval_fraction=0.5,
                     data__group_by_prompt=True,
                     data__sample={"policy": str(policy_dir), "prompts": str(REPO / "data/demo/rl_prompts.jsonl"),
                                   "num_prompts": 4, "samples_per_prompt": 3, "max_new_tokens": 8,
                                   "batch_size": 4})
    metrics = train.run(cfg, make_ctx(out))
    pairs = [json.loads(line) for line in (out / train.PAIRS_FILE).read_text().splitlines()]
    assert 0 < len(pairs) <= 4 * 3 and all(p["task"] == "review" and p["chosen"] != p["rejected"] for p in pairs)
    assert 0.0 <= metrics["eval/noise_ceiling"] <= 1.0
    assert RewardModel.load(str(out)).stats["source"] == f"samples of {policy_dir}"


def test_missing_inputs_are_user_errors(decoder_dir, tmp_path, make_ctx):
    cfg = toy_config(decoder_dir, None, tmp_path / "rm", data__train=None)
    with pytest.raises(UserError, match="data.train"):
        train.run(cfg, make_ctx(tmp_path / "rm"))
    cfg = toy_config(decoder_dir, None, tmp_path / "rm2", model__path=None)
    with pytest.raises(UserError, match="model.path"):
        train.run(cfg, make_ctx(tmp_path / "rm2"))


def test_pairs_of_a_single_prompt_cannot_be_split_by_prompt(decoder_dir, tmp_path, write_jsonl, make_ctx):
    rows = [{"prompt": "<review> product: red kettle", "chosen": " the kettle is great .", "rejected": " bad ."}] * 4
    data = write_jsonl(tmp_path / "one_prompt.jsonl", rows)
    cfg = toy_config(decoder_dir, data, tmp_path / "rm")
    with pytest.raises(UserError, match="share one prompt.*data.eval"):
        train.run(cfg, make_ctx(tmp_path / "rm"))


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "reward").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_load_and_document_every_key(path):
    load_config(train.Config, path)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#"), "header comment saying what it runs"
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z_]+:", line):
            assert lines[i - 1].strip().startswith("#"), f"{path.name}:{i + 1} key without a comment above it"


@pytest.mark.slow
def test_minilm_config_trains_an_encoder_rm_on_the_example_pairs(tmp_path, monkeypatch, make_ctx):
    """What a new user runs from the README: `rlhf reward configs/reward/minilm.yaml` (real MiniLM weights)."""
    monkeypatch.chdir(REPO)
    cfg = load_config(train.Config, REPO / "configs/reward/minilm.yaml",
                      {"output_dir": str(tmp_path / "rm"), "tracking.mode": "disabled"})
    metrics = train.run(cfg, make_ctx(tmp_path / "rm"))
    assert RewardModel.load(str(tmp_path / "rm")).backbone == "encoder"
    assert metrics["eval/accuracy"] >= 0.6  # chance is 0.5; the gold scorer's own ceiling is about 0.8 here
