"""Config sections every RL stage (GRPO, PPO) shares: prompts, rewards, the KL term, evaluation.

They live here rather than in `rlhf/config.py` because rewards are `reward_models.RewardComponent`s, and the core
config module does not import `reward_models`.
"""

from __future__ import annotations

import math

from typing import Literal

from pydantic import Field

from rlhf.config import GenerationSettings, RLSettings, Section
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
