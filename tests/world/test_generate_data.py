"""The data generator: determinism, file schemas, held-out eval prompts, mixed-quality demonstrations."""

import json
import statistics
import subprocess
import sys

from rlhf.world import ACTION_TOKENS, TASKS, gold_score
from rlhf.world.generate_data import FILES, SMALL, generate


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generator_is_deterministic(small_data, tmp_path):
    generate(tmp_path, seed=0, sizes=SMALL)
    for name in [*FILES, "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]:
        assert (small_data / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_seed_changes_the_data(small_data, tmp_path):
    generate(tmp_path, seed=1, sizes=SMALL)
    assert (small_data / "sft.jsonl").read_bytes() != (tmp_path / "sft.jsonl").read_bytes()


def test_cli_writes_the_same_files(small_data, tmp_path):
    subprocess.run([sys.executable, "-m", "rlhf.world.generate_data", "--out", str(tmp_path), "--small"],
                   check=True, capture_output=True)
    assert (small_data / "eval_prompts.jsonl").read_bytes() == (tmp_path / "eval_prompts.jsonl").read_bytes()


def test_schemas(small_data):
    for row in _read(small_data / "pretrain.jsonl"):
        assert set(row) == {"text"}
        assert not any(t in row["text"] for t in ACTION_TOKENS)
    for row in _read(small_data / "sft.jsonl"):
        assert set(row) == {"prompt", "completion", "task", "meta"}
        assert row["task"] in TASKS and row["prompt"].startswith(f"<{row['task']}>")
        assert row["completion"].startswith(" ") and not row["prompt"].endswith(" ")
    for row in _read(small_data / "sft_messages.jsonl"):
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["task"] in TASKS
    for name in ("rl_prompts.jsonl", "eval_prompts.jsonl"):
        for row in _read(small_data / name):
            assert set(row) == {"prompt", "task", "meta"}
    counts = {name: len(_read(small_data / name)) for name in FILES}
    assert counts["sft.jsonl"] == 2 * SMALL.sft_per_task
    assert counts["eval_prompts.jsonl"] == SMALL.eval_add + SMALL.eval_review


def _pair(meta):
    return min(meta["a"], meta["b"]), max(meta["a"], meta["b"])


def test_eval_prompts_are_held_out(small_data):
    evals = _read(small_data / "eval_prompts.jsonl")
    seen = _read(small_data / "sft.jsonl") + _read(small_data / "rl_prompts.jsonl")
    seen_prompts = {r["prompt"] for r in seen}
    seen_prompts |= {r["messages"][0]["content"] for r in _read(small_data / "sft_messages.jsonl")}
    assert not seen_prompts & {r["prompt"] for r in evals}
    # Addition: an eval operand pair never appears in any order, in any format, anywhere else.
    eval_pairs = {_pair(r["meta"]) for r in evals if r["task"] == "add"}
    assert len(eval_pairs) == SMALL.eval_add
    assert not eval_pairs & {_pair(r["meta"]) for r in seen if r["task"] == "add"}
    pretrain = (small_data / "pretrain.jsonl").read_text()
    for a, b in eval_pairs:
        assert f"{a:02d}+{b:02d}=" not in pretrain and f"{b:02d}+{a:02d}=" not in pretrain


def test_demonstrations_are_of_mixed_quality(small_data):
    rows = _read(small_data / "sft.jsonl")
    review = [gold_score(r["task"], r["prompt"], r["completion"], r["meta"]) for r in rows if r["task"] == "review"]
    add = [gold_score(r["task"], r["prompt"], r["completion"], r["meta"]) for r in rows if r["task"] == "add"]
    assert statistics.mean(review) < 0.7 and statistics.pstdev(review) > 0.15
    assert 0.7 < statistics.mean(add) < 1.0
