"""Tokenizer contract: distinct specials, BOS added and EOS not, single-digit tokens, round trips, chat template."""

from transformers import AutoTokenizer

from rlhf.world import ACTION_TOKENS, train_tokenizer
from rlhf.world.tokenizer import CHAT_TEMPLATE

WORLD_TEXTS = [
    " the kettle is great . i love the lid .",
    "47+38= steps: 7+8=15, 4+3+1=08, answer 085",
    "<add> 07+38=",
    "product: navy kettle the legs are very flimsy",
    "  double  spaces and\nnewlines . ",
]


def test_special_tokens_are_distinct(tokenizer):
    ids = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    assert None not in ids
    assert len(set(ids)) == 4
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 256


def test_bos_is_added_and_eos_is_not(tokenizer):
    ids = tokenizer("the kettle is great .").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.eos_token_id not in ids
    assert tokenizer("the kettle", add_special_tokens=False).input_ids[0] != tokenizer.bos_token_id


def test_every_digit_is_its_own_token(tokenizer):
    for text in ["1234567890", " 085", "47+38=", "answer 198"]:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
        for t in tokens:
            assert not (any(c.isdigit() for c in t) and len(t) > 1), (text, tokens)


def test_decode_round_trips(tokenizer):
    for text in WORLD_TEXTS:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_prompt_plus_completion_tokenizes_as_its_halves(tokenizer):
    prompt, completion = "product: red kettle", " the kettle is great ."
    joint = tokenizer(prompt + completion).input_ids
    split = tokenizer(prompt).input_ids + tokenizer(completion, add_special_tokens=False).input_ids
    assert joint == split


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in WORLD_TEXTS:
        assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.pad_token_id == tokenizer.pad_token_id and loaded.eos_token_id == tokenizer.eos_token_id


def test_action_tokens_are_not_in_the_base_vocab_and_can_be_added(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)  # a copy: the session fixture stays unchanged
    vocab = tok.get_vocab()
    assert not any(t in vocab for t in ACTION_TOKENS)
    n = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ACTION_TOKENS})
    assert len(tok) == n + len(ACTION_TOKENS)
    ids = tok("<add> 47+38=").input_ids
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<add>")]


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "<add> 47+38="}, {"role": "assistant", "content": "085"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><|user|> <add> 47+38=\n<|assistant|> 085<eos>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><|user|> <add> 47+38=\n<|assistant|>"
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == " 085<eos>"


def test_training_is_deterministic():
    texts = [f"{i}+{i}= {2 * i} the kettle is great ." for i in range(200)]
    a, b = train_tokenizer(texts, vocab_size=300), train_tokenizer(texts, vocab_size=300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
