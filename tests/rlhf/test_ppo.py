"""PPO stage: the pure pieces by hand, then smoke runs of every critic kind with a reward model and rules, the
first-minibatch sanity check (ratio exactly 1), the no-EOS score, critic warm-up, a fixed reference, the eval's
RM-vs-gold pair, and resume after SIGKILL."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.advantages import fixed_score_without_eos
from rlhf.config import load_config, parse_overrides
from rlhf.pipeline import recipe, run_stage
from rlhf.policy import PolicyModel
from rlhf.stage import read_manifest
from rlhf.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]


# -- pure functions, by hand ----------------------------------------------------------------------------------------


def test_fixed_score_without_eos_replaces_only_truncated_rows():
    scores = torch.tensor([0.5, 2.0, -0.3])
    ended = torch.tensor([True, False, True])
    # row 1 never emitted EOS: its 2.0 (a reward model happily scores a cut-off text) becomes the fixed −1
    assert torch.equal(fixed_score_without_eos(scores, ended, -1.0), torch.tensor([0.5, -1.0, -0.3]))


def test_reward_model_token_scores_end_in_the_sequence_score(reward_dir):
    """The critic reads the score head at every position; at the EOS of a left-padded row (position ids from the
    mask) it equals the reward the model gives the sequence."""
    from reward_models.model import RewardModel
    from rlhf.ops import position_ids_from_mask

    rm = RewardModel.load(str(reward_dir))
    tok = rm.tokenizer
    rows = [tok("<review> product: red mug the mug is great .").input_ids + [tok.eos_token_id],
            tok("<review> product: lamp").input_ids + [tok.eos_token_id]]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        per_token = rm.token_scores(ids, mask, position_ids_from_mask(mask))
        sequence = rm(ids, mask)
    assert per_token.shape == ids.shape
    assert torch.allclose(per_token[:, -1], sequence, atol=1e-5)


def test_pad_is_distinct_from_eos_and_prompts_are_left_padded(tmp_path, tokenizer):
    from rlhf.world import build_tiny_lm

    tok = type(tokenizer).from_pretrained(str(ROOT / "data/demo/tokenizer"))
    tok.pad_token = tok.eos_token  # a model that pads with EOS (GPT-2 style) would hide where responses stop
    build_tiny_lm(tok, "nano", seed=0).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    policy = PolicyModel.from_pretrained(str(tmp_path))
    assert policy.tokenizer.pad_token_id != policy.tokenizer.eos_token_id
    ids, mask = policy.encode_prompts(["<review> product: red mug", "<review> product: lamp"])
    assert mask[1, 0].item() is False and mask[:, -1].all(), "left padding: every prompt ends at the last column"


# -- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """Eight review prompts of the demo world (training) and four held-out ones."""
    d = tmp_path_factory.mktemp("ppo-data")
    rows = [json.loads(x) for x in (ROOT / "data/demo/rl_prompts.jsonl").read_text().splitlines()]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["task"] == "review"][:8]))
    evals = [json.loads(x) for x in (ROOT / "data/demo/eval_prompts.jsonl").read_text().splitlines()]
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [r for r in evals if r["task"] == "review"][:4]))
    return d


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, policy_dir):
    """A nano decoder reward model on the policy's tokenizer, random weights, with stored score statistics (the
    shape of the reward stage's output: AutoModelForSequenceClassification, num_labels=1)."""
    from reward_models.model import RewardModel

    path = tmp_path_factory.mktemp("ppo-rm")
    torch.manual_seed(1)
    rm = RewardModel.from_backbone(str(policy_dir))
    rm.set_stats(torch.tensor([0.3, -0.1, 0.5, 0.1]), "test")
    rm.save(path)
    return path


def _cfg(tmp_path, policy_dir, prompts_file, reward_dir, **overrides):
    # a learned RM plus a rule, so the weighted sum of both is what PPO optimizes
    rewards = [{"name": "rm", "model": str(reward_dir), "weight": 1.0},
               {"name": "gold", "rule": "verifiable", "weight": 0.5}]
    base = {
        "output_dir": str(tmp_path / "out"), "model.path": str(policy_dir), "data.prompts": str(prompts_file / "train.jsonl"),
        "rewards": rewards, "sampling.n": 2, "sampling.max_new_tokens": 6, "rl.prompts_per_step": 2,
        "rl.epochs": 2, "rl.minibatches": 2, "rl.micro_batch_size": 2, "train.max_steps": 2, "train.log_every": 1,
        "optim.lr": 1e-2, "kl.beta": 0.1, "kl.target": None, "eval.prompts": str(prompts_file / "eval.jsonl"),
        "eval.rewards": [{"name": "gold", "rule": "verifiable"}], "eval.generation.max_new_tokens": 6,
        "samples_every": 1, "tracking.mode": "disabled",
    }
    return load_config(recipe("ppo").Config, None, {**base, **overrides})


