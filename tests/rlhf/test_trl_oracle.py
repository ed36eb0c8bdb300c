"""Oracle: our GRPO-family loss, its gradient and our group advantages equal what the installed TRL computes.

TRL's own code is driven, not copied: one `GRPOTrainer` is built on a tiny Llama (from config, no network), its
per-token log-prob method is patched to return the tensors given here, and `compute_loss` is called; for the
advantages, its generation and reward calls are patched and `_generate_and_score_completions` runs as in training.
Every attribute flipped between cases (`beta`, `loss_type`, `importance_sampling_level`, `scale_rewards`,
`num_generations`, `args.use_bias_correction_kl`) is read by TRL at call time, so one trainer serves every case.
"""

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import GRPOConfig, GRPOTrainer

from rlhf.advantages import group_normalized
from rlhf.losses import aggregate, clipped_surrogate, importance_ratio, kl_penalty
from rlhf.ops import masked_mean

# TRL loss_type -> our aggregation mode (bnpo and dapo differ only in which token count divides; see `normalizer`)
LOSS_TYPES = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"}
MAX_LEN = 7  # TRL's max_completion_length: Dr. GRPO divides by rows · this, not by the padded width
EPS_LOW, EPS_HIGH = 0.2, 0.28
ATOL = 1e-6


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("oracle-model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    args = GRPOConfig(output_dir=str(path / "out"), use_cpu=True, bf16=False, report_to=[], beta=0.04, num_generations=4,
                      per_device_train_batch_size=4, max_completion_length=MAX_LEN, epsilon=EPS_LOW, epsilon_high=EPS_HIGH)
    # β > 0 at construction so TRL builds its reference model (it wants the model as a path for that)
    trainer = GRPOTrainer(model=str(path), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a b"] * 4}), processing_class=tokenizer)
    trainer.model.train()  # TRL's "train" mode: its loss divides by the accumulation steps, set by Trainer's loop
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _batch():
    torch.manual_seed(1)  # a draw where the off-policy ratios clip both low (A < 0) and high (A > 0)
    B, T = 5, 5
    lengths = torch.tensor([5, 3, 1, 4, 0])  # ragged, and one row with nothing counting (a masked truncation)
    mask = torch.arange(T) < lengths.unsqueeze(1)
    logprobs = torch.randn(B, T) - 1.5
    return {
        "logprobs": logprobs,
        "old": logprobs + 0.3 * torch.randn(B, T),
        "ref": logprobs + 0.3 * torch.randn(B, T),
        "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9]),
        "mask": mask,
    }


def _trl_loss(trainer, monkeypatch, logprobs, data, on_policy, beta):
    mask = data["mask"].long()  # TRL's completion_mask is an integer tensor
    B, T = mask.shape
    # TRL computes log-probs from the model here; the patched method returns our tensor instead (graph intact)
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies",
                        lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None))
    inputs = {
        "prompt_ids": torch.full((B, 2), 5), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.full((B, T), 7), "completion_mask": mask,
        "advantages": data["advantages"],
        "num_items_in_batch": mask.sum(),  # dapo's normalizer: tokens of the whole generation batch
    }
    if not on_policy:  # TRL leaves it out on-policy and uses per_token_logps.detach()
        inputs["old_per_token_logps"] = data["old"]
    if beta:
        inputs["ref_per_token_logps"] = data["ref"]
    return trainer.compute_loss(trainer.model, inputs)


def _our_loss(logprobs, data, on_policy, beta, bias_correction, level, loss_type):
    old = logprobs.detach() if on_policy else data["old"]
    mask = data["mask"]
    loss_mat, metrics = clipped_surrogate(logprobs, old, data["advantages"], mask, EPS_LOW, EPS_HIGH, ratio_level=level)
    kl = None
    if beta:
        kl = kl_penalty(logprobs, data["ref"], "k3", importance_ratio(logprobs, old, mask, level) if bias_correction else None)
        loss_mat = loss_mat + beta * kl
    return aggregate(loss_mat, mask, LOSS_TYPES[loss_type], max_len=MAX_LEN), metrics, kl


