"""The one scoring interface: PPO, GRPO, compare and eval hand it prompts, completions and metadata and get a score
tensor back.

A reward is a weighted sum of components, each a learned reward model or a rule:

    rewards:
      - {name: rm, model: runs/demo/reward, weight: 1.0}                 # learned, normalized with its stored stats
      - {name: format, rule: format, params: {pattern: "answer \\d+"}, weight: 0.2}
      - {name: eos, rule: missing_eos, weight: 0.5}

    total_i = Σ_k weight_k · component_k(prompt_i, completion_i, metadata_i)

Reward models run in eval mode without grad, batched in length order; each component's mean is reported as
`reward/<name>` for the caller to log. An image reward model (a vision-language backbone) reads each prompt's image:
from the prompt records (`metadata`, their `images` column) or from pixel values the caller passes (a rollout's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, field_validator, model_validator

from rlhf.config import Section
from rlhf.errors import UserError
from rlhf.vision import record_images
from reward_models.model import RewardModel
from reward_models.rules import apply_rule, check_params, resolve_rule

FLOAT32_MAX = torch.finfo(torch.float32).max


class RewardComponent(Section):
    """One term of the reward: a trained reward model (`model`) or a rule (`rule`), times `weight`."""

    name: str = Field(..., description="label of this term; logged as reward/<name>")
    weight: float = Field(1.0, description="multiplier of this term in the total reward")
    model: str | None = Field(None, description="trained reward model directory (the reward stage's output)")
    rule: str | None = Field(
        None, description="built-in rule (verifiable, exact_match, format, length_penalty, repetition_penalty, "
        "missing_eos) or a function as package.module:function"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments passed to the rule")
    normalize: bool = Field(True, description="model only: (r − mean) / std with the stats stored at training")
    aggregate: Literal["mean", "mean_minus_std", "min"] = Field(
        "mean", description="model only, a reward-model ensemble (the reward stage's `ensemble`): combine the "
        "members' (normalized) scores by their mean, the conservative mean − uncertainty_penalty · std, or the "
        "minimum (Coste et al. 2023); the members' std is logged as reward/<name>_disagreement"
    )
    uncertainty_penalty: float = Field(1.0, ge=0, description="λ of aggregate: mean_minus_std")
    batch_size: int = Field(64, ge=1, description="model only: sequences per forward pass")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="model only: weights dtype")

    @field_validator("weight")
    @classmethod
    def _fits_float32(cls, weight: float) -> float:
        if abs(weight) > FLOAT32_MAX:  # scores are float32: such a weight is infinite there
            raise ValueError(f"must be at most {FLOAT32_MAX:.3g} in size (scores are float32)")
        return weight

    @model_validator(mode="after")
    def _one_source(self) -> "RewardComponent":
        if (self.model is None) == (self.rule is None):
            raise ValueError(f"reward '{self.name}' needs exactly one of 'model' or 'rule'")
        if self.rule is not None and ":" not in self.rule:  # a built-in: check its params now, before any stage runs
            check_params(self.name, self.rule, resolve_rule(self.rule), self.params)
        return self


@dataclass
class Scores:
    """The result of scoring B completions."""

    total: torch.Tensor  # (B,) float32: Σ weight · component
    components: dict[str, torch.Tensor]  # name -> (B,) float32, before weighting

    def metrics(self) -> dict[str, float]:
        """`reward/<name>`: each component's batch mean (unweighted), for the tracker."""
        return {f"reward/{name}": values.mean().item() for name, values in self.components.items()}


