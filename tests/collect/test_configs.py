"""Every collect config loads into its schema, and documents every key with a comment above it."""

from pathlib import Path

import pytest

from rlhf.collect.settings import CollectConfig
from rlhf.config import load_config

from .conftest import REPO

CONFIGS = sorted((REPO / "configs" / "collect").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_is_commented(path: Path):
    cfg = load_config(CollectConfig, path)
    assert cfg.server.host == "127.0.0.1"
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")  # header: what it runs and how long
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#") and ":" in line:
            above = lines[i - 1].strip()
            assert above.startswith("#"), f"{path.name}: no comment above {line.strip()!r}"