CASES = [
    (loss_type, level, beta, on_policy, bias)
    for loss_type in LOSS_TYPES
    for level in ("token", "sequence")
    for on_policy in (True, False)
    for beta, bias in ((0.0, False), (0.04, False), (0.04, True))
]


@pytest.mark.parametrize("loss_type,level,beta,on_policy,bias_correction", CASES)
def test_loss_and_gradient_equal_trl(trainer, monkeypatch, loss_type, level, beta, on_policy, bias_correction):
    for name, value in {"loss_type": loss_type, "importance_sampling_level": level, "beta": beta}.items():
        monkeypatch.setattr(trainer, name, value)
    monkeypatch.setattr(trainer.args, "use_bias_correction_kl", bias_correction)
    trainer._metrics["train"].clear()
    data = _batch()

    theirs_lp = data["logprobs"].clone().requires_grad_()
    theirs = _trl_loss(trainer, monkeypatch, theirs_lp, data, on_policy, beta)
    (theirs_grad,) = torch.autograd.grad(theirs, theirs_lp)

    ours_lp = data["logprobs"].clone().requires_grad_()
    ours, metrics, kl = _our_loss(ours_lp, data, on_policy, beta, bias_correction, level, loss_type)
    (ours_grad,) = torch.autograd.grad(ours, ours_lp)

    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0), (ours.item(), theirs.item())
    assert torch.allclose(ours_grad, theirs_grad, atol=ATOL, rtol=0), (ours_grad - theirs_grad).abs().max()
    assert ours_grad.abs().sum() > 0

    logged = trainer._metrics["train"]
    if level == "token":  # TRL counts sequence-level clipping per row, we count per token
        assert abs(metrics["clip_frac_low"].item() - logged["clip_ratio/low_mean"][-1]) < ATOL
        assert abs(metrics["clip_frac_high"].item() - logged["clip_ratio/high_mean"][-1]) < ATOL
        assert abs(metrics["clip_frac"].item() - logged["clip_ratio/region_mean"][-1]) < ATOL
        if not on_policy:  # the case must exercise both clips, or it would not test them
            assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0
    if beta and level == "token":
        assert abs(masked_mean(kl, data["mask"]).item() - logged["kl"][-1]) < ATOL


@pytest.mark.parametrize("num_generations", [2, 4])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_normalized_equals_trl_advantages(trainer, monkeypatch, tokenizer, scale, num_generations):
    # groups of 4: {1, 0, 0, 1}, {.5 ×4} (zero variance), {2, -1, .3, .7}; groups of 2 include {.5, .5}
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.3, 0.7])
    B = rewards.numel()
    monkeypatch.setattr(trainer, "num_generations", num_generations)
    monkeypatch.setattr(trainer, "scale_rewards", scale)
    monkeypatch.setattr(trainer, "beta", 0.0)  # no reference forward needed for advantages
    eos = tokenizer.eos_token_id
    # _generate returns (prompt_ids, completion_ids, tool_mask, completions, sampling_logps, extra_fields, images, tool_images)
    monkeypatch.setattr(trainer, "_generate", lambda prompts: ([[5, 6]] * len(prompts), [[7, 8, eos]] * len(prompts), None,
                                                               ["x"] * len(prompts), None, {}, None, None))
    monkeypatch.setattr(trainer, "_calculate_rewards", lambda inputs, prompts, completions, ids: rewards.unsqueeze(1).clone())
    out = trainer._generate_and_score_completions([{"prompt": "a b"}] * B)

    # TRL groups consecutive rows of num_generations; our estimator takes the grouping explicitly
    ours = group_normalized(rewards, torch.arange(B) // num_generations, scale=scale)
    assert torch.allclose(ours, out["advantages"], atol=ATOL, rtol=0), (ours, out["advantages"])
    assert out["advantages"].abs().sum() > 0
