"""Rule-based rewards: built-ins, user functions by import path, and the checks on what a rule returns."""

import sys

import pytest

from rlhf.errors import UserError
from reward_models.rules import apply_rule, resolve_rule

ADD = {"task": "add", "meta": {"a": 47, "b": 38, "answer": 85, "format": "reason"}}
REVIEW = {"task": "review", "meta": {"product": "kettle", "color": "red"}}


def call(rule: str, completions, metadata=None, prompts=None, **params):
    metadata = metadata or [{} for _ in completions]
    prompts = prompts or ["p"] * len(completions)
    return apply_rule(rule, resolve_rule(rule), prompts, completions, metadata, params)


def test_verifiable_uses_the_world_gold_scorers_and_can_be_limited_to_tasks():
    prompts = ["<add> 47+38= steps:", "<add> 47+38= steps:", "<review> product: red kettle"]
    completions = [" 7+8=15, 4+3+1=8, answer 85", " 7+8=15, 4+3+1=8, answer 84", " the kettle is great ."]
    scores = call("verifiable", completions, [ADD, ADD, REVIEW], prompts)
    assert scores[:2] == [1.0, 0.0] and scores[2] > 0
    assert call("verifiable", completions, [ADD, ADD, REVIEW], prompts, tasks=["add"])[2] == 0.0
    with pytest.raises(UserError, match="needs a 'task' field"):
        call("verifiable", [" 1"], [{}])


def test_exact_match_with_and_without_pattern():
    meta = [{"answer": 85}, {"meta": {"answer": 85}}, {"answer": 85}]
    assert call("exact_match", [" 85 ", "85", " 58"], meta) == [1.0, 1.0, 0.0]
    got = call("exact_match", [" steps answer 85", "answer 8 then answer 85", "no answer"], meta, pattern=r"answer\s*(\d+)")
    assert got == [1.0, 1.0, 0.0]
    with pytest.raises(UserError, match="needs a 'answer' field"):
        call("exact_match", [" 1"], [{}])


def test_format_length_repetition_and_missing_eos():
    assert call("format", ["<answer>4</answer>", "4"]) == [1.0, 0.0]
    assert call("format", [" 7+8=15, answer 85", " 85"], pattern=r"\d\+\d.*answer \d+") == [1.0, 0.0]
    assert call("format", [" answer 85 extra"], pattern=r"answer \d+", full=True) == [0.0]
    assert call("length_penalty", ["a b c", "a b c d e f"], max_words=3) == [0.0, -1.0]
    # 6 words -> 4 trigrams, of which "a b c" appears twice... (a b c, b c a, c a b, a b c): 1 repeat of 4
    assert call("repetition_penalty", ["a b c a b c", "x y z w", "short"]) == [-0.25, 0.0, 0.0]
    assert call("missing_eos", ["x", "y"], [{"ended": True}, {"ended": False}]) == [0.0, -1.0]
    with pytest.raises(UserError, match="needs to know whether each completion ended"):
        call("missing_eos", ["x"])


def test_user_function_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, metadata, limit=3):\n"
        "    return [1.0 if len(c.split()) <= limit else 0.0 for c in completions]\n"
        "def broken(prompts, completions, metadata):\n"
        "    return [1.0]\n"
        "def nan(prompts, completions, metadata):\n"
        "    return [float('nan') for _ in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    assert call("my_rewards:brevity", ["a b", "a b c d"]) == [1.0, 0.0]
    assert call("my_rewards:brevity", ["a b", "a b c d"], limit=5) == [1.0, 1.0]
    with pytest.raises(UserError, match="returned 1 scores for 2 completions"):
        call("my_rewards:broken", ["a", "b"])
    with pytest.raises(UserError, match="non-finite"):
        call("my_rewards:nan", ["a"])
    with pytest.raises(UserError, match="bad params"):
        call("my_rewards:brevity", ["a"], nope=1)
    with pytest.raises(UserError, match="has no function 'missing'"):
        resolve_rule("my_rewards:missing")
    with pytest.raises(UserError, match="cannot import module"):
        resolve_rule("no_such_module_xyz:f")


def test_unknown_builtin_suggests_the_nearest():
    with pytest.raises(UserError, match="did you mean 'format'"):
        resolve_rule("formatt")
