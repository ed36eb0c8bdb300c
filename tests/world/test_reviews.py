"""Hand cases for the review grammar and gold score, and robustness of every gold scorer to garbage."""

import random

import pytest

from rlhf.world import TASKS, gold_score, gold_scores, reviews

PROMPT = "<review> product: red kettle"
META = {"product": "kettle", "color": "red"}


def score(text):
    return gold_score("review", PROMPT, text, META)


def test_grammar_accepts_each_pattern_and_rejects_slips():
    ok = [
        "the kettle is great", "the legs are very good", "i love the lid", "it works well",
        "i would buy it again", "i would not buy it again", "the spout broke after a week",
        "i bought this kettle for my kitchen",
    ]
    for s in ok:
        assert reviews.parse_sentence(s.split()).ok, s
    bad = ["the kettle are great", "kettle the is great", "the kettle is", "i love the the", "great", "the legs is ok"]
    for s in bad:
        assert not reviews.parse_sentence(s.split()).ok, s


def test_perfect_review_scores_one():
    assert score(" the kettle is excellent . i love the lid . the handle is very great .") == pytest.approx(1.0)


def test_ordering_good_repetitive_broken_empty():
    good = score(" the kettle is great . i love the lid . the handle is very nice .")
    repetitive = score(" the kettle is great . the kettle is great . the kettle is great .")
    broken = score(" kettle the great is . lid the love i .")
    empty = score("")
    assert good > repetitive > broken > empty
    assert empty == -1.0


def test_sentiment_mentions_and_topic_move_the_score():
    assert score(" the kettle is great .") > score(" the kettle is terrible .")
    assert score(" the kettle is good . the lid is good .") > score(" it works well . it works okay .")
    # A sentence about another product's part is off topic and costs the score.
    assert score(" the kettle is good . the lid is good .") > score(" the kettle is good . the screen is good .")
    # A missing final full stop breaks the last sentence.
    assert score(" the kettle is good . the lid is good .") > score(" the kettle is good . the lid is good")


def test_length_is_moderate():
    three = " the kettle is good . the lid is good . the handle is good ."
    seven = three + " the spout is good . the base is good . it works well . i would buy it again ."
    assert score(three) > score(seven)
    assert score(three) > score(" the kettle is good .")


def test_scores_stay_in_range_on_demonstrations():
    rng = random.Random(0)
    for _ in range(500):
        product = rng.choice(reviews.PRODUCTS)
        text = reviews.write_review(rng, product, reviews.DEMO)
        assert text.startswith(" ")
        assert -1.0 <= reviews.gold_score(product, text) <= 1.0


GARBAGE = [
    "", " ", "\n\n", ".", " . . . .", "answer", "answer answer 1", "9" * 5000, "answer " + "9" * 5000,
    "<eos><pad>", "\x00\x01\ufffd", "日本語 テキスト", "the " * 300, "+=+=,,,", "-5", "1e10", "nan", "None",
]


@pytest.mark.parametrize("text", GARBAGE)
def test_garbage_never_crashes(text):
    for task, prompt, meta in [
        ("add", "<add> 47+38=", {"a": 47, "b": 38, "answer": 85, "format": "direct"}),
        ("add", "<add> 47+38= steps:", {"a": 47, "b": 38, "answer": 85, "format": "reason"}),
        ("review", PROMPT, META),
    ]:
        s = gold_score(task, prompt, text, meta)
        assert isinstance(s, float)
        assert -1.0 <= s <= 1.0


def test_random_byte_strings_never_crash():
    rng = random.Random(1)
    for _ in range(300):
        text = bytes(rng.randrange(256) for _ in range(rng.randrange(80))).decode("utf-8", errors="replace")
        for task in TASKS:
            prompt = "<add> 47+38=" if task == "add" else PROMPT
            gold_score(task, prompt, text, None)


def test_gold_scores_is_the_batched_gold_score():
    tasks = ["add", "review"]
    prompts = ["<add> 47+38=", PROMPT]
    comps = [" 085", " the kettle is good ."]
    metas = [None, META]
    assert gold_scores(tasks, prompts, comps, metas) == [gold_score(*x) for x in zip(tasks, prompts, comps, metas)]
    with pytest.raises(ValueError):
        gold_scores(tasks, prompts, comps[:1], metas)
    with pytest.raises(ValueError):
        gold_score("poem", "x", "y", {})
