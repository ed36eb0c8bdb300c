"""Log-probabilities at real vocabulary sizes: chunked over positions, equal to the unchunked ones (values and
gradients), with no (B, T, V) tensor kept for backward."""

from __future__ import annotations

import pytest
import torch

from rlhf import ops
from rlhf.config import LoraSettings, ModelSettings
from rlhf.losses import token_nll
from rlhf.policy import PolicyModel, sequence_nll
from rlhf.types import Rollout


def _largest_saved_tensor(fn, *modules) -> int:
    """The most elements of one tensor that autograd saves for backward while `fn` runs, weights not counted."""
    weights = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    sizes = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_projected_logprobs_equal_the_full_logits_values_and_gradients(with_entropy):
    torch.manual_seed(0)
    b, t, h, v = 3, 7, 16, 50
    hidden = torch.randn(b, t, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False)
    ids = torch.randint(0, v, (b, t))
    weights = torch.randn(b, t)

    def full():
        logits = head(hidden)
        lp = ops.logprobs_from_logits(logits, ids, 0.7)
        return lp, ops.entropy_from_logits(logits, 0.7) if with_entropy else None

    def chunked():  # 4 positions per chunk: 6 chunks, the last one short
        return ops.projected_logprobs(hidden, head, ids, 0.7, with_entropy, chunk_elements=4 * v)

    results = []
    for fn in (full, chunked):
        hidden.grad, head.weight.grad = None, None
        lp, ent = fn()
        loss = (lp * weights).sum() + (ent.sum() if with_entropy else 0)
        loss.backward()
        results.append((lp.detach(), None if ent is None else ent.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for a, c in zip(*results):
        if a is not None:
            torch.testing.assert_close(c, a, rtol=0, atol=1e-5)
    assert _largest_saved_tensor(lambda: chunked()[0].sum(), head) < b * t * v
    assert _largest_saved_tensor(lambda: full()[0].sum(), head) >= b * t * v


def _rollout(policy: PolicyModel) -> Rollout:
    tok = policy.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("what is 2 + 3?", "say hi")]
    return policy.generate(prompts, n=2, max_new_tokens=6, seed=0)


@pytest.mark.parametrize("lora", [False, True])
def test_policy_forward_chunked_equals_unchunked(chat_model_dir, monkeypatch, lora):
    settings = ModelSettings(path=str(chat_model_dir), lora=LoraSettings(r=4, alpha=8) if lora else None)
    policy = PolicyModel.load(settings, device="cpu")
    rollout = _rollout(policy)
    results = []
    for limit in (10**12, 262 * 5):  # one pass through the model's logits; then chunks of 5 positions
        monkeypatch.setattr(ops, "LOGIT_CHUNK_ELEMENTS", limit)
        policy.model.zero_grad()
        out = policy.forward(rollout, temperature=0.9, with_entropy=True)
        (out.logprobs * rollout.response_mask).sum().backward()
        grads = [p.grad.clone() for p in policy.model.parameters() if p.requires_grad]
        results.append((out.logprobs.detach(), out.entropy.detach(), grads))
    (lp0, ent0, g0), (lp1, ent1, g1) = results
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=0, atol=1e-5)
    for a, c in zip(g0, g1):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


def test_sequence_nll_chunked_equals_token_nll(chat_model_dir, monkeypatch):
    policy = PolicyModel.load(ModelSettings(path=str(chat_model_dir)), device="cpu")
    ids = torch.tensor([[1, 70, 71, 72, 90, 2, 0], [1, 80, 81, 2, 0, 0, 0]])
    mask = ids != 0
    expected = token_nll(policy.model(input_ids=ids, attention_mask=mask.long()).logits, ids)
    monkeypatch.setattr(ops, "LOGIT_CHUNK_ELEMENTS", 262 * 4)
    got = sequence_nll(policy.model, ids, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert _largest_saved_tensor(lambda: sequence_nll(policy.model, ids, mask).sum(), policy.model) < ids[:, 1:].numel() * 262
    monkeypatch.setattr(ops, "LOGIT_CHUNK_ELEMENTS", 10**12)
    assert _largest_saved_tensor(lambda: sequence_nll(policy.model, ids, mask).sum(), policy.model) >= ids[:, 1:].numel() * 262


def test_grpo_one_step_on_the_chunked_path_keeps_ratio_one_and_kl_zero(tmp_path, chat_model_dir, monkeypatch):
    import json

    from rlhf.config import load_config
    from rlhf.pipeline import recipe, run_stage
    from rlhf.tracking import read_metrics

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {a} + 1?"}],
                                           "task": "chat_add", "meta": {"answer": a + 1}}) + "\n" for a in range(4)))
    monkeypatch.setattr(ops, "LOGIT_CHUNK_ELEMENTS", 262 * 5)  # every forward takes chunks of 5 positions
    run_stage("grpo", load_config(recipe("grpo").Config, None, {
        "output_dir": str(tmp_path / "out"), "model.path": str(chat_model_dir), "model.lora": {"r": 4, "alpha": 8},
        "data.prompts": str(prompts), "rewards": [{"name": "short", "rule": "length_penalty", "params": {"max_words": 1}}],
        "sampling.n": 4, "sampling.max_new_tokens": 6, "rl.prompts_per_step": 2, "rl.micro_batch_size": 4,
        "rl.epochs": 2, "train.max_steps": 1, "optim.lr": 1e-2, "kl.beta": 0.04, "eval.prompts": None,
        "samples_every": 0, "tracking.mode": "disabled"}))
    row = next(r for r in read_metrics(tmp_path / "out") if "perf/update_seconds" in r)
    assert row["train/first_minibatch_ratio_mean"] == 1.0 and row["train/first_minibatch_approx_kl_old"] == 0.0
    assert row["train/kl"] == 0.0 and torch.isfinite(torch.tensor(row["loss/total"]))