class Scorer:
    """Loads the components once; `score` is then called every rollout.

    Args:
        components: what to sum (see `RewardComponent`).
        device: where reward models run (default CPU); scores come back on `device` too.
        models: already-loaded reward models by component name, used instead of loading them from disk.
    """

    def __init__(self, components: Sequence[RewardComponent], device: torch.device | str | None = None,
                 models: dict[str, RewardModel] | None = None):
        if not components:
            raise UserError("no reward components configured (config key 'rewards' is empty)")
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise UserError(f"reward component names must be unique, got {names}")
        self.components = list(components)
        self.device = torch.device(device or "cpu")
        self.models: dict[str, RewardModel] = {}
        self.ensembles: dict[str, list[RewardModel]] = {}  # name -> the other members of an ensemble component
        self.rules = {}
        for c in self.components:
            if c.model is not None:
                # `models`: reward models the caller already holds, by component name (e.g. a LoRA reward model run
                # as an adapter on the policy's own base), used instead of loading a copy from `c.model`
                rm = (models or {}).get(c.name) or RewardModel.load(c.model, dtype=c.dtype)
                members = [rm] + [RewardModel.load(path, dtype=c.dtype) for path in ensemble_members(c.model)]
                for member, path in zip(members, [c.model, *ensemble_members(c.model)]):
                    member.to(self.device).eval().requires_grad_(False)
                    if c.normalize and member.stats is None:
                        raise UserError(f"reward '{c.name}': {path} has no stored score statistics; set normalize: false")
                self.models[c.name] = rm
                if len(members) > 1:
                    self.ensembles[c.name] = members[1:]
                elif c.aggregate != "mean":
                    raise UserError(f"reward '{c.name}': aggregate: {c.aggregate} needs a reward-model ensemble, and "
                                    f"{c.model} is one model (train it with the reward stage's ensemble.members > 1)")
            else:
                self.rules[c.name] = resolve_rule(c.rule)
                check_params(c.name, c.rule, self.rules[c.name], c.params)

    @property
    def needs_images(self) -> bool:
        """Whether a reward model of this scorer reads the prompts' images."""
        return any(rm.image_inputs is not None for rm in self.models.values())

    def score(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None,
              ended: Sequence[bool] | torch.Tensor | None = None, images: Sequence | torch.Tensor | None = None) -> Scores:
        """Score B completions. `metadata[i]` is row i's prompt record (task, meta...); `ended[i]` says whether the
        completion stopped with EOS (rules see it as `metadata[i]["ended"]`). `images` (image reward models): row
        i's image, PIL or pixel values (B, C, H, W); by default each record's own (`rlhf.vision.record_images`).
        Returns `Scores` with (B,) tensors."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} completions")
        if images is None and self.needs_images and metadata is not None:
            images = _record_images(metadata)
        metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in range(n)]
        if len(metadata) != n:
            raise ValueError(f"{len(metadata)} metadata records but {n} completions")
        if ended is not None:
            for m, e in zip(metadata, ended.tolist() if isinstance(ended, torch.Tensor) else ended):
                m["ended"] = bool(e)
        parts: dict[str, torch.Tensor] = {}  # each component's values (and an ensemble's disagreement), for the logs
        total = torch.zeros(n, dtype=torch.float32)
        for c in self.components:
            if c.name in self.models:
                rm = self.models[c.name]
                if rm.image_inputs is not None and images is None:
                    raise UserError(f"reward '{c.name}': {c.model} is an image reward model; score prompts that "
                                    "carry their images")
                members = [rm, *self.ensembles.get(c.name, [])]
                each = torch.stack([
                    (m.normalize(v) if c.normalize else v)
                    for m in members
                    for v in [m.score(prompts, completions, batch_size=c.batch_size,
                                      images=images if m.image_inputs is not None else None)]
                ])
                values = aggregate_ensemble(each, c.aggregate, c.uncertainty_penalty)
                if len(members) > 1:
                    parts[f"{c.name}_disagreement"] = each.std(0)
            else:
                values = torch.tensor(apply_rule(c.name, self.rules[c.name], prompts, completions, metadata, c.params),
                                      dtype=torch.float32)
            parts[c.name] = values
            total += _weighted(c, values)
            if not torch.isfinite(total).all():
                raise UserError(f"rewards: the weighted total overflows float32 once reward '{c.name}' is added; "
                                "lower the rewards' weights")
        return Scores(total.to(self.device), {k: v.to(self.device) for k, v in parts.items()})

    def score_rollout(self, rollout, records: Sequence[dict] | None = None) -> Scores:
        """Score a `rlhf.types.Rollout`. `records` are the input prompt records (one per prompt, as passed to
        `generate`); row i gets `records[rollout.prompt_index[i]]`, plus whether it ended with EOS.

        An image reward model reads each prompt's image through its own image processor from the records' images;
        without records, the rollout's `pixel_values` (the policy's processing, which must then be the model's)."""
        metadata = [records[i] for i in rollout.prompt_index.tolist()] if records is not None else None
        images = None
        if self.needs_images:
            images = _record_images(metadata) if metadata is not None else None
            if images is None and rollout.pixel_values is not None:
                images = rollout.pixel_values.cpu()
        return self.score(rollout.prompts, rollout.completions, metadata, ended=rollout.ended, images=images)


ENSEMBLE_FILE = "ensemble.json"  # beside a reward model: the other members of its ensemble (see the reward stage)


def ensemble_members(path: str) -> list[str]:
    """The other members of the reward-model ensemble whose first member is `path` (none for a single model)."""
    import json
    from pathlib import Path

    listing = Path(path) / ENSEMBLE_FILE
    if not listing.is_file():
        return []
    return [str(Path(path) / member) for member in json.loads(listing.read_text())["members"]]


def aggregate_ensemble(scores: torch.Tensor, how: str, penalty: float = 1.0) -> torch.Tensor:
    """(k, B) member scores -> (B,): their mean, the conservative mean − penalty · std (std over members, with
    Bessel's correction), or the minimum. One member: its scores."""
    if scores.size(0) == 1 or how == "mean":
        return scores.mean(0)
    if how == "mean_minus_std":
        return scores.mean(0) - penalty * scores.std(0)
    if how == "min":
        return scores.min(0).values
    raise ValueError(f"unknown aggregate {how!r}")


def _record_images(records: Sequence[dict]) -> list | None:
    """Each record's one image (PIL), or None when the records carry none (the caller's error to name)."""
    images = [record_images(r) for r in records]
    if not all(images):
        return None
    return [found[0] for found in images]


def _weighted(component: RewardComponent, values: torch.Tensor) -> torch.Tensor:
    """weight · scores, refusing a non-finite result: it would reach the loss as NaN and look like divergence."""
    if not torch.isfinite(values).all():
        raise UserError(f"reward '{component.name}': its model gave a non-finite score")
    weighted = component.weight * values
    if not torch.isfinite(weighted).all():
        raise UserError(f"reward '{component.name}': weight {component.weight:g} × its scores (up to "
                        f"{float(values.abs().max()):.3g}) overflows float32; lower its weight")
    return weighted
