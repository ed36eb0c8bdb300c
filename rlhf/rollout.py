"""Experience: turn a batch of prompt records into what a policy-gradient update needs. No loss math here.

    records ─generate(n per prompt)─► Rollout ─score─► scores            (`sample_experience`)
        then one no-grad pass, in eval mode, micro-batch by micro-batch:  (`add_fixed_targets`)
            old log-probs  (policy, sampling temperature)
            ref log-probs  (reference; skipped when β = 0)
            values         (critic; PPO only)

PPO calls `make_experience` (both halves); the GRPO family calls them apart, so that with dynamic sampling only the
groups it keeps go through the fixed pass. The fixed pass runs over the first epoch's training
micro-batches (`update_plan`), so the first minibatch's forward repeats it bit for bit: the ratio there is exactly 1
and, with policy = reference, the KL exactly 0. Every tensor it stores is detached and zero where the response mask is
False. Each phase is timed for the `perf/<phase>_seconds` metrics.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Sequence

import torch

from rlhf.config import RLSettings, SamplingSettings
from rlhf.ops import masked_moments
from rlhf.types import Experience
from rlhf.vision import images_for


def step_seed(seed: int, step: int, round: int = 0) -> int:
    """The sampling seed of a step's rollout (and of its `round`-th refill): a function of the step, so a resumed
    run samples the same."""
    return seed * 1_000_003 + step * 1009 + round


def update_plan(seed: int, step: int, rows: int, rl: RLSettings) -> list[list[list[torch.Tensor]]]:
    """The update's order: epochs → minibatches → micro-batches (row indices, at most `rl.micro_batch_size` rows).
    Rows are shuffled per epoch by a function of (seed, step, epoch), so a resumed run repeats the order. Every
    epoch has exactly `rl.minibatches` minibatches (sizes differ by at most one row): the scheduler's length and the
    per-update metrics count on it."""
    if rl.minibatches > rows:
        raise ValueError(f"rl.minibatches={rl.minibatches} is more than the {rows} rows of a step")
    plan = []
    for epoch in range(rl.epochs):
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 7919 + step * 131 + epoch))
        # tensor_split, not chunk: chunk(5) of 12 rows makes 4 parts of 3
        plan.append([list(minibatch.split(rl.micro_batch_size)) for minibatch in order.tensor_split(rl.minibatches)])
    return plan


def updates_per_step(rl: RLSettings) -> int:
    """Optimizer steps in one `update_plan` (the scheduler's length is max_steps times this)."""
    return rl.epochs * rl.minibatches


def rollout_metrics(exp: Experience, all_reduce=None) -> dict[str, float]:
    """What every RL stage logs of a step's experience: the reward (its std over the global batch with
    `all_reduce`), response length, the share cut at the token budget, each reward component and phase seconds."""
    rows = torch.ones_like(exp.scores, dtype=torch.bool)
    return {
        "train/reward": float(exp.scores.mean()),
        "train/reward_std": float(masked_moments(exp.scores, rows, all_reduce)[1].sqrt()),
        "train/response_length": float(exp.rollout.lengths.float().mean()),
        "train/truncated_frac": 1.0 - float(exp.rollout.ended.float().mean()),
        **{f"reward/{k}": float(v.mean()) for k, v in exp.components.items()},
        **{f"perf/{k}_seconds": v for k, v in exp.timings.items()},
    }


def log_samples(tracker, exp: Experience, step: int, limit: int = 16) -> None:
    """A few sampled completions with their rewards and advantages (samples.jsonl and a W&B table)."""
    adv = exp.advantages if exp.advantages.dim() == 1 else (exp.advantages * exp.response_mask).sum(-1)
    rows = [{"prompt": exp.rollout.prompts[i], "completion": exp.rollout.completions[i],
             "reward": round(float(exp.scores[i]), 4), "advantage": round(float(adv[i]), 4)}
            for i in range(min(limit, len(exp)))]
    tracker.log_samples(rows, step=step)


@contextmanager
def _timed(timings: dict[str, float], phase: str):
    start = time.perf_counter()
    yield
    timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


@contextmanager
def eval_mode(*modules):
    """Every given module (None skipped) in eval mode for the block, then back in the mode it was in: no dropout while
    sampling or computing the fixed targets (Huang et al.'s N implementation details)."""
    modules = [m for m in modules if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def sample_experience(policy, scorer, records: Sequence[dict], sampling: SamplingSettings, *, seed: int,
                      first_prompt: int = 0) -> Experience:
    """Sample `sampling.n` completions for each record's prompt and score them; no fixed targets yet.

    Args:
        policy: a bare (unwrapped) `PolicyModel`: `PolicyModel.unwrapped(accelerator)` inside a recipe.
        scorer: `reward_models.Scorer` (or anything with `score_rollout(rollout, records)`).
        records: prompt records (`prompt` plus whatever the rewards read: task, meta, answer...).
        seed: the sampling seed of this rollout (`step_seed`).
        first_prompt: the position of `records[0]` among the step's prompts over all processes: each prompt's
            samples draw from a stream of (`seed`, its position), so a split batch samples what a whole one would.
    """
    timings: dict[str, float] = {}
    with eval_mode(policy.model):
        with _timed(timings, "generate"):
            rollout = policy.generate(
                [r["prompt"] for r in records], n=sampling.n, max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=seed,
                backend=sampling.backend, bf16=sampling.bf16, first_prompt=first_prompt,
                images=images_for(records, getattr(policy, "image_inputs", None)),
            )
    return score_rollout(rollout, scorer, records, timings)


def score_rollout(rollout, scorer, records: Sequence[dict], timings: dict[str, float] | None = None) -> Experience:
    """A sampled rollout's experience: scored by `scorer` against its prompt `records`; no fixed targets yet."""
    timings = {} if timings is None else timings
    with _timed(timings, "score"):
        scores = scorer.score_rollout(rollout, list(records))
    device = rollout.response_ids.device
    return Experience(rollout=rollout, scores=scores.total.to(device),
                      components={k: v.to(device) for k, v in scores.components.items()}, old_logprobs=None,
                      timings=timings)


@torch.no_grad()
def add_fixed_targets(exp: Experience, policy, *, temperature: float, micro_batches: Sequence[torch.Tensor],
                      old_logprobs: bool = True, reference: bool = False, critic=None) -> Experience:
    """Fill `exp`'s fixed targets in one no-grad pass with every trained module in eval mode: old log-probs at the
    sampling `temperature` (a purely on-policy update, one epoch of one minibatch, needs none: its old log-probs are
    the current ones, detached, as in TRL), reference log-probs (`reference`: False when β = 0, the reference never
    runs) and the critic's values (`critic`: a `rlhf.critic.Critic`, PPO). Computed over `micro_batches` (row index
    tensors, the first epoch's training order) and put back in row order; zero where the response mask is False."""
    rollout, mask = exp.rollout, exp.response_mask
    shared = critic is not None and critic.shares_policy_forward
    parts: dict[str, list] = {"old_logprobs": [], "ref_logprobs": [], "values": []}
    with eval_mode(policy.model, policy.value_head, critic.module if critic is not None else None):
        micro = [rollout.select(rows) for rows in micro_batches]  # sliced once, for the policy and the reference
        for part in micro:
            if old_logprobs or shared:
                with _timed(exp.timings, "old_logprobs"):
                    out = policy.forward(part, temperature, with_values=shared)
                if old_logprobs:
                    parts["old_logprobs"].append(out.logprobs)
                if shared:  # a value head shares the policy's trunk: its values come from the same forward
                    parts["values"].append(out.values)
            if critic is not None and not shared:
                with _timed(exp.timings, "values"):
                    parts["values"].append(critic.values(policy, part))
        if reference:  # one block: under LoRA the reference is the policy with its adapters off
            with _timed(exp.timings, "reference"), policy.reference() as ref:
                parts["ref_logprobs"] = [ref.forward(part, temperature).logprobs for part in micro]
    if shared:
        exp.timings["values"] = 0.0  # read in the old-log-prob pass (one forward of the shared trunk)
    order = torch.cat(list(micro_batches)).to(mask.device)
    for name, chunks in parts.items():
        if chunks:
            stacked = torch.zeros(mask.shape, dtype=chunks[0].dtype, device=mask.device)
            stacked[order] = torch.cat(chunks).detach()
            setattr(exp, name, stacked * mask)
    return exp


def make_experience(policy, scorer, records: Sequence[dict], sampling: SamplingSettings, *, seed: int,
                    first_prompt: int = 0, micro_batches: Sequence[torch.Tensor] | None = None,
                    with_old_logprobs: bool = True, with_reference: bool = False, critic=None,
                    micro_batch_size: int = 64) -> Experience:
    """`sample_experience` then `add_fixed_targets`: a step's rollout with every fixed tensor of its update.
    `micro_batches` defaults to consecutive rows, `micro_batch_size` at a time."""
    exp = sample_experience(policy, scorer, records, sampling, seed=seed, first_prompt=first_prompt)
    if micro_batches is None:
        micro_batches = list(torch.arange(len(exp)).split(micro_batch_size))
    return add_fixed_targets(exp, policy, temperature=sampling.temperature, micro_batches=micro_batches,
                             old_logprobs=with_old_logprobs, reference=with_reference, critic=critic)
