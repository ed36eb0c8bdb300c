"""A tiny comparison, run once per session: GRPO (2 prompts × 4 samples a step) vs RLOO (4 × 4) × seeds 0 and 1 on a
budget of 32 samples, from a nano Llama, offline W&B; and the helpers that write comparison configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def artifacts_dir() -> Path:
    """Where screenshots go: $PYTEST_ARTIFACTS/compare, else test-artifacts/compare (git-ignored)."""
    path = Path(os.environ.get("PYTEST_ARTIFACTS", ROOT / "test-artifacts")) / "compare"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def compare_inputs(tmp_path_factory, tokenizer) -> Path:
    """Eight addition prompts to train on, four held-out ones, and a nano policy with the action tokens."""
    from rlhf.policy import add_special_tokens
    from rlhf.world import build_tiny_lm

    d = tmp_path_factory.mktemp("compare-inputs")
    rows = [json.loads(x) for x in (ROOT / "data/demo/rl_prompts.jsonl").read_text().splitlines()]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["task"] == "add"][:8]))
    evals = [json.loads(x) for x in (ROOT / "data/demo/eval_prompts.jsonl").read_text().splitlines()][:4]
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    tok = type(tokenizer).from_pretrained(str(ROOT / "data/demo/tokenizer"))
    model = build_tiny_lm(tok, "nano", seed=0)
    add_special_tokens(model, tok, ["<add>", "<review>"])
    model.save_pretrained(d / "policy")
    tok.save_pretrained(d / "policy")
    return d


def comparison_config(inputs: Path, out: Path, **changes) -> dict:
    """A tiny comparison: grpo 8 samples a step, rloo 16, budget 32 samples, eval every 16; `changes` replace
    top-level keys."""
    cfg = {
        "name": "tiny", "output_dir": str(out), "base": str(inputs / "policy"), "seeds": [0, 1],
        "budget": {"samples": 32}, "eval": {"every_samples": 16, "completions": 2},
        "best_of_n": {"max_n": 4, "prompts": 4},
        "shared": {
            "data.prompts": str(inputs / "train.jsonl"), "eval.prompts": str(inputs / "eval.jsonl"),
            # a length rule as well, so that rewards vary inside groups even for an untrained policy
            "rewards": [{"name": "correct", "rule": "verifiable"},
                        {"name": "short", "rule": "length_penalty", "params": {"max_words": 1}, "weight": 0.5}],
            "eval.rewards": [{"name": "gold", "rule": "verifiable"}],
            "sampling.max_new_tokens": 6, "eval.generation.max_new_tokens": 6, "eval.generation.samples": 0,
            "rl.micro_batch_size": 16, "optim.lr": 1.0e-2, "train.save_every": 1, "train.log_every": 1,
        },
        "tracking": {"mode": "offline", "project": "rlhf-test"},
        "algorithms": {
            "grpo": {"kind": "grpo", "overrides": {"loss.advantage": "grpo", "rl.prompts_per_step": 2, "sampling.n": 4}},
            "rloo": {"kind": "grpo", "overrides": {"loss.advantage": "rloo", "rl.prompts_per_step": 4, "sampling.n": 4}},
        },
    }
    cfg.update(changes)
    return cfg


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


@pytest.fixture(scope="session")
def tiny_comparison(tmp_path_factory, compare_inputs):
    """The tiny comparison, run through `rlhf compare` (offline W&B). Yields (config path, output dir, result)."""
    from rlhf.compare.runner import run_comparison

    d = tmp_path_factory.mktemp("compare")
    path = write_config(d / "tiny.yaml", comparison_config(compare_inputs, d / "out"))
    result = run_comparison(path)
    return path, d / "out", result
