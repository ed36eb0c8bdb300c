"""Shared fixtures: the demo world's tokenizer and tiny models built from config, saved like hub checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# one thread per test process: torch's OpenMP threads spin-wait and collapse on a busy 2-core machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "data" / "demo" / "tokenizer"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def nano_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised 'nano' demo-world Llama saved with save_pretrained (loads like a hub model)."""
    from rlhf.world import build_tiny_lm

    path = tmp_path_factory.mktemp("nano-model")
    model = build_tiny_lm(tokenizer, "nano", seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory) -> Path:
    """A nano demo-world Llama with the action tokens, saved as the SFT stage would leave it."""
    from rlhf.policy import add_special_tokens, load_tokenizer
    from rlhf.world import build_tiny_lm

    path = tmp_path_factory.mktemp("policy")
    tok = load_tokenizer(str(TOKENIZER_DIR))
    model = build_tiny_lm(tok, "nano", seed=0)
    add_special_tokens(model, tok, ["<add>", "<review>"])
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def kill_and_resume():
    """`run(args, out) -> text`: start `rlhf <args> output_dir=<out>` in a subprocess, SIGKILL it as soon as its first
    checkpoint appears, check the killed stage does not look complete, then rerun the same command to the end and
    return what it printed (the caller compares its final metrics with an uninterrupted run's)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from rlhf.stage import read_manifest

    def start(args, out):
        return subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args, f"output_dir={out}"], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def run(args: list[str], out: Path) -> str:
        proc = start(args, out)
        deadline = time.monotonic() + 300
        while not list((out / "checkpoints").glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list((out / "checkpoints").glob("step-*")), "no checkpoint appeared before the run ended"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert read_manifest(out)["status"] == "running", "a killed stage must not look complete"
        resumed = start(args, out)
        text, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, text
        return text

    return run
