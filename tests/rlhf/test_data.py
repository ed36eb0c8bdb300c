import json

import pytest

from rlhf.data import collate_sft, load_prompts, load_records, pack_corpus, require_fields, tokenize_sft
from rlhf.errors import UserError


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_parquet_and_saved_dataset_read_the_same(tmp_path):
    import datasets

    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": " d"}]
    jsonl = _write(tmp_path / "x.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "x.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in (jsonl, tmp_path / "x.parquet", tmp_path / "saved"):
        assert [dict(r) for r in load_records(source)] == rows
    assert load_records(jsonl)[1].origin == f"{jsonl}:2"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON"):
        load_records(path)


def test_missing_field_names_line_and_field(tmp_path, tokenizer):
    path = _write(tmp_path / "x.jsonl", [{"prompt": "a", "completion": " b"}, {"prompt": "a"}])
    with pytest.raises(UserError, match=r"x.jsonl:2: missing field 'completion'"):
        tokenize_sft(load_records(path), tokenizer, 32)
    with pytest.raises(UserError, match="field 'prompt' must be str"):
        require_fields(load_records(_write(tmp_path / "y.jsonl", [{"prompt": 3}]))[0], ["prompt"])


def test_empty_dataset_and_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="dataset is empty"):
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="data file not found"):
        load_records(tmp_path / "missing.jsonl")


def test_overlong_prompt_is_an_error_or_skipped_by_policy(tmp_path, tokenizer):
    rows = [{"prompt": "the kettle is great . " * 20, "completion": " ok"}, {"prompt": "hi", "completion": " ok"}]
    records = load_records(_write(tmp_path / "x.jsonl", rows))
    with pytest.raises(UserError, match=r"x.jsonl:1: prompt is \d+ tokens, max_length is 16 \(policy"):
        tokenize_sft(records, tokenizer, 16)
    examples, skipped = tokenize_sft(records, tokenizer, 16, skip_overlong_prompts=True)
    assert skipped == 1 and len(examples) == 1


def test_sft_tokenization_masks_prompt_and_appends_eos(tokenizer):
    records = load_records_from([{"prompt": "<add> 1+2=", "completion": " 3"}])
    (ex,), _ = tokenize_sft(records, tokenizer, 64)
    prompt_len = len(tokenizer("<add> 1+2=").input_ids)
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.input_ids[-1] == tokenizer.eos_token_id
    assert ex.completion_mask == [False] * prompt_len + [True] * (len(ex.input_ids) - prompt_len)
    batch = collate_sft([ex, ex], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["completion_mask"].shape == (2, len(ex.input_ids))


def test_conversational_messages_use_the_chat_template(tokenizer):
    messages = [{"role": "user", "content": "rate the kettle"}, {"role": "assistant", "content": "the kettle is great ."}]
    (ex,), _ = tokenize_sft(load_records_from([{"messages": messages}]), tokenizer, 128)
    completion = [t for t, m in zip(ex.input_ids, ex.completion_mask) if m]
    assert tokenizer.decode(completion[:-1]).strip() == "the kettle is great ."
    assert ex.input_ids.count(tokenizer.bos_token_id) == 1


def test_pack_corpus_makes_full_blocks(tokenizer):
    blocks = pack_corpus(load_records_from([{"text": "the kettle is great ."}] * 20), tokenizer, 16)
    assert blocks.shape[1] == 16 and blocks.shape[0] >= 1
    assert (blocks == tokenizer.eos_token_id).any()


def test_prompts_need_a_prompt_field(tmp_path):
    with pytest.raises(UserError, match="missing field 'prompt'"):
        load_prompts(_write(tmp_path / "p.jsonl", [{"task": "add"}]))


def load_records_from(rows):
    from rlhf.data import Record

    return [Record.at(r, f"mem:{i + 1}") for i, r in enumerate(rows)]
