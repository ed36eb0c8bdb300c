"""Input that used to crash or pass silently is refused with one line naming the file:line and field, or the config
key: huge text fields, prompts longer than the model's context, YAML alias bombs, configs and records nested
thousands deep, seeds outside [0, 2³²), a dtype that is not one, `rlhf eval` with nothing to evaluate or a group_by
no record has, and a scalar where a section is expected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.config import load_config, parse_overrides
from rlhf.data import load_records, load_rl_prompts, tokenize_sft
from rlhf.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
BIG = 5 * 2**20  # characters: a text field no model context holds


def _jsonl(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


# ---------------------------------------------------------------------------------------------------------------
# Text past what any model reads is refused before a tokenizer sees it


def test_a_huge_text_field_is_refused_at_load_with_file_line_and_field(tmp_path):
    from reward_models.data import load_preferences

    ok = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = _jsonl(tmp_path / "pairs.jsonl", ok, {**ok, "chosen": "x" * BIG})
    with pytest.raises(UserError, match=rf"pairs.jsonl:2: field 'chosen' is {BIG:,} characters") as info:
        load_preferences(str(path))
    assert len(str(info.value)) < 300
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * BIG}]
    with pytest.raises(UserError, match=r"sft.jsonl:1: field 'messages.1.content' is"):
        load_records(_jsonl(tmp_path / "sft.jsonl", {"messages": messages}))


class _Spy:
    """A tokenizer that records the longest text it was asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_sft_never_tokenizes_text_far_longer_than_max_length(tokenizer):
    from rlhf.data import Record

    long = "word " * 20_000
    spy = _Spy(tokenizer)
    with pytest.raises(UserError, match=r"x.jsonl:3: prompt is 100,000 characters, far more than max_length=16"):
        tokenize_sft([Record.at({"prompt": long, "completion": "ok"}, "x.jsonl:3")], spy, 16)
    assert spy.longest < 2_000
    rows = [Record.at({"prompt": long, "completion": "ok"}, "x.jsonl:3"), Record.at({"prompt": "a", "completion": "b"}, "x.jsonl:4")]
    assert tokenize_sft(rows, spy, 16, skip_overlong_prompts=True)[1] == 1

    # a long completion is cut before tokenizing, to the same tokens as when it is tokenized whole
    spy = _Spy(tokenizer)
    (example,), _ = tokenize_sft([Record.at({"prompt": "<add> 1+1=", "completion": long}, "x.jsonl:1")], spy, 16)
    assert spy.longest < 2_000
    whole = tokenizer("<add> 1+1=").input_ids + tokenizer(long, add_special_tokens=False).input_ids
    assert example.input_ids == whole[:16] and len(example.input_ids) == 16


def test_rl_prompts_longer_than_the_context_minus_the_response_budget_are_refused(tmp_path, tokenizer):
    from rlhf.data import prompt_budget

    short, long = "<add> 1+2=", "<add> " + "1+" * 40 + "2="
    path = _jsonl(tmp_path / "prompts.jsonl", {"prompt": short}, {"prompt": long})
    n = len(tokenizer(long).input_ids)
    with pytest.raises(UserError, match=rf"prompts.jsonl:2: prompt is {n} tokens, more than the 30 a prompt may have"):
        load_rl_prompts(path, None, None, tokenizer, max_prompt_tokens=30)
    assert len(load_rl_prompts(path, None, None, tokenizer, max_prompt_tokens=n)) == 2
    spy = _Spy(tokenizer)  # text far past the budget is refused untokenized
    huge = _jsonl(tmp_path / "huge.jsonl", {"prompt": "1+" * 50_000})
    with pytest.raises(UserError, match=r"huge.jsonl:1: prompt is 100,000 characters, far more than the 30 tokens"):
        load_rl_prompts(huge, None, None, spy, max_prompt_tokens=30)
    assert spy.longest < 2_000

    class Config:
        max_position_embeddings = 64

    assert prompt_budget(Config(), 48) == 16 and prompt_budget(object(), 48) is None
    with pytest.raises(UserError, match=r"config key 'eval.generation.max_new_tokens' is 64, but the model's context is 64"):
        prompt_budget(Config(), 64, "eval.generation.max_new_tokens")


# ---------------------------------------------------------------------------------------------------------------
# YAML alias bombs and nesting


def _bomb(levels: int = 6) -> list[str]:
    lines = ["tracking:", "  run_config:", "    a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return lines


def test_a_yaml_alias_bomb_is_refused_with_a_short_line(tmp_path):
    from rlhf.recipes import sft

    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(_bomb() + [f"seed: *a{6}"]) + "\n")  # 9⁷ values once expanded
    with pytest.raises(UserError, match=r"bomb.yaml: YAML aliases expand to more than 100,000 values") as info:
        load_config(sft.Config, path)
    assert len(str(info.value)) < 300
    path.write_text("seed: &a [1, *a]\n")  # an alias inside its own anchor
    with pytest.raises(UserError, match=r"refers to a node that contains it \(under key 'seed'\)"):
        load_config(sft.Config, path)
    flow = "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
        f"&{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdef", "bcdefg")) + "]"
    with pytest.raises(UserError, match=r"override 'tracking.run_config.x': YAML aliases expand"):
        parse_overrides([f"tracking.run_config.x={flow}"])
    # anchors of ordinary size still work
    path.write_text("train: &t {max_steps: 3}\ntracking: {run_config: {again: *t}}\n")
    assert load_config(sft.Config, path).tracking.run_config == {"again": {"max_steps": 3}}


