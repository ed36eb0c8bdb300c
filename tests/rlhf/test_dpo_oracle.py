"""Oracle: our DPO-family losses and per-sequence log-probs equal what the installed TRL 1.16 `DPOTrainer` computes.

TRL's code is driven, not copied. TRL 1.16 has no standalone DPO loss function: the loss lives in
`DPOTrainer._compute_loss(model, inputs)`, which runs the model (its fused LM head returns per-token log-probs),
sums them over the completion mask, reads precomputed reference log-probs from the batch, and applies each
`loss_type`. So (1) a stand-in model returns the per-token log-probs given here and `_compute_loss` runs on them,
with `precompute_ref_logps` on and the reference log-probs in the batch; (2) on a tiny Llama, TRL's own tokenization,
collation and forward of two pairs give the per-sequence log-probs TRL logs (`logps/chosen`, `logps/rejected`) and
its loss, which our `tokenize_pairs` → `pair_rollout` → `PolicyModel.forward` path must reproduce.
Every attribute flipped between cases (`beta`, `loss_types`, `loss_weights`, `label_smoothing`,
`precompute_ref_logps`) is read by TRL at call time, so one trainer serves every case.
"""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

from rlhf.config import ModelSettings
from rlhf.losses import aggregate, dpo_loss
from rlhf.policy import PolicyModel
from rlhf.recipes.dpo import pair_rollout, sequence_logps, tokenize_pairs
from reward_models.data import PreferencePair

ATOL = 1e-6
# sums of up to ~20 float32 log-probs (|sum| up to ~150 here), computed under different padding: a few ulps apart
LOGPS_TOL = dict(atol=1e-6, rtol=1e-6)
PAIRS = [  # prompts and responses of different lengths, so padding differs between TRL's layout and ours
    {"prompt": "<review> product: red phone", "chosen": " the phone is nice .", "rejected": " the phone is terrible . it broke ."},
    {"prompt": "<add> 12+7=", "chosen": " 19", "rejected": " 18 because 12 plus 7 is 18"},
]


def _tiny(path, tokenizer, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer):
    """A tiny policy and a different tiny reference (another seed), so the log-ratios are not all zero."""
    root = tmp_path_factory.mktemp("dpo-oracle")
    return _tiny(root / "policy", tokenizer, 0), _tiny(root / "ref", tokenizer, 1)


@pytest.fixture(scope="module")
def trainer(dirs, tokenizer):
    policy_dir, ref_dir = dirs
    args = DPOConfig(output_dir=str(policy_dir / "out"), use_cpu=True, bf16=False, report_to=[], beta=0.1,
                     per_device_train_batch_size=len(PAIRS))
    ref = LlamaForCausalLM.from_pretrained(ref_dir)
    trainer = DPOTrainer(model=str(policy_dir), ref_model=ref, args=args, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tokenizer)
    trainer.model.train()
    return trainer


def _set(trainer, monkeypatch, **attrs):
    for name, value in attrs.items():
        monkeypatch.setattr(trainer, name, value)


# ---------------------------------------------------------------------------------------------------------------
# 1. The loss, for given per-sequence log-probs


def _logps():
    """Per-token policy log-probs of B = 3 pairs (ragged masks) and per-sequence reference log-probs."""
    torch.manual_seed(3)
    B, T = 3, 5
    chosen_len, rejected_len = torch.tensor([5, 2, 3]), torch.tensor([1, 4, 5])
    mask = torch.cat([torch.arange(T) < chosen_len[:, None], torch.arange(T) < rejected_len[:, None]])  # (2B, T)
    tokens = (torch.randn(2 * B, T) - 1.0) * mask
    ref = tokens.sum(-1) + 0.8 * torch.randn(2 * B)  # reference sequences log-probs near the policy's
    return tokens, mask, ref


def _trl_loss(trainer, tokens, mask, ref):
    """TRL's `_compute_loss` on a stand-in model whose fused head returns `tokens` at the completion positions."""
    B2, T = tokens.shape
    # one prompt token, then the T completion positions: TRL's shifted completion mask is then exactly `mask`
    completion_mask = torch.cat([torch.zeros(B2, 1, dtype=torch.long), mask.long()], dim=1)

    def model(**kwargs):  # what TRL's fused LM head returns: per-token fields over the shifted positions
        zeros = torch.zeros(B2, T)
        return SimpleNamespace(log_probs=tokens, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    inputs = {"input_ids": torch.full((B2, T + 1), 5), "attention_mask": torch.ones(B2, T + 1, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[: B2 // 2], "ref_rejected_logps": ref[B2 // 2:]}
    return trainer._compute_loss(model, inputs, False)


def _ours(tokens, mask, ref, beta, loss_type, eps=0.0, sft_weight=0.0):
    b = tokens.size(0) // 2
    seq, lengths = tokens.sum(-1), mask.sum(-1)
    loss, _ = dpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], beta, loss_type, eps,
                       chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])
    if sft_weight:
        loss = loss + sft_weight * aggregate(-tokens[:b], mask[:b], "token_mean")
    return loss


def _swap(tokens, ref):
    """The same pairs with chosen and rejected exchanged."""
    b = tokens.size(0) // 2
    return torch.cat([tokens[b:], tokens[:b]]), torch.cat([ref[b:], ref[:b]])


CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0),
         ("robust", 0.1, 0.1), ("robust", 0.5, 0.3)]


