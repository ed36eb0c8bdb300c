"""Helpers shared by the reward-model tests (a uniquely named module: conftest files cannot be imported)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_TOKENIZER = REPO / "data" / "demo" / "tokenizer"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """A trivially separable preference: the chosen review praises, the rejected one complains."""
    import random

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


def make_ctx(directory: Path, resume: bool = False):
    """A StageContext for calling a recipe's run() directly (tracking off, metrics.jsonl still written)."""
    from rlhf.config import TrackingSettings
    from rlhf.stage import StageContext
    from rlhf.tracking import Tracker

    directory.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(directory, TrackingSettings(mode="disabled"), job_type="reward", name="reward",
                      resume_step=10**9 if resume else None)
    return StageContext(name="reward", kind="reward", dir=directory, tracker=tracker, resume=resume)