def test_the_cli_prints_one_short_line_for_an_alias_bomb(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(_bomb() + ["seed: *a6"]) + "\n")
    result = _cli("sft", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr) < 300 and result.stderr.count("\n") == 1


@pytest.mark.parametrize("depth", [60, 3000])
def test_configs_nested_deeply_are_refused(tmp_path, depth):
    from rlhf.recipes import sft

    path = tmp_path / "deep.yaml"
    path.write_text("tracking:\n  run_config:\n    x: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(UserError, match=r"deep.yaml: nested") as info:
        load_config(sft.Config, path)
    assert len(str(info.value)) < 200
    with pytest.raises(UserError, match=r"override 'tracking.run_config.x': nested"):
        parse_overrides(["tracking.run_config.x=" + "[" * depth + "]" * depth])


@pytest.mark.parametrize("depth", [60, 3000])
def test_records_nested_deeply_are_refused_with_file_and_line(tmp_path, depth):
    path = _jsonl(tmp_path / "deep.jsonl", {"prompt": "a"}, '{"prompt": "b", "meta": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(UserError, match=r"deep.jsonl:2: .*nested") as info:
        load_records(path)
    assert len(str(info.value)) < 200
    (tmp_path / "deep.json").write_text('[{"prompt": "b", "meta": ' + "[" * depth + "]" * depth + "}]")
    with pytest.raises(UserError, match=r"deep.json.*nested"):
        load_records(tmp_path / "deep.json")


# ---------------------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_a_seed_outside_0_to_2_pow_32_is_refused(seed):
    from rlhf.recipes import sft

    with pytest.raises(UserError, match=r"config key 'seed'"):
        load_config(sft.Config, None, {"seed": seed})
    assert load_config(sft.Config, None, {"seed": 2**32 - 1}).seed == 2**32 - 1


def test_a_bad_dtype_names_the_nearest_valid_one():
    from reward_models import train as reward
    from rlhf.recipes import sft

    with pytest.raises(UserError, match=r"config key 'model.dtype' .*'float32' or 'bfloat16' \(did you mean 'bfloat16'\?\); "
                                        r"got 'bfloat61'"):
        load_config(sft.Config, None, {"model.dtype": "bfloat61"})
    with pytest.raises(UserError, match=r"config key 'model.dtype' .*\(did you mean '(float32|bfloat16)'\?\); got 'bogus'"):
        load_config(reward.Config, None, {"model.dtype": "bogus"})


def test_a_scalar_where_a_section_is_expected_is_refused_whatever_the_overrides(tmp_path):
    from rlhf.recipes import sft

    path = tmp_path / "s.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(UserError, match=r"s.yaml: config key 'train' is 5, not a mapping of keys, so 'train.max_steps'"):
        load_config(sft.Config, path, {"train.max_steps": 3})
    path.write_text("model:\n  lora: null\n")  # null is an empty section an override may fill
    assert load_config(sft.Config, path, {"model.lora.r": 4}).model.lora.r == 4


# ---------------------------------------------------------------------------------------------------------------
# rlhf eval with nothing to evaluate


def _eval_cfg(tmp_path, **overrides):
    from rlhf.recipes import evaluate

    base = {"output_dir": str(tmp_path / "eval"), "tracking.mode": "disabled", "limit": 4,
            "generation.max_new_tokens": 2}
    return load_config(evaluate.Config, None, {**base, **overrides})


def test_eval_without_models_is_refused(tmp_path):
    from rlhf.pipeline import run_stage

    with pytest.raises(UserError, match=r"config key 'models' names no model"):
        run_stage("eval", _eval_cfg(tmp_path, models={}))
    result = _cli("eval", "models={}", f"output_dir={tmp_path / 'cli'}", "tracking.mode=disabled")
    assert result.returncode == 2 and result.stderr.startswith("error: config key 'models' names no model")


def test_eval_group_by_a_field_no_prompt_has_is_refused_before_any_model_loads(tmp_path, policy_dir, monkeypatch):
    from rlhf.pipeline import run_stage
    from rlhf.policy import PolicyModel

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(PolicyModel, "from_pretrained", no_load)
    cfg = _eval_cfg(tmp_path, models={"a": str(policy_dir)}, group_by=["meta.fromat"])
    with pytest.raises(UserError, match=r"config key 'group_by': no prompt of .*eval_prompts.jsonl has a field "
                                        r"'meta.fromat' \(did you mean 'meta.format'\?\)"):
        run_stage("eval", cfg)


def test_a_reward_components_bad_dtype_names_the_valid_ones():
    from rlhf.config import load_config
    from rlhf.errors import UserError
    from rlhf.pipeline import recipe

    with pytest.raises(UserError, match="rewards.0.dtype.*float32"):
        load_config(recipe("grpo").Config, None, {"rewards": [{"name": "rm", "model": "x", "dtype": "bogus"}]})