@pytest.mark.parametrize("loss_type,beta,eps", CASES)
def test_loss_and_gradient_equal_trl(trainer, monkeypatch, loss_type, beta, eps):
    _set(trainer, monkeypatch, precompute_ref_logps=True, loss_types=[loss_type], loss_weights=[1.0], beta=beta,
         label_smoothing=eps)
    tokens, mask, ref = _logps()
    theirs_in = tokens.clone().requires_grad_()
    theirs = _trl_loss(trainer, theirs_in * mask, mask, ref)
    (theirs_grad,) = torch.autograd.grad(theirs, theirs_in)
    ours_in = tokens.clone().requires_grad_()
    ours = _ours(ours_in * mask, mask, ref, beta, loss_type, eps)
    (ours_grad,) = torch.autograd.grad(ours, ours_in)
    assert abs(ours.item() - theirs.item()) < ATOL, (ours.item(), theirs.item())
    assert torch.allclose(ours_grad, theirs_grad, atol=ATOL, rtol=0)
    assert ours_grad.abs().sum() > 0


@pytest.mark.parametrize("eps", [0.05, 0.25])
def test_conservative_dpo_equals_trl_sigmoid_on_the_pair_and_its_swap(trainer, monkeypatch, eps):
    # TRL 1.16's "sigmoid" has no label smoothing; cDPO is (1 − ε)·DPO(pairs) + ε·DPO(swapped pairs), both TRL's
    _set(trainer, monkeypatch, precompute_ref_logps=True, loss_types=["sigmoid"], loss_weights=[1.0], beta=0.2,
         label_smoothing=0.0)
    tokens, mask, ref = _logps()
    swapped_tokens, swapped_ref = _swap(tokens, ref)
    swapped_mask = _swap(mask, ref)[0]
    theirs = (1 - eps) * _trl_loss(trainer, tokens, mask, ref) + eps * _trl_loss(trainer, swapped_tokens, swapped_mask,
                                                                                swapped_ref)
    ours = _ours(tokens, mask, ref, 0.2, "sigmoid", eps)
    assert abs(ours.item() - theirs.item()) < ATOL, (ours.item(), theirs.item())


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_sft_term_equals_trl_rpo(trainer, monkeypatch, alpha):
    # RPO in TRL 1.16: loss_type=["sigmoid", "sft"], loss_weights=[1, α]; its "sft" is the chosen tokens' mean NLL
    _set(trainer, monkeypatch, precompute_ref_logps=True, loss_types=["sigmoid", "sft"], loss_weights=[1.0, alpha],
         beta=0.1, label_smoothing=0.0)
    tokens, mask, ref = _logps()
    theirs_in = tokens.clone().requires_grad_()
    theirs = _trl_loss(trainer, theirs_in * mask, mask, ref)
    (theirs_grad,) = torch.autograd.grad(theirs, theirs_in)
    ours_in = tokens.clone().requires_grad_()
    ours = _ours(ours_in * mask, mask, ref, 0.1, "sigmoid", sft_weight=alpha)
    (ours_grad,) = torch.autograd.grad(ours, ours_in)
    assert abs(ours.item() - theirs.item()) < ATOL, (ours.item(), theirs.item())
    assert torch.allclose(ours_grad, theirs_grad, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# 2. Per-sequence log-probs of real pairs on a tiny model (TRL: right-padded [prompt + response]; ours: left-padded
#    prompts, right-padded responses, position ids from the mask)


def test_sequence_logps_and_loss_on_a_tiny_model_equal_trl(trainer, monkeypatch, dirs, tokenizer):
    _set(trainer, monkeypatch, precompute_ref_logps=False, loss_types=["sigmoid"], loss_weights=[1.0], beta=0.1,
         label_smoothing=0.0)
    trainer._metrics["train"].clear()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    theirs = trainer._compute_loss(trainer.model, batch, False)
    logged = trainer._metrics["train"]

    policy_dir, ref_dir = dirs
    policy = PolicyModel.load(ModelSettings(path=str(policy_dir), ref_path=str(ref_dir)), with_reference=True,
                              device="cpu")
    pairs = [PreferencePair(p["prompt"], p["chosen"], p["rejected"]) for p in PAIRS]
    tokens, _ = tokenize_pairs(pairs, policy.tokenizer, max_length=128)
    rollout = pair_rollout(tokens, policy.tokenizer.pad_token_id)
    # the same token ids as TRL's: prompt (with BOS) + response + EOS, per sequence
    for row, (ids, completion) in enumerate(zip(batch["input_ids"], batch["completion_mask"])):
        n = int(batch["attention_mask"][row].sum())
        ours_ids = torch.cat([rollout.prompt_ids[row][rollout.prompt_mask[row]],
                              rollout.response_ids[row][rollout.response_mask[row]]])
        assert ours_ids.tolist() == ids[:n].tolist()
        assert int(rollout.response_mask[row].sum()) == int(completion.sum())

    with torch.no_grad():
        logps, _ = sequence_logps(policy, rollout)
        with policy.reference() as reference:
            ref, _ = sequence_logps(reference, rollout)
        # TRL's per-sequence log-probs of a padded batch (its reference pass, run with either model)
        theirs_logps = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
        theirs_ref = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))
    assert torch.allclose(logps, theirs_logps, **LOGPS_TOL), logps - theirs_logps
    assert torch.allclose(ref, theirs_ref, **LOGPS_TOL), ref - theirs_ref
    b = len(PAIRS)
    assert logps[:b].mean().item() == pytest.approx(logged["logps/chosen"][-1], abs=1e-6, rel=1e-6)
    assert logps[b:].mean().item() == pytest.approx(logged["logps/rejected"][-1], abs=1e-6, rel=1e-6)
    ours, _ = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], 0.1)
    assert abs(ours.item() - theirs.item()) < ATOL, (ours.item(), theirs.item())
    assert (logps - ref).abs().min() > 1e-3, "the reference must differ from the policy for this to test it"
