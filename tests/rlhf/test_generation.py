"""The fast sampler (`rlhf.generation`, `PolicyModel.generate(backend="fast")`) against Hugging Face's `generate`.

Greedy decoding is the anchor: token-identical to `model.generate` in fp32 on the demo models and on Llama / Qwen2
configs built from scratch (grouped-query attention, tied and untied embeddings, biases, left padding, rows that stop
at different steps). Sampling: transformers' warpers reproduced exactly, next-token frequencies match the model's
softmax (chi-square) for both backends and for bf16 mode, reproducible under a seed. These run the eager step (the
same function `torch.compile` captures); one test compiles it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from scipy.stats import chi2
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhf import generation
from rlhf.config import LoraSettings, ModelSettings
from rlhf.policy import PolicyModel, add_special_tokens, load_tokenizer
from rlhf.world import ACTION_TOKENS, build_tiny_lm

PROMPTS = ["<add> 12+30=", "<review> product: golden kettle with a lid", "<add> 7+5= steps:", "<add> 1+2="]


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    """The eager step (tests stay fast); `test_compiled_step_*` turns compiling on itself."""
    monkeypatch.setenv("RLHF_COMPILE", "0")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(Path(__file__).resolve().parents[2] / "data" / "demo" / "tokenizer"))


def demo_policy(tok, size: str) -> PolicyModel:
    model = build_tiny_lm(tok, size, seed=0)
    add_special_tokens(model, tok, ACTION_TOKENS)
    return PolicyModel(model.eval(), tok)


def scratch(kind: str, tok, **overrides):
    """A small randomly initialised Llama / Qwen2 for `tok`, with larger-than-default init (peakier distributions)."""
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.08, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    common.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "llama":
            return LlamaForCausalLM(LlamaConfig(**common)).eval()
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


def encode(tok, prompts):
    return PolicyModel(None, tok).encode_prompts(prompts)


def frequent_token(model, ids, mask, pad, steps=12) -> int:
    """A token greedy decoding emits often (after the first step): used as the stop token, so rows end at
    different steps."""
    out = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=steps, do_sample=False,
                         pad_token_id=pad, eos_token_id=None)[:, ids.size(1) + 1:]
    values, counts = out.flatten().unique(return_counts=True)
    return int(values[counts.argmax()])


def hf_greedy(model, ids, mask, n, max_new_tokens, eos, pad):
    out = model.generate(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0).long(),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out[:, ids.size(1):]


def fast_greedy_with_stats(model, ids, mask, n, max_new_tokens, eos, pad, **kw):
    return generation.sample(model, ids, mask, n=n, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                             greedy=True, **kw)


def fast_greedy(model, ids, mask, n, max_new_tokens, eos, pad, **kw):
    return fast_greedy_with_stats(model, ids, mask, n, max_new_tokens, eos, pad, **kw)[0]


# -- greedy: token-identical to model.generate ------------------------------------------------------------------


@pytest.mark.parametrize("size", ["nano", "tiny", "small"])
def test_greedy_rollout_is_identical_to_hf_on_the_demo_models(tok, size):
    policy = demo_policy(tok, size)
    fast = policy.generate(PROMPTS, n=2, max_new_tokens=20, greedy=True, backend="fast")
    hf = policy.generate(PROMPTS, n=2, max_new_tokens=20, greedy=True, backend="hf")
    assert fast.prompt_mask[0].sum() < fast.prompt_mask.size(1), "left padding is exercised"
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "ended", "lengths", "prompt_index"):
        assert torch.equal(getattr(fast, name), getattr(hf, name)), name
    assert fast.completions == hf.completions and fast.prompts == hf.prompts


SCRATCH = {
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-gqa-untied-bias-headdim": ("llama", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                                                    head_dim=24)),
    "llama-mqa-llama3-rope": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "qwen2-gqa-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-gqa-untied": ("qwen2", dict(tie_word_embeddings=False, num_hidden_layers=3)),
}


@pytest.mark.parametrize("name", list(SCRATCH))
@pytest.mark.parametrize("n", [1, 3])
def test_greedy_is_identical_to_hf_on_scratch_configs(tok, name, n):
    kind, overrides = SCRATCH[name]
    model = scratch(kind, tok, **overrides)
    assert generation.unsupported_reason(model) is None
    ids, mask = encode(tok, PROMPTS + ["<review> a much longer prompt about a kettle, a lid and a handle"])
    eos = frequent_token(model, ids, mask, tok.pad_token_id)  # rows stop at different steps
    expected = hf_greedy(model, ids, mask, n, 16, eos, tok.pad_token_id)
    got = fast_greedy(model, ids, mask, n, 16, eos, tok.pad_token_id)
    assert (expected == eos).any(), "some rows stop early"
    assert got.shape == expected.shape and torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_one_prompt_with_many_samples(tok, kind):
    model = scratch(kind, tok)
    ids, mask = encode(tok, ["<review> product: golden kettle"])
    eos = frequent_token(model, ids, mask, tok.pad_token_id)
    assert torch.equal(fast_greedy(model, ids, mask, 5, 12, eos, tok.pad_token_id),
                       hf_greedy(model, ids, mask, 5, 12, eos, tok.pad_token_id))
    sampled, _ = generation.sample(model, ids, mask, n=5, max_new_tokens=12, eos_token_id=eos,
                                   pad_token_id=tok.pad_token_id)
    assert sampled.shape[0] == 5


def test_stops_when_every_row_has_ended_and_pads_finished_rows(tok):
    model = scratch("llama", tok)
    ids, mask = encode(tok, PROMPTS)
    first = hf_greedy(model, ids, mask, 1, 1, None, tok.pad_token_id)[:, 0]
    out = fast_greedy(model, ids, mask, 1, 30, int(first[0]), tok.pad_token_id)
    row = out[0]
    assert row[0] == first[0] and (row[1:] == tok.pad_token_id).all(), "a finished row is fed padding"
    # every row ending at step 1 ends the loop at width 1
    for token in first.unique():
        stop = fast_greedy(model, ids[first == token], mask[first == token], 1, 30, int(token), tok.pad_token_id)
        assert stop.shape[1] == 1


def test_max_new_tokens_one_and_prompts_without_padding(tok):
    model = scratch("qwen2", tok)
    ids, mask = encode(tok, ["<add> 1+2=", "<add> 3+4="])
    assert mask.all()
    for budget in (1, 2, 17):
        assert torch.equal(fast_greedy(model, ids, mask, 2, budget, tok.eos_token_id, tok.pad_token_id),
                           hf_greedy(model, ids, mask, 2, budget, tok.eos_token_id, tok.pad_token_id))


def test_lora_samples_with_merged_adapters_and_leaves_the_model_untouched(nano_model_dir):
    policy = PolicyModel.load(ModelSettings(path=str(nano_model_dir), lora=LoraSettings(r=4, alpha=8)),
                              add_tokens=ACTION_TOKENS)
    with torch.no_grad():  # move the adapters (and the new tokens' rows) away from their identity initialisation
        for name, p in policy.model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_(0, 0.3)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    fast = policy.generate(PROMPTS, max_new_tokens=16, greedy=True, backend="fast")
    hf = policy.generate(PROMPTS, max_new_tokens=16, greedy=True, backend="hf")
    assert torch.equal(fast.response_ids, hf.response_ids)
    after = policy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "sampling never merges into the model itself"
    with policy.reference() as ref:  # adapters disabled: the base model
        assert torch.equal(ref.generate(PROMPTS, max_new_tokens=16, greedy=True, backend="fast").response_ids,
                           ref.generate(PROMPTS, max_new_tokens=16, greedy=True, backend="hf").response_ids)
        base = ref.generate(PROMPTS, max_new_tokens=16, greedy=True, backend="fast").response_ids
    assert not torch.equal(base, fast.response_ids), "the adapters change what is sampled"


# -- sampling ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8),
                                                       (1.3, 7, 0.9), (1.0, 1, 1.0), (1.0, 0, 0.01), (1.0, 1000, 1.0)])
def test_warpers_equal_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    logits[0, :5] = logits[0, 5]  # ties at the k-th score
    warpers = LogitsProcessorList(([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
                                  + ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    assert torch.equal(generation.warp_scores(logits, temperature, top_k, top_p), warpers(None, logits.clone()))


def test_draws_never_pick_a_removed_token_and_follow_the_probabilities():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")], [float("-inf")] * 3 + [0.0]])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        picks = torch.stack([generation.select_tokens(logits, greedy=False) for _ in range(4000)])
    assert set(picks[:, 0].tolist()) == {0, 2} and set(picks[:, 1].tolist()) == {3}
    share = (picks[:, 0] == 2).float().mean().item()
    assert abs(share - torch.tensor([0.0, 1.0]).softmax(0)[1].item()) < 0.03


def chi_square_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square of observed token counts against `probs`; bins with expected count < 5 are pooled."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    return float(chi2.sf(stat, int(keep.sum()) - 1))


@pytest.mark.parametrize("backend, bf16, temperature, top_k, top_p", [
    ("hf", False, 1.0, 0, 1.0), ("fast", False, 1.0, 0, 1.0), ("fast", True, 1.0, 0, 1.0),
    ("hf", False, 0.7, 20, 0.9), ("fast", False, 0.7, 20, 0.9), ("fast", True, 0.7, 20, 0.9)])
def test_next_token_frequencies_match_the_softmax(tok, backend, bf16, temperature, top_k, top_p):
    """For one prompt, the first sampled token over many samples follows softmax(warped logits) (chi-square,
    p > 0.001), also in bf16 mode (whose shift of the logits is far below what 6000 samples resolve)."""
    model = scratch("llama", tok, initializer_range=0.2)
    policy = PolicyModel(model, tok)
    prompt = "<add> 12+30="
    ids, mask = policy.encode_prompts([prompt])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, -1].float()
    probs = generation.warp_scores(logits, temperature, top_k, top_p).softmax(-1)[0]
    assert probs.max() < 0.5 and (probs > 0.01).sum() >= 10, "a spread-out distribution makes the test informative"
    samples = 6000
    rollout = policy.generate([prompt], n=samples, max_new_tokens=1, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=3, backend=backend, bf16=bf16)
    first = rollout.response_ids[:, 0]
    assert (probs[first] > 0).all(), "no removed token is ever drawn"
    assert chi_square_pvalue(first, probs) > 1e-3


def test_fast_sampling_is_reproducible_under_a_seed_and_leaves_the_global_rng_alone(tok):
    policy = demo_policy(tok, "nano")
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = policy.generate(PROMPTS, n=4, max_new_tokens=12, seed=7, backend="fast", top_p=0.9)
    assert torch.equal(torch.rand(1), expected)
    b = policy.generate(PROMPTS, n=4, max_new_tokens=12, seed=7, backend="fast", top_p=0.9)
    c = policy.generate(PROMPTS, n=4, max_new_tokens=12, seed=8, backend="fast", top_p=0.9)
    assert torch.equal(a.response_ids, b.response_ids) and a.completions == b.completions
    assert not torch.equal(a.response_ids, c.response_ids)


def test_sampled_rollouts_follow_the_response_rules(tok):
    """Response mask through the first EOS, padding after it, `ended` and `lengths` as `rollout_from_ids` defines."""
    model = scratch("llama", tok, initializer_range=0.2)
    policy = PolicyModel(model, tok)
    ids, mask = policy.encode_prompts(PROMPTS)
    stop = frequent_token(model, ids, mask, tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        raw, _ = generation.sample(model, ids, mask, n=8, max_new_tokens=24, eos_token_id=stop,
                                   pad_token_id=tok.pad_token_id, temperature=0.7)
    ended = (raw == stop).any(-1)
    assert ended.any() and not ended.all(), "some rows stop, some are truncated"
    for row in raw:
        hits = (row == stop).nonzero()
        if len(hits):
            assert (row[hits[0, 0] + 1:] == tok.pad_token_id).all()
    assert raw.shape[1] == 24 or ended.all()


# -- backends, fallbacks, compiling ------------------------------------------------------------------------------


def test_unsupported_models_fall_back_to_hf_with_one_warning(tok, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                          eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).eval()
    policy = PolicyModel(gpt2, tok)
    assert "gpt2" in generation.unsupported_reason(gpt2)
    generation._warned.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf.generation"):
        a = policy.generate(PROMPTS, max_new_tokens=6, greedy=True, backend="fast")
        policy.generate(PROMPTS, max_new_tokens=6, greedy=True, backend="fast")
    lines = [r for r in caplog.records if r.name == "rlhf.generation"]
    assert len(lines) == 1 and "Hugging Face" in lines[0].getMessage()
    assert torch.equal(a.response_ids, policy.generate(PROMPTS, max_new_tokens=6, greedy=True, backend="hf").response_ids)
    sliding = scratch("qwen2", tok, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "sliding" in generation.unsupported_reason(sliding)
    repetition = scratch("llama", tok)
    repetition.generation_config.repetition_penalty = 1.2
    assert "repetition_penalty" in generation.unsupported_reason(repetition)
    sharded = scratch("llama", tok)  # what FSDP / ZeRO-3 leave outside a forward pass: a flat shard, not the matrix
    sharded.model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(torch.zeros(10))
    assert "sharded" in generation.unsupported_reason(sharded)


def test_backend_setting(tok, monkeypatch):
    from rlhf.config import GenerationSettings, SamplingSettings

    assert SamplingSettings().backend == GenerationSettings().backend == generation.DEFAULT_BACKEND == "fast"
    monkeypatch.setenv("RLHF_SAMPLING_BACKEND", "hf")
    assert generation.default_backend() == "hf"
    with pytest.raises(ValueError, match="backend"):
        demo_policy(tok, "nano").generate(PROMPTS, backend="vllm")


def test_generate_returns_its_backends_stats_and_decides_the_fallback_once_per_model(tok, monkeypatch, caplog):
    model = scratch("llama", tok)
    ids, mask = encode(tok, PROMPTS)
    verdicts = []
    check = generation.unsupported_reason
    monkeypatch.setattr(generation, "unsupported_reason", lambda m: verdicts.append(m) or check(m))
    kw = dict(n=2, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, greedy=True)
    fast, fast_stats = generation.generate(model, ids, mask, backend="fast", **kw)
    generation.generate(model, ids, mask, backend="fast", **kw)
    hf, hf_stats = generation.generate(model, ids, mask, backend="hf", **kw)
    assert len(verdicts) == 1, "the fast sampler's checks run once per model"
    assert torch.equal(fast, hf) and fast.size(1) == fast_stats.steps == hf_stats.steps
    assert (fast_stats.backend, hf_stats.backend) == ("fast", "hf") and fast_stats.decode > 0 and hf_stats.decode > 0

    def sharded(*args, **kwargs):  # what FSDP does in place after the verdict: the weights are no longer matrices
        raise generation._Unsupported("layer 0 q_proj has sharded or partitioned weights")

    monkeypatch.setattr(generation, "_read_weights", sharded)
    generation._warned.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf.generation"):
        for _ in range(2):
            again, stats = generation.generate(model, ids, mask, backend="fast", **kw)
            assert stats.backend == "hf" and torch.equal(again, hf)
    assert len([r for r in caplog.records if r.name == "rlhf.generation"]) == 1 and len(verdicts) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name, n", [("nano", 2), ("qwen2-gqa-untied", 3)])
def test_compiled_step_is_greedy_identical(tok, name, n):
    """A real compile of the decode step per case: a few seconds with inductor's disk cache warm, 15-40 s cold on 2
    busy cores (hence `slow`)."""
    model = build_tiny_lm(tok, "nano", seed=0).eval() if name == "nano" else scratch(*SCRATCH[name][:1], tok, **SCRATCH[name][1])
    ids, mask = encode(tok, PROMPTS)
    eos = frequent_token(model, ids, mask, tok.pad_token_id) if name != "nano" else tok.eos_token_id
    expected = hf_greedy(model, ids, mask, n, 10, eos, tok.pad_token_id)
    compiled, stats = fast_greedy_with_stats(model, ids, mask, n, 10, eos, tok.pad_token_id, compile=True)
    assert generation.COMPILE.failed is None, generation.COMPILE.failed
    assert stats.compiled and torch.equal(compiled, expected)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(tok, monkeypatch, caplog):
    def broken():
        def step(*args):
            raise RuntimeError("no C++ compiler")
        return step

    model = build_tiny_lm(tok, "nano", seed=0).eval()
    ids, mask = encode(tok, PROMPTS)
    expected = hf_greedy(model, ids, mask, 2, 10, tok.eos_token_id, tok.pad_token_id)
    monkeypatch.setattr(generation, "compiled_decode_step", broken)
    monkeypatch.setattr(generation, "COMPILE", generation.CompileStats())
    generation._warned.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf.generation"):
        got = fast_greedy(model, ids, mask, 2, 10, tok.eos_token_id, tok.pad_token_id, compile=True)
        again, stats = fast_greedy_with_stats(model, ids, mask, 2, 10, tok.eos_token_id, tok.pad_token_id, compile=True)
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert "no C++ compiler" in generation.COMPILE.failed and not stats.compiled
    assert len([r for r in caplog.records if r.name == "rlhf.generation"]) == 1


def test_auto_compile_waits_until_a_bucket_has_cost_enough_eager_time(tok, monkeypatch):
    calls = []

    def counting():
        def step(*args):
            calls.append(1)
            return generation._decode_step(*args)
        return step

    model = build_tiny_lm(tok, "nano", seed=0).eval()
    ids, mask = encode(tok, PROMPTS)
    monkeypatch.setattr(generation, "compiled_decode_step", counting)
    monkeypatch.setattr(generation, "COMPILE", generation.CompileStats())
    monkeypatch.setenv("RLHF_COMPILE", "auto")
    monkeypatch.setenv("RLHF_COMPILE_AFTER_S", "0.05")
    expected, stats = fast_greedy_with_stats(model, ids, mask, 1, 8, tok.eos_token_id, tok.pad_token_id)
    assert not calls and not stats.compiled, "the first call of a bucket runs eagerly"
    while not calls:
        got, stats = fast_greedy_with_stats(model, ids, mask, 1, 8, tok.eos_token_id, tok.pad_token_id)
    assert stats.compiled and torch.equal(got, expected) and generation.COMPILE.compiles == 1
