import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.config import LoraSettings, ModelSettings
from rlhf.errors import UserError
from rlhf.policy import PolicyModel

PROMPTS = ["<add> 12+30=", "<review> product: kettle"]


@pytest.fixture()
def policy(nano_model_dir):
    return PolicyModel.load(ModelSettings(path=str(nano_model_dir)), add_tokens=["<add>", "<review>"], with_reference=True)


def naive_logprobs(model, rollout):
    """Full forward over prompt + response, log_softmax over the whole vocabulary, gather."""
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.response_mask], 1).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    p = rollout.prompt_ids.size(1)
    logp = torch.log_softmax(logits[:, p - 1:-1].float(), -1)
    return logp.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)


def test_generate_returns_a_consistent_rollout(policy):
    r = policy.generate(PROMPTS, n=3, max_new_tokens=12, seed=0)
    assert len(r) == 6 and r.prompts[:3] == [PROMPTS[0]] * 3 and r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.prompt_ids.shape == r.prompt_mask.shape and r.response_ids.shape == r.response_mask.shape
    assert not r.prompt_mask[:, -1].logical_not().any(), "prompts are left-padded"
    eos, pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    for row, mask, ended, length in zip(r.response_ids, r.response_mask, r.ended, r.lengths):
        assert mask.sum() == length
        assert (row[~mask] == pad).all(), "tokens after the first EOS are padding"
        assert bool(ended) == bool((row[mask] == eos).any())
        if ended:
            assert row[length - 1] == eos, "the EOS itself counts"


def test_eos_masking_on_crafted_ids(policy):
    eos, pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    prompt_ids, prompt_mask = policy.encode_prompts(["<add> 1+1="])
    raw = torch.tensor([[20, eos, 21, eos, 22]])
    r = policy.rollout_from_ids(prompt_ids, prompt_mask, raw, ["<add> 1+1="])
    assert r.response_mask.tolist() == [[True, True, False, False, False]]
    assert r.response_ids.tolist() == [[20, eos, pad, pad, pad]]
    assert r.ended.tolist() == [True] and r.lengths.tolist() == [2]
    assert r.completions == [policy.tokenizer.decode([20])], "text drops the EOS and everything after it"
    truncated = policy.rollout_from_ids(prompt_ids, prompt_mask, torch.tensor([[20, 21]]), ["<add> 1+1="])
    assert truncated.ended.tolist() == [False] and truncated.completions == [policy.tokenizer.decode([20, 21])]


def test_generate_is_reproducible_under_a_seed_and_leaves_global_rng_alone(policy):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = policy.generate(PROMPTS, n=2, max_new_tokens=10, seed=7)
    after = torch.rand(1)
    b = policy.generate(PROMPTS, n=2, max_new_tokens=10, seed=7)
    assert torch.equal(a.response_ids, b.response_ids) and a.completions == b.completions
    assert torch.equal(before, after)


def test_logprobs_equal_naive_log_softmax_and_gather(policy):
    r = policy.generate(PROMPTS, n=2, max_new_tokens=10, seed=0)
    with torch.no_grad():
        out = policy.forward(r, with_entropy=True)
        naive = naive_logprobs(policy.model, r)
    m = r.response_mask
    assert torch.allclose(out.logprobs[m], naive[m], atol=1e-5)
    assert out.entropy.shape == out.logprobs.shape and (out.entropy[m] >= 0).all()


def test_logprobs_are_padding_invariant(policy):
    """The same prompt/response scores the same alone and next to a longer prompt (more left padding)."""
    r = policy.generate(["<add> 1+2=", "<review> product: golden kettle with a lid"], max_new_tokens=8, seed=1)
    alone = policy.generate(["<add> 1+2="], max_new_tokens=8, seed=1)
    assert r.prompt_mask[0].sum() < r.prompt_mask.size(1), "first prompt must be padded in the batch"
    # score row 0's response again in a batch of one with no padding
    from rlhf.types import Rollout

    single = Rollout(
        prompt_ids=alone.prompt_ids, prompt_mask=alone.prompt_mask,
        response_ids=r.response_ids[:1], response_mask=r.response_mask[:1],
        ended=r.ended[:1], lengths=r.lengths[:1], prompt_index=r.prompt_index[:1],
    )
    with torch.no_grad():
        batched, solo = policy.logprobs(r)[0], policy.logprobs(single)[0]
    m = r.response_mask[0]
    assert torch.allclose(batched[m], solo[m], atol=1e-5)


def test_reference_is_a_frozen_copy_without_lora(policy):
    r = policy.generate(PROMPTS, max_new_tokens=8, seed=0)
    with policy.reference() as ref:
        before = ref.logprobs(r)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05)
    with policy.reference() as ref:
        assert torch.equal(ref.logprobs(r), before)
    assert not torch.allclose(policy.logprobs(r).detach(), before)


def test_lora_reference_equals_the_base_model(nano_model_dir):
    base = AutoModelForCausalLM.from_pretrained(nano_model_dir)
    lora = PolicyModel.load(ModelSettings(path=str(nano_model_dir), lora=LoraSettings(r=4, alpha=8)))
    assert lora.ref_model is None, "LoRA keeps no second copy"
    with torch.no_grad():  # move the adapters away from their identity initialisation
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    r = lora.generate(PROMPTS, max_new_tokens=8, seed=0)
    with torch.no_grad():
        expected = naive_logprobs(base, r)
        with lora.reference() as ref:
            got = ref.logprobs(r)
        adapted = lora.logprobs(r)
    m = r.response_mask
    assert torch.allclose(got[m], expected[m], atol=1e-5)
    assert not torch.allclose(adapted[m], expected[m], atol=1e-3)


def test_value_head_gives_one_value_per_response_token(nano_model_dir):
    policy = PolicyModel.load(ModelSettings(path=str(nano_model_dir), value_head=True))
    r = policy.generate(PROMPTS, max_new_tokens=6, seed=0)
    out = policy.forward(r, with_values=True)
    assert out.values.shape == r.response_ids.shape
    out.values.sum().backward()
    assert policy.value_head.weight.grad is not None


def test_save_adapter_and_merged_model(tmp_path, nano_model_dir):
    lora = PolicyModel.load(ModelSettings(path=str(nano_model_dir), lora=LoraSettings(r=4)), add_tokens=["<add>"])
    with torch.no_grad():
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    r = lora.generate(PROMPTS, max_new_tokens=6, seed=0)
    expected = lora.logprobs(r).detach()
    lora.save(tmp_path / "adapter")
    lora.save(tmp_path / "merged", merged=True)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(naive_logprobs(merged, r)[r.response_mask], expected[r.response_mask], atol=1e-5)
    # an adapter directory loads as base + adapter
    reloaded = PolicyModel.from_pretrained(str(tmp_path / "adapter"))
    assert torch.allclose(reloaded.logprobs(r).detach()[r.response_mask], expected[r.response_mask], atol=1e-5)


def test_missing_model_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        PolicyModel.from_pretrained(str(tmp_path / "nope"))


def test_scratch_models_come_from_the_world_not_the_engine(repo_root):
    from rlhf.world import scratch_builder

    settings = ModelSettings(scratch_size="nano", tokenizer=str(repo_root / "data/demo/tokenizer"))
    with pytest.raises(UserError, match="only the pretrain and sft stages"):
        PolicyModel.load(settings, device="cpu")
    policy = PolicyModel.load(settings, device="cpu", build=scratch_builder("nano"))
    assert policy.model.config.hidden_size == 64
    with pytest.raises(UserError, match="'huge' is not one of nano, tiny, small"):
        scratch_builder("huge")
