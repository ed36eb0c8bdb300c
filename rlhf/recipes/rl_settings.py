"""Config sections every RL stage (GRPO, PPO) shares: prompts, rewards, the KL term, evaluation.

They live here rather than in `rlhf/config.py` because rewards are `reward_models.RewardComponent`s, and the core
config module does not import `reward_models`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from rlhf.advantages import MAX_KL_ERROR
from rlhf.config import GenerationSettings, RLSettings, SamplingSettings, Section
from rlhf.errors import UserError
from reward_models.scoring import RewardComponent


class PromptData(Section):
    """The prompts an RL stage samples from, and which of them to use."""

    prompts: str = Field("data/demo/rl_prompts.jsonl", description="prompt records: `prompt` plus what the rewards read (task, meta...)")
    tasks: list[str] | None = Field(None, description="keep only records whose `task` is one of these (null = all)")
    limit: int | None = Field(None, ge=1, description="use at most this many prompts (null = all)")


class KLSettings(Section):
    """The KL(π‖π_ref) term: its coefficient β (fixed or adaptive), estimator, and where it enters."""

    beta: float = Field(0.04, ge=0.0, description="β: KL coefficient (0 = no KL term; the reference is then never run)")
    estimator: Literal["k1", "k2", "k3"] = Field("k3", description="per-token KL estimator (Schulman's k1, k2, k3)")
    in_reward: bool = Field(False, description="subtract β·KL from the reward instead of adding β·KL to the loss")
    importance_weighted: bool = Field(
        False, description="multiply the loss KL by the importance ratio π/π_old (TRL's use_bias_correction_kl, DeepSeek-V3.2)")
    target: float | None = Field(None, gt=0.0, description="adaptive β: the target KL per sequence (null = fixed β)")
    horizon: int = Field(10000, ge=1, description="adaptive β: the controller's horizon in samples (Ziegler et al. 2019)")

    @model_validator(mode="after")
    def _target_needs_beta(self) -> "KLSettings":
        # β adapts by a factor per step, so from 0 it stays 0 (and β = 0 never runs the reference)
        if self.target is not None and self.beta == 0:
            raise UserError(f"config key 'kl.target' ({self.target:g}) needs kl.beta > 0: the adaptive controller "
                            "scales β by a factor each step, so β = 0 stays 0; set kl.beta to the starting β (e.g. "
                            "0.1), or kl.target: null for a fixed β (no KL term with kl.beta 0)")
        return self


class RewardShaping(Section):
    """What happens to the scorer's scores before they become advantages or per-token rewards."""

    missing_eos_score: float | None = Field(
        -1.0, description="score of a response cut at max_new_tokens without EOS, replacing the scorer's: a reward "
        "model would read an EOS that was never sampled (null = keep the scorer's)")


class RLEvalSettings(Section):
    """Held-out evaluation during and after an RL stage: greedy and sampled, scored through the scoring interface."""

    prompts: str | None = Field("data/demo/eval_prompts.jsonl", description="held-out prompt records (null = no evaluation)")
    tasks: list[str] | None = Field(None, description="keep only records whose `task` is one of these (null = all)")
    limit: int | None = Field(None, ge=1, description="use at most this many prompts (null = all)")
    rewards: list[RewardComponent] | None = Field(
        None, description="score evaluation completions with these components, logged as eval/gold_score (null = the training rewards)")
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="greedy budget; samples > 0 adds sampled accuracy at the given temperature")


def rl_micro_batches(rl: RLSettings, n: int) -> int:
    """Micro-batches per optimizer step of a grpo / ppo update: a minibatch's rows (prompts × n / minibatches) in
    forward/backward passes of `rl.micro_batch_size` rows."""
    rows = math.ceil(rl.prompts_per_step * n / rl.minibatches)
    return math.ceil(rows / rl.micro_batch_size)


def check_step_shape(rl: RLSettings, sampling: SamplingSettings, kl: KLSettings, processes: int = 1) -> None:
    """Refuse a step shape that would train on something other than what the config says: more minibatches than
    rows (fewer optimizer steps than the scheduler and the metrics count), or an adaptive-β horizon so short that
    one step can drive β below 0."""
    rows = rl.prompts_per_step * sampling.n
    if rl.minibatches > rows:
        raise UserError(f"config key 'rl.minibatches' ({rl.minibatches}) is more than the {rows} rows of a step "
                        f"(rl.prompts_per_step × sampling.n = {rl.prompts_per_step} × {sampling.n}): every minibatch "
                        f"needs a row; set rl.minibatches to at most {rows}")
    samples = rows * processes
    if kl.target is not None and kl.horizon <= MAX_KL_ERROR * samples:
        raise UserError(
            f"config key 'kl.horizon' ({kl.horizon}) is too short for {samples} samples per step (rl.prompts_per_step"
            f" × sampling.n × processes): each step scales the adaptive β by 1 ± {MAX_KL_ERROR:g}·{samples}/horizon, "
            "and a factor ≤ 0 makes β negative, so that the KL term rewards leaving the reference; set kl.horizon "
            f"above {MAX_KL_ERROR * samples:g} (Ziegler et al. use 10000)")