def _train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "perf/update_seconds" in r]


def _unchanged(before: dict, after: dict) -> list[str]:
    """Names of the tensors equal in both state dicts."""
    return [k for k in before if torch.equal(before[k], after[k])]


# -- smoke runs -----------------------------------------------------------------------------------------------------


def test_critic_from_the_reward_model_trains_everything_and_logs_the_vocabulary(
        tmp_path, policy_dir, prompts_file, reward_dir, monkeypatch):
    # record the reference's log-probs of one fixed sequence every time the rollout asks for the reference
    probes: list[torch.Tensor] = []
    original = PolicyModel.reference

    def recording(self):
        ctx = original(self)
        ref = ctx.__enter__()
        ids = torch.tensor([[1, 5, 6, 7]])
        probe = self.rollout_from_ids(ids, torch.ones_like(ids, dtype=torch.bool), torch.tensor([[8, 9, 10]]), ["p"])
        probes.append(ref.forward(probe).logprobs.detach().clone())
        ctx.__exit__(None, None, None)
        return original(self)

    monkeypatch.setattr(PolicyModel, "reference", recording)
    result = run_stage("ppo", _cfg(tmp_path, policy_dir, prompts_file, reward_dir, **{"train.max_steps": 3}))
    out = tmp_path / "out"
    rows = _train_rows(out)
    assert len(rows) == 3 and all(math.isfinite(r["loss/total"]) for r in rows)
    for key in ("value/explained_var", "train/clip_frac", "loss/value", "loss/policy", "train/kl", "train/kl_coef",
                "train/reward", "train/reward_with_kl", "reward/rm", "reward/gold", "train/entropy",
                "train/response_length", "train/truncated_frac", "perf/generate_seconds", "perf/score_seconds",
                "perf/reference_seconds", "perf/values_seconds", "perf/update_seconds", "progress/samples"):
        assert key in rows[-1], key
    assert rows[-1]["progress/samples"] == 3 * 2 * 2
    # advantages whitened over the batch's counting tokens (loss.whiten_advantages, on by default)
    assert all(abs(r["train/advantage_mean"]) < 1e-5 and r["train/advantage_std"] == pytest.approx(1.0, abs=1e-4) for r in rows)
    # the reference never moved while the policy did
    assert len(probes) == 3 and all(torch.equal(p, probes[0]) for p in probes)
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-5) and rows[-1]["train/kl"] != 0.0
    # every trainable parameter moved: the policy's and the critic's (trunk and score head)
    unchanged = _unchanged(load_file(str(policy_dir / "model.safetensors")), load_file(str(out / "model.safetensors")))
    assert unchanged == [], f"policy parameters that did not move: {unchanged}"
    critic_before = load_file(str(reward_dir / "model.safetensors"))
    critic_after = load_file(str(out / "critic" / "model.safetensors"))
    assert set(critic_before) == set(critic_after) and _unchanged(critic_before, critic_after) == []
    # eval: the held-out gold score and the training reward on the same completions, side by side
    assert {"eval/gold_score", "eval/rm_score"} <= set(result["metrics"])
    assert read_manifest(out)["status"] == "complete"
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2, 3}


def test_first_minibatch_of_the_first_epoch_has_ratio_exactly_one(tmp_path, policy_dir, prompts_file, reward_dir):
    """Old log-probs and values are computed in the first epoch's micro-batches, in eval mode (dropout off) and at
    the sampling temperature, so the first update sees exactly the policy that sampled: ratio 1, approx-KL 0."""
    cfg = _cfg(tmp_path / "a", policy_dir, prompts_file, reward_dir, **{
        "train.max_steps": 2, "sampling.temperature": 0.7, "model.lora": {"r": 4, "alpha": 8, "dropout": 0.3},
        "eval.prompts": None})
    run_stage("ppo", cfg)
    rows = _train_rows(tmp_path / "a" / "out")
    for row in rows:
        assert row["train/first_minibatch_ratio_mean"] == 1.0 and row["train/first_minibatch_approx_kl_old"] == 0.0
    assert rows[-1]["train/approx_kl_old"] > 0  # later minibatches see a moved policy
    # with dropout left on (LoRA dropout 0.3) the training forward is another function than the sampling one: once
    # the adapters are non-zero (step 2), the first ratio leaves 1
    run_stage("ppo", _cfg(tmp_path / "b", policy_dir, prompts_file, reward_dir, **{
        "train.max_steps": 2, "disable_dropout": False, "model.lora": {"r": 4, "alpha": 8, "dropout": 0.3},
        "eval.prompts": None}))
    assert _train_rows(tmp_path / "b" / "out")[-1]["train/first_minibatch_ratio_mean"] != 1.0


