"""Regression tests of the RL loops' invariants, each a one-step run or a direct check of the shared pieces:
masked KL on padding at low temperature, dropout off in GRPO (ratio 1, KL 0 while policy = reference), a
deterministic reference under LoRA, the bf16 reference copy, a caller's normalizer below 1, the critic on an
unnormalized reward's scale, and GRPO's score for responses cut without EOS."""

import json
import math
from pathlib import Path

import pytest
import torch

from rlhf.config import LoraSettings, ModelSettings, load_config
from rlhf.losses import aggregate, kl_penalty
from rlhf.ops import KL_ESTIMATORS
from rlhf.pipeline import recipe, run_stage
from rlhf.policy import PolicyModel
from rlhf.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl-core-data")
    rows = [json.loads(x) for x in (ROOT / "data/demo/rl_prompts.jsonl").read_text().splitlines()]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["task"] == "add"][:8]))
    return d / "train.jsonl"


@pytest.fixture(scope="module")
def dropout_policy_dir(tmp_path_factory, policy_dir):
    """The nano policy with attention dropout 0.3: training-mode forwards are another function than eval ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("dropout-policy")
    model = AutoModelForCausalLM.from_pretrained(policy_dir, attention_dropout=0.3)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(path)
    return path


def _grpo(tmp_path, policy_dir, prompts_file, **overrides):
    base = {
        "output_dir": str(tmp_path / "out"), "model.path": str(policy_dir), "data.prompts": str(prompts_file),
        "rewards": [{"name": "short", "rule": "length_penalty", "params": {"max_words": 1}}],
        "sampling.n": 4, "sampling.max_new_tokens": 6, "rl.prompts_per_step": 2, "rl.micro_batch_size": 4,
        "train.max_steps": 1, "optim.lr": 1e-2, "reward.missing_eos_score": None, "eval.prompts": None,
        "samples_every": 0, "tracking.mode": "disabled",
    }
    run_stage("grpo", load_config(recipe("grpo").Config, None, {**base, **overrides}))
    return [r for r in read_metrics(tmp_path / "out") if "perf/update_seconds" in r]


# -- 1. k3 on padding ----------------------------------------------------------------------------------------------


def test_every_kl_estimator_is_zero_and_finite_on_masked_tokens_whatever_their_logprobs():
    # the stored reference log-probs are 0 on padding; the current ones there can be far below −88.7 at low temperature
    logp = torch.tensor([[-1.0, -2.0, -150.0, -400.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, False]])
    for name in KL_ESTIMATORS:
        kl = kl_penalty(logp, ref, name, response_mask=mask)
        assert torch.equal(kl[0, 2:], torch.zeros(2)), name
        loss = aggregate(kl, mask, "token_mean")
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all(), name
        assert torch.equal(logp.grad[0, 2:], torch.zeros(2)), name
        logp.grad = None
    # k3 by hand on the counting tokens, log r = ref − logp: −0.5 → e^−0.5 + 0.5 − 1 = 0.106531; 1 → e − 1 − 1 = 0.718282
    k3 = kl_penalty(logp.detach(), ref, "k3", response_mask=mask)
    assert k3[0, :2].tolist() == pytest.approx([0.106531, 0.718282], abs=1e-6)


def test_grpo_with_k3_trains_at_temperature_0_2_when_padding_is_improbable(tmp_path, policy_dir, prompts_file, monkeypatch):
    """One GRPO step at T = 0.2 with the default β and k3 on a policy whose log p(pad) / T is −150 (an SFT policy
    trained long puts pad far below −88.7 / T): before the estimators' inputs were masked, k3 on padding was
    exp(150) = inf, inf · 0 = NaN in the loss, and the step stopped with NonFiniteError."""
    temperature = 0.2
    original = PolicyModel.load.__func__

    def load(cls, *args, **kwargs):
        policy = original(cls, *args, **kwargs)
        pad, eos = policy.tokenizer.pad_token_id, policy.tokenizer.eos_token_id

        def improbable_pad(module, inputs, logits):
            logits = logits.clone()
            logits[..., pad] = -30.0
            # EOS with probability 1/4 at each step at T = 0.2, so that rows end early and carry padding
            others = logits.clone()
            others[..., eos] = -math.inf
            logits[..., eos] = temperature * (torch.logsumexp(others / temperature, -1) + math.log(1 / 3))
            return logits

        for model in (policy.model, policy.ref_model):
            model.get_output_embeddings().register_forward_hook(improbable_pad)
        return policy

    monkeypatch.setattr(PolicyModel, "load", classmethod(load))
    rows = _grpo(tmp_path, policy_dir, prompts_file, **{
        "sampling.temperature": temperature, "sampling.backend": "hf", "kl.estimator": "k3", "kl.beta": 0.04})
    assert rows[0]["train/truncated_frac"] < 1.0  # some rows ended early: there is padding to mask
    assert all(math.isfinite(rows[0][k]) for k in ("loss/total", "loss/kl", "train/grad_norm"))
    assert rows[0]["loss/kl"] == 0.0  # policy = reference at the first update


# -- 2. GRPO's dropout ------------------------------------------------------------------------------------------------


def test_grpo_trains_with_dropout_off_so_the_first_update_sees_the_sampling_policy(tmp_path, dropout_policy_dir,
                                                                                    prompts_file):
    # μ = 1: the first (only) update of step 1 has policy = reference, so the loss KL is exactly 0 in eval mode
    rows = _grpo(tmp_path / "a", dropout_policy_dir, prompts_file)
    assert rows[0]["loss/kl"] == 0.0
    # μ = 2: old log-probs are stored, computed in the first epoch's micro-batches, so the first ratio is exactly 1
    rows = _grpo(tmp_path / "b", dropout_policy_dir, prompts_file, **{"rl.epochs": 2})
    assert rows[0]["train/first_minibatch_ratio_mean"] == 1.0 and rows[0]["train/first_minibatch_approx_kl_old"] == 0.0
    # dropout left on: the update's forward is another function, so neither holds
    rows = _grpo(tmp_path / "c", dropout_policy_dir, prompts_file, **{"rl.epochs": 2, "disable_dropout": False})
    assert rows[0]["train/first_minibatch_ratio_mean"] != 1.0 and rows[0]["loss/kl"] != 0.0


# -- 3. the reference under LoRA is deterministic -------------------------------------------------------------------


def test_the_lora_reference_runs_in_eval_mode_whatever_mode_training_left(dropout_policy_dir):
    settings = ModelSettings(path=str(dropout_policy_dir), lora=LoraSettings(r=4, alpha=8, dropout=0.3))
    policy = PolicyModel.load(settings, device="cpu")
    rollout = policy.generate(["<add> 1+2=", "<add> 30+4="], n=2, max_new_tokens=5, seed=0)
    policy.model.train()
    with policy.reference() as ref:
        first = ref.forward(rollout).logprobs
    with policy.reference() as ref:
        second = ref.forward(rollout).logprobs
    assert torch.equal(first, second)
    assert policy.model.training  # the mode training had is back
    # the policy itself in training mode does drop out: the check above can fail
    assert not torch.equal(policy.forward(rollout).logprobs, policy.forward(rollout).logprobs)


# -- 4. minor: bf16 reference, a normalizer below 1, the critic's scale -----------------------------------------------


def test_the_bf16_reference_copy_runs_like_the_policy_so_the_first_kl_is_zero(tmp_path, policy_dir, prompts_file):
    rows = _grpo(tmp_path, policy_dir, prompts_file, **{"train.precision": "bf16", "rl.epochs": 2})
    assert rows[0]["train/kl"] == 0.0  # KL(π_old ‖ π_ref) of the first rollout, sampled before any update


def test_aggregate_divides_by_a_callers_normalizer_below_one():
    # one counting token over two processes: each divides its share by 1 / 2 (DDP then averages the gradients)
    loss = aggregate(torch.tensor([[3.0, 5.0]]), torch.tensor([[True, False]]), "token_mean", normalizer=0.5)
    assert loss.item() == 6.0
    assert aggregate(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool), "token_mean").item() == 0.0


def test_a_critic_from_an_unnormalized_reward_reads_values_on_its_weighted_scale(policy_dir, tmp_path):
    from rlhf.critic import CriticSettings, build_critic
    from reward_models.model import RewardModel
    from reward_models.scoring import RewardComponent

    torch.manual_seed(1)
    rm = RewardModel.from_backbone(str(policy_dir))
    rm.set_stats(torch.tensor([0.3, -0.1, 0.5, 0.1]), "test")
    rm.save(tmp_path / "rm")
    policy = PolicyModel.load(ModelSettings(path=str(policy_dir)), device="cpu")
    for normalize, expected in ((False, (2.0, 0.0)), (True, None)):
        component = RewardComponent(name="rm", model=str(tmp_path / "rm"), weight=2.0, normalize=normalize)
        critic = build_critic(CriticSettings(), policy, [component], ModelSettings(path=str(policy_dir)), {})
        stats = critic.module.rm.stats
        if expected is None:  # the scorer's weight · (score − mean) / std
            expected = (2.0 / stats["std"], -2.0 * stats["mean"] / stats["std"])
        assert (critic.module.scale, critic.module.shift) == pytest.approx(expected)


# -- 5. GRPO's score for responses cut without EOS --------------------------------------------------------------------


def test_grpo_gives_responses_cut_at_the_budget_the_fixed_score(tmp_path, policy_dir, prompts_file):
    # one new token: the untrained policy never stops there, so every row is truncated and scores −1, whatever the rule
    rows = _grpo(tmp_path, policy_dir, prompts_file, **{"sampling.max_new_tokens": 1, "reward.missing_eos_score": -1.0})
    assert rows[0]["train/truncated_frac"] == 1.0 and rows[0]["train/reward"] == -1.0
    assert rows[0]["reward/short"] > -1.0  # the rule itself scored them otherwise


# -- the shared bookkeeping -------------------------------------------------------------------------------------------


def test_metric_sums_add_loss_shares_and_average_rates_per_update():
    from rlhf.training import MetricSums

    sums = MetricSums()
    # update 1: two micro-batches; losses are shares (0.25 + 0.5 = 0.75), the rate is their mean (0.1 + 0.3) / 2 = 0.2
    sums.add({"loss/total": 0.25, "train/clip_frac": 0.1}, 0.5)
    sums.add({"loss/total": 0.5, "train/clip_frac": 0.3}, 0.5)
    assert sums.end_minibatch({"train/grad_norm": 2.0}) == pytest.approx(
        {"loss/total": 0.75, "train/clip_frac": 0.2, "train/grad_norm": 2.0})
    # update 2: one micro-batch; means over the two updates: (0.75 + 1.25) / 2 = 1, (0.2 + 0.4) / 2 = 0.3, (2 + 4) / 2 = 3
    sums.add({"loss/total": 1.25, "train/clip_frac": 0.4}, 1.0)
    sums.end_minibatch({"train/grad_norm": 4.0})
    assert sums.means() == pytest.approx({"loss/total": 1.0, "train/clip_frac": 0.3, "train/grad_norm": 3.0})
    assert sums.first_minibatch("train/clip_frac", "train/ratio_mean") == {"train/first_minibatch_clip_frac": 0.2}


def test_update_plan_covers_every_row_once_per_epoch_in_a_repeatable_order():
    from rlhf.config import RLSettings
    from rlhf.rollout import update_plan

    rl = RLSettings(prompts_per_step=2, epochs=2, minibatches=2, micro_batch_size=3)
    plan = update_plan(0, 5, 8, rl)
    assert len(plan) == 2 and all(len(epoch) == 2 for epoch in plan)
    for epoch in plan:  # 2 minibatches of 4 rows, each as micro-batches of 3 + 1
        assert [[len(m) for m in mb] for mb in epoch] == [[3, 1], [3, 1]]
        assert sorted(torch.cat([m for mb in epoch for m in mb]).tolist()) == list(range(8))
    again = update_plan(0, 5, 8, rl)
    assert all(torch.equal(a, b) for ea, eb in zip(plan, again) for ma, mb in zip(ea, eb) for a, b in zip(ma, mb))
    assert not torch.equal(torch.cat(plan[0][0]), torch.cat(plan[1][0]))  # each epoch reshuffles
