"""The chat tasks' gold scorers (hand-computed) and their data files."""

from __future__ import annotations

import json
import random

import pytest

from rlhf.world import gold_score
from rlhf.world.chat import add_answer_score, demo_review, generate, review_score


@pytest.mark.parametrize("text, expected", [("85", 1.0), ("47 + 38 = 85", 1.0), ("47 + 38 = 114", 0.0),
                                            ("The answer is 85.", 1.0), ("eighty-five", 0.0), ("", 0.0)])
def test_add_scores_the_last_integer(text, expected):
    assert add_answer_score(text, 85) == expected


def test_review_rubric_by_hand():
    # 5 words (< 25: length 5/25 = 0.2 -> 0.06), names the kettle (0.3), one part (0.1), positive 1 of 1 (0.2), ends
    assert review_score("kettle", "The kettle lid is great.") == pytest.approx(0.3 + 0.1 + 0.06 + 0.2)
    # no product, no part, 2 words (0.3 * 2/25), one negative word (-0.2), no final stop (-0.2)
    assert review_score("kettle", "really bad") == pytest.approx(0.024 - 0.2 - 0.2)
    assert review_score("kettle", "   ") == -1.0
    assert review_score("kettle", demo_review(random.Random(0), "kettle", "red")) == pytest.approx(1.0)


def test_gold_reads_the_prompt_when_meta_is_missing():
    assert gold_score("chat_add", "<|im_start|>user\nWhat is 40 + 2? Reply with just the number.", "42", {}) == 1.0
    prompt = "Write a short review of a red kettle."
    assert gold_score("chat_review", prompt, "The kettle is great.", {}) == review_score("kettle", "The kettle is great.")


def test_generated_files_keep_evaluation_items_out_of_training(tmp_path):
    counts = generate(tmp_path, sft_per_task=20, rl_per_task=20, eval_per_task=10)
    assert counts == {"sft.jsonl": 40, "rl_prompts.jsonl": 40, "eval_prompts.jsonl": 20}
    rows = {name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()] for name in counts}
    key = lambda r: json.dumps(r["meta"], sort_keys=True)  # noqa: E731
    held_out = {key(r) for r in rows["eval_prompts.jsonl"]}
    assert not held_out & {key(r) for r in rows["sft.jsonl"] + rows["rl_prompts.jsonl"]}
    demo = next(r for r in rows["sft.jsonl"] if r["task"] == "chat_add")
    assert demo["messages"][-1] == {"role": "assistant", "content": str(demo["meta"]["answer"])}
