"""Shared fixtures for the demo-world tests: one small generated data set and its tokenizer per session."""

import pytest

from rlhf.world.generate_data import SMALL, generate


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A miniature data set (``--small`` sizes) written once per test session; returns its directory."""
    out = tmp_path_factory.mktemp("world_small")
    generate(out, seed=0, sizes=SMALL)
    return out


@pytest.fixture(scope="session")
def tokenizer(small_data):
    """The tokenizer the miniature data set trained and saved."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(small_data / "tokenizer"))
