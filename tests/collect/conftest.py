"""Shared fixtures for the collection app: fixed pair files (no model needed), configs, stores, a PostgreSQL server."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from rlhf.collect.settings import CollectConfig
from rlhf.config import validate

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_pairs(path: Path, n: int, seed: int = 0, extra: list[dict] | None = None) -> Path:
    """`n` demo-world addition pairs: one correct answer from "ckpt-good", one off-by-some from "ckpt-bad",
    stored in random A/B order (so A is not always right)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99) + i * 100  # distinct prompts
        prompt = f"<add> {a}+{b}="
        good, bad = f" {a + b}", f" {a + b + rng.choice([-11, -1, 1, 10])}"
        meta = {"a": a, "b": b, "answer": a + b, "format": "direct"}
        first_good = rng.random() < 0.5
        lines.append({
            "prompt": prompt,
            "response_a": good if first_good else bad,
            "response_b": bad if first_good else good,
            "source_a": "ckpt-good" if first_good else "ckpt-bad",
            "source_b": "ckpt-bad" if first_good else "ckpt-good",
            "task": "add",
            "meta": meta,
        })
    lines += extra or []
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def make_config(tmp_path: Path, **sections) -> CollectConfig:
    """A config serving fixed pairs from a file in `tmp_path`; `sections` replace top-level keys."""
    data = {
        "output_dir": str(tmp_path / "collect"),
        "pairs": {"file": str(write_pairs(tmp_path / "pairs.jsonl", 12)), "ready_ahead": 1000},
        "assignment": {"overlap": 2, "gold_rate": 0.0},
    }
    data.update(sections)
    return validate(CollectConfig, data, "test")


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'collect.db'}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server on 127.0.0.1 for this test session (scripts/start_postgres.sh); skips without binaries."""
    script = REPO / "scripts" / "start_postgres.sh"
    if shutil.which("bash") is None:
        pytest.skip("bash not available to run scripts/start_postgres.sh")
    proc = subprocess.run([str(script), "start", str(_free_port())], capture_output=True, text=True, timeout=120)
    if proc.returncode == 3:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql); CI installs them")
    if proc.returncode != 0:
        raise RuntimeError(f"could not start PostgreSQL: {proc.stderr.strip()}")
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    yield values["DATABASE_URL"]
    subprocess.run([str(script), "stop", values["PGDATA"]], capture_output=True, timeout=120)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's PostgreSQL server."""
    import psycopg

    name = f"t{random.randrange(10**9)}"
    admin_dsn = postgres_server.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request, tmp_path):
    """Each storage test runs on SQLite and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'collect.db'}"
    return request.getfixturevalue("postgres_url")


def artifacts_dir() -> Path:
    """Where browser screenshots go: $PYTEST_ARTIFACTS, else test-artifacts/ in the repository (git-ignored)."""
    path = Path(os.environ.get("PYTEST_ARTIFACTS", REPO / "test-artifacts")) / "collect"
    path.mkdir(parents=True, exist_ok=True)
    return path