def test_responses_without_eos_get_the_fixed_score(tmp_path, policy_dir, prompts_file, reward_dir):
    # one new token: the random policy never stops (checked), so every row gets the fixed score
    run_stage("ppo", _cfg(tmp_path, policy_dir, prompts_file, reward_dir, **{
        "sampling.max_new_tokens": 1, "reward.missing_eos_score": -5.0, "train.max_steps": 1, "eval.prompts": None}))
    row = _train_rows(tmp_path / "out")[0]
    assert row["train/truncated_frac"] == 1.0 and row["train/reward"] == -5.0
    assert row["reward/rm"] != -5.0  # the components are logged as the scorer gave them


def test_rule_rewards_alone_combine_with_weights(tmp_path, policy_dir, prompts_file):
    # no learned RM at all: the critic is the policy's trunk with a zero head
    rewards = [{"name": "gold", "rule": "verifiable", "weight": 2.0},
               {"name": "short", "rule": "length_penalty", "params": {"max_words": 1}, "weight": 0.5}]
    run_stage("ppo", _cfg(tmp_path, policy_dir, prompts_file, None, **{
        "rewards": rewards, "reward.missing_eos_score": None, "train.max_steps": 1, "eval.prompts": None}))
    row = _train_rows(tmp_path / "out")[0]
    assert row["train/reward"] == pytest.approx(2.0 * row["reward/gold"] + 0.5 * row["reward/short"], abs=1e-6)
    assert (tmp_path / "out" / "critic" / "model.safetensors").is_file()


def test_value_head_critic_with_kl_in_the_loss_and_adaptive_beta(tmp_path, policy_dir, prompts_file, reward_dir,
                                                                  monkeypatch):
    import rlhf.recipes.ppo as ppo

    eps: list[float] = []
    step = ppo.optimizer_step

    def recording(accelerator, model, optimizer, *args, **kwargs):
        eps.extend(g["eps"] for g in optimizer.param_groups)
        return step(accelerator, model, optimizer, *args, **kwargs)

    monkeypatch.setattr(ppo, "optimizer_step", recording)
    run_stage("ppo", _cfg(tmp_path, policy_dir, prompts_file, reward_dir, **{
        "critic.kind": "value_head", "kl.in_reward": False, "kl.estimator": "k3", "kl.target": 0.01, "kl.horizon": 10,
        "reward.whiten": "center", "loss.entropy_coef": 0.01, "eval.prompts": None}))
    out = tmp_path / "out"
    rows = _train_rows(out)
    assert "loss/kl" in rows[-1] and rows[-1]["train/kl_coef"] != rows[0]["train/kl_coef"]
    assert eps and set(eps) == {1e-5}, "Adam ε of the N implementation details (optim.eps), not torch's 1e-8"
    assert all(r["train/first_minibatch_ratio_mean"] == 1.0 for r in rows)  # old log-probs and values: one forward
    head = load_file(str(out / "value_head.safetensors"))
    assert all(v.abs().sum() > 0 for v in head.values()), "the zero-initialised value head moved"
    unchanged = _unchanged(load_file(str(policy_dir / "model.safetensors")), load_file(str(out / "model.safetensors")))
    assert unchanged == [], f"trunk parameters that did not move: {unchanged}"


def test_adapter_critic_shares_the_base_and_both_adapters_train(tmp_path, policy_dir, prompts_file, reward_dir):
    run_stage("ppo", _cfg(tmp_path, policy_dir, prompts_file, reward_dir, **{
        "critic.kind": "adapter", "model.lora": {"r": 4, "alpha": 8}, "eval.prompts": None}))
    out = tmp_path / "out"
    policy_adapter = load_file(str(out / "adapter_model.safetensors"))
    critic_adapter = load_file(str(out / "critic" / "adapter_model.safetensors"))
    for adapter in (policy_adapter, critic_adapter):
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "every lora_B (zero at init) moved"
    assert all(v.abs().sum() > 0 for v in load_file(str(out / "critic" / "value_head.safetensors")).values())
    assert PolicyModel.from_pretrained(str(out)).generate(["<review> product: red mug"], max_new_tokens=3, seed=0)


