"""Render the embedded demo world's vision data into the stage directory, so a pipeline makes its images first.

The text world's data (pretraining text, demonstrations, prompts, tokenizer) is small and committed under
data/demo; the vision world's ~8,700 PNGs are not, so this stage renders them (deterministic: the same seed
writes the same bytes) and later stages read e.g. ``<this stage's directory>/digits_train.jsonl``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from rlhf.config import StageConfig
from rlhf.stage import StageContext
from rlhf.world import vision


class Config(StageConfig):
    """`world`: render the demo world's vision data (images, classification sets, image-conditioned prompts)."""

    vision: bool = Field(True, description="render the vision world (the only world this stage renders)")
    small: bool = Field(False, description="miniature sizes (~270 images, for tests) instead of the full ~8,700")

    @field_validator("vision")
    @classmethod
    def _only_vision(cls, value: bool) -> bool:
        if not value:
            raise ValueError("false renders nothing: this stage renders only the vision world; the text world's data "
                             "is committed under data/demo (regenerate it with `rlhf world --out data/demo`)")
        return value


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    counts = vision.generate(ctx.dir, seed=cfg.seed, small=cfg.small)
    metrics = {f"data/{Path(name).stem}_rows": n for name, n in counts.items()}
    for name, n in counts.items():
        print(f"[{ctx.name}] {name}: {n} rows")
    ctx.tracker.log(metrics, step=0)
    return metrics
