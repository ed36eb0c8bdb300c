"""The comparison config: one SFT checkpoint, shared settings, one budget, seeds, and the algorithms to compare."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from rlhf.config import Section, TrackingSettings, parse_overrides, read_yaml, set_dotted, validate
from rlhf.errors import UserError

ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")

# what a comparison writes in its output_dir besides the runs (the runner writes them, the report reads them)
PLAN_FILE = "runs.json"  # the plan and each run's last outcome: the report lists every planned run from it
COMPLETIONS_FILE = "completions.json"  # greedy completions of each algorithm on the same held-out prompts
BEST_OF_N_FILE = "best_of_n.json"  # the best-of-n baseline's gold and reward per n (see rlhf.compare.best_of_n)
BASE_EVAL_FILE = "base_eval.json"  # the base checkpoint's held-out gold and RM scores: every curve's point at 0 samples


class AlgorithmSpec(Section):
    """One algorithm of the comparison: a stage kind, its YAML, and what differs from that YAML."""

    kind: str = Field(description="the stage kind that trains it: grpo | ppo | dpo (must be registered in rlhf.pipeline.STAGES)")
    config: str | None = Field(None, description="the stage's YAML config (null = the recipe's defaults)")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted key -> value on top of config and `shared` (e.g. loss.advantage: rloo)")
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="optional sweep: one dotted key -> values, e.g. {kl.beta: [0.01, 0.1]}; each value is an arm of its own")

    @field_validator("sweep")
    @classmethod
    def _one_key(cls, sweep: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if len(sweep) > 1:
            raise ValueError("sweep one key at a time (e.g. kl.beta or kl.target)")
        for key, values in sweep.items():
            if not values:
                raise ValueError(f"sweep over '{key}' lists no values")
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"sweep over '{key}' lists a value twice")
        return sweep


class Budget(Section):
    """What every run gets, counted in generated samples (or tokens), never in steps."""

    samples: int | None = Field(
        None, ge=1,
        description="generated completions per run (DPO: preference pairs); must be a multiple of each algorithm's samples per step")
    tokens: int | None = Field(
        None, ge=1,
        description="generated response tokens per run: a cap (steps = tokens // (samples per step × sampling.max_new_tokens))")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Budget":
        if (self.samples is None) == (self.tokens is None):
            raise ValueError("give exactly one of budget.samples and budget.tokens")
        return self

    @property
    def unit(self) -> str:
        return "samples" if self.samples is not None else "tokens"

    @property
    def amount(self) -> int:
        return self.samples if self.samples is not None else self.tokens  # type: ignore[return-value]


class CompareEval(Section):
    """Held-out evaluation during every run (the recipes' own `eval` section does the scoring), and the report's
    side-by-side completions."""

    every_samples: int | None = Field(
        None, ge=1, description="evaluate (gold and RM score) every N samples (null = 8 times per run); rounded to whole steps")
    completions: int = Field(
        6, ge=0, description="held-out prompts (spread evenly over the set) whose greedy completions the report shows side by side")


class BestOfN(Section):
    """A best-of-n baseline beside the RL arms: n samples of the base policy per held-out prompt, the one the
    training reward likes best kept, at the analytic KL log n − (n − 1)/n."""

    max_n: int = Field(64, ge=2, le=1024, description="samples per prompt drawn once; n runs over the powers of 2 up to it")
    prompts: int | None = Field(64, ge=1, description="held-out prompts used (the first N of the runs' eval prompts)")


class PrepareSettings(Section):
    """Stages of a pipeline that make the base checkpoint (and reward model), run or skipped before the comparison."""

    pipeline: str = Field(description="pipeline YAML, e.g. configs/demo/pipeline.yaml")
    stages: list[str] = Field(min_length=1, description="its stages to run (each skipped when already complete)")


class CompareConfig(Section):
    """`rlhf compare`: several algorithms × seeds from one SFT checkpoint on one budget, with a report."""

    name: str = Field("compare", description="comparison name: the W&B group, and the report's title")
    output_dir: str = Field("runs/compare", description="runs go to <output_dir>/<algorithm>[/<sweep value>]/seed-<s>")
    base: str = Field(description="the SFT checkpoint every run starts from (sets each run's model.path)")
    prepare: PrepareSettings | None = Field(None, description="pipeline stages that make `base` (null = it already exists)")
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] = Field(
        min_length=1, description="seeds, each in [0, 2³²); every algorithm runs with each (3 or more for CIs)")
    budget: Budget = Field(description="the equal budget of every run: samples or tokens")
    shared: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted key -> value for every algorithm whose config has the key (prompts, rewards, eval, KL target...)")
    eval: CompareEval = Field(default_factory=CompareEval, description="evaluation cadence and the report's completions")
    best_of_n: BestOfN | None = Field(None, description="a best-of-n baseline on the over-optimization plot (null = none)")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="W&B: one project, group = name")
    isolate: bool = Field(
        True, description="run each stage in a fresh Python process: its own peak memory, a crash stays in its run "
                          "(under `accelerate launch` stages run in-process)")
    algorithms: dict[str, AlgorithmSpec] = Field(min_length=1, description="name -> algorithm (the W&B job_type)")

    @field_validator("name")
    @classmethod
    def _plain(cls, name: str) -> str:
        if not ARM_NAME.fullmatch(name):
            raise ValueError("must be a plain name (letters, digits, '_', '-', '.')")
        return name

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("lists a seed twice")
        return seeds

    @field_validator("algorithms")
    @classmethod
    def _plain_names(cls, algorithms: dict[str, AlgorithmSpec]) -> dict[str, AlgorithmSpec]:
        for name in algorithms:
            if not ARM_NAME.fullmatch(name):
                raise ValueError(f"algorithm name '{name}' must be a plain name (it names a directory)")
        if len({n.lower() for n in algorithms}) != len(algorithms):
            raise ValueError("two algorithm names differ only in case")
        return algorithms


def load_compare(path: str, overrides: list[str] | None = None) -> CompareConfig:
    """Read a comparison YAML and apply dotted `key=value` overrides (`budget.samples=512`, `seeds=[0,1]`)."""
    data = read_yaml(path)
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(data, key, value)
    cfg = validate(CompareConfig, data, source=str(path))
    if not isinstance(cfg, CompareConfig):  # pragma: no cover - validate returns the schema's type
        raise UserError(f"{path}: not a comparison config")
    return cfg