def test_critic_warmup_trains_only_the_critic(tmp_path, policy_dir, prompts_file, reward_dir):
    # the policy's weights staying still during the warm-up: test_hardening_rl.py (a warm-up as long as the run is
    # refused)
    run_stage("ppo", _cfg(tmp_path, policy_dir, prompts_file, reward_dir, **{
        "critic.warmup_steps": 2, "train.max_steps": 3, "loss.whiten_advantages": False, "eval.prompts": None}))
    out = tmp_path / "out"
    critic_before = load_file(str(reward_dir / "model.safetensors"))
    assert _unchanged(critic_before, load_file(str(out / "critic" / "model.safetensors"))) == []
    rows = _train_rows(out)
    assert all(r["train/policy_updating"] == 0.0 and "loss/policy" not in r for r in rows[:2])
    assert rows[2]["train/policy_updating"] == 1.0 and "loss/policy" in rows[2]
    assert rows[0]["train/advantage_std"] != pytest.approx(1.0, abs=1e-3)  # raw GAE advantages


def test_a_lora_reward_model_on_the_policy_base_runs_as_an_adapter_with_the_same_scores(
        tmp_path, policy_dir, prompts_file, monkeypatch):
    from reward_models.model import RewardModel
    from rlhf.config import LoraSettings, ModelSettings
    from reward_models.shared_base import shared_reward_models

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"<review> product: {p}", "chosen": f" the {p} is great .",
                                         "rejected": f" the {p} is awful ."}) + "\n"
                             for p in ("mug", "lamp", "desk", "tent") for _ in range(3)))
    rm_dir = tmp_path / "rm"
    run_stage("reward", load_config(recipe("reward").Config, None, {
        "output_dir": str(rm_dir), "model": {"path": str(policy_dir), "max_length": 32, "lora": {"r": 4, "alpha": 8}},
        "data": {"train": str(pairs), "eval_fraction": 0.25}, "train": {"max_steps": 4, "batch_size": 4},
        "optim": {"lr": 1e-2}, "stats": {"num_samples": 8}, "tracking": {"mode": "disabled"}}))
    assert (rm_dir / "adapter" / "adapter_model.safetensors").is_file()

    # the adapter on the policy's base scores exactly as the saved (merged) reward model does
    cfg = _cfg(tmp_path, policy_dir, prompts_file, rm_dir, **{"model.lora": {"r": 4, "alpha": 8}})
    policy = PolicyModel.load(ModelSettings(path=str(policy_dir), lora=LoraSettings(r=4, alpha=8)))
    shared = shared_reward_models(cfg.rewards, policy, cfg.model.path)
    assert set(shared) == {"rm"}
    texts = ["<review> product: mug", "<review> product: lamp"], [" the mug is great .", " it works badly ."]
    assert torch.allclose(shared["rm"].score(*texts), RewardModel.load(str(rm_dir)).score(*texts), atol=1e-5)

    # a PPO run with the adapter critic: the reward model is never loaded as a second copy
    def no_copy(path, *args, **kwargs):
        raise AssertionError(f"reward model {path} loaded as a copy")

    monkeypatch.setattr(RewardModel, "load", no_copy)
    run_stage("ppo", _cfg(tmp_path, policy_dir, prompts_file, rm_dir, **{
        "model.lora": {"r": 4, "alpha": 8}, "critic.kind": "adapter", "eval.prompts": None}))
    rows = _train_rows(tmp_path / "out")
    assert all(math.isfinite(r["loss/total"]) for r in rows) and "reward/rm" in rows[-1]


# -- resume ---------------------------------------------------------------------------------------------------------


def test_sigkill_mid_stage_resumes_to_the_same_final_metrics(tmp_path, kill_and_resume, policy_dir, prompts_file, reward_dir):
    rewards = json.dumps([{"name": "rm", "model": str(reward_dir)}, {"name": "gold", "rule": "verifiable"}])
    args = ["ppo", f"model.path={policy_dir}", f"data.prompts={prompts_file / 'train.jsonl'}", f"rewards={rewards}",
            "sampling.n=2", "sampling.max_new_tokens=6", "rl.prompts_per_step=2", "rl.epochs=2", "rl.minibatches=2",
            "rl.micro_batch_size=2", "train.max_steps=6", "train.save_every=2", "train.log_every=1", "optim.lr=0.01",
            f"eval.prompts={prompts_file / 'eval.jsonl'}", "eval.generation.max_new_tokens=6", "tracking.mode=disabled",
            "kl.target=1.0", "kl.horizon=50", "critic.warmup_steps=1"]
    # the uninterrupted run, in this process (the same config through the same runner as the CLI's)
    cfg = load_config(recipe("ppo").Config, None, {**parse_overrides(args[1:]), "output_dir": str(tmp_path / "ref")})
    reference = run_stage("ppo", cfg)["metrics"]

    out = tmp_path / "run"
    text = kill_and_resume(args, out)
    assert "resuming ppo from step-" in text
    assert read_manifest(out)["metrics"] == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert [r["step"] for r in _train_rows(out)] == list(range(1, 7))
