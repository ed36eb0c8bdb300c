"""build_tiny_lm: config from the tokenizer, determinism, save/load round trip."""

import torch
from transformers import AutoModelForCausalLM

from rlhf.world import MODEL_SIZES, build_tiny_lm


def test_config_follows_tokenizer(tokenizer):
    model = build_tiny_lm(tokenizer, "nano")
    cfg = model.config
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert cfg.max_position_embeddings == 256
    assert sum(p.numel() for p in model.parameters()) < 300_000


def test_sizes_are_ordered(tokenizer):
    counts = {s: sum(p.numel() for p in build_tiny_lm(tokenizer, s).parameters()) for s in ("nano", "tiny")}
    assert counts["nano"] < counts["tiny"] < 1_500_000
    assert set(MODEL_SIZES) == {"nano", "tiny", "small"}


def test_seed_determines_weights_and_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_lm(tokenizer, "nano", seed=5)
    assert torch.equal(torch.rand(1), expected)
    b = build_tiny_lm(tokenizer, "nano", seed=5)
    c = build_tiny_lm(tokenizer, "nano", seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_save_load_round_trip_gives_equal_logits(tokenizer, tmp_path):
    model = build_tiny_lm(tokenizer, "nano").eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokenizer(["<add> 47+38= steps:", "product: red kettle"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, loaded(**ids).logits)


def test_generate_runs_after_adding_action_tokens(tokenizer):
    model = build_tiny_lm(tokenizer, "nano")
    model.resize_token_embeddings(len(tokenizer) + 2)  # what SFT does when it adds ACTION_TOKENS
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) + 2
    ids = tokenizer(["47+38="], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    n = ids.input_ids.shape[1]
    assert torch.equal(out[:, :n], ids.input_ids) and n < out.shape[1] <= n + 5
