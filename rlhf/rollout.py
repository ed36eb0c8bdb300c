"""Experience: turn a batch of prompt records into what a policy-gradient update needs. No loss math here.

    records ─generate(n per prompt)─► Rollout ─score─► scores ─┬─ old log-probs  (policy, sampling temperature)
                                                               ├─ ref log-probs  (reference; skipped when β = 0)
                                                               └─ values         (critic; PPO only)

PPO, GRPO, RLOO and REINFORCE++ all call `make_experience`; each phase is timed for the `perf/<phase>_seconds`
metrics. Every tensor it returns is detached (computed under no_grad).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Sequence

import torch

from rlhf.config import SamplingSettings
from rlhf.types import Experience, Rollout


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


@torch.no_grad()
def batched_logprobs(policy, rollout: Rollout, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """Per-token log-probs of `rollout` under `policy`, `micro_batch_size` rows at a time. Shape: (B, T)."""
    parts = [policy.forward(rollout.select(list(range(i, min(i + micro_batch_size, len(rollout))))), temperature).logprobs
             for i in range(0, len(rollout), micro_batch_size)]
    return torch.cat(parts) * rollout.response_mask


def make_experience(
    policy,
    scorer,
    records: Sequence[dict],
    sampling: SamplingSettings,
    *,
    seed: int,
    with_old_logprobs: bool = True,
    with_reference: bool = False,
    critic: Callable[[Rollout], torch.Tensor] | None = None,
    micro_batch_size: int = 64,
    first_prompt: int = 0,
) -> Experience:
    """Sample `sampling.n` completions for each record's prompt, score them and compute the fixed tensors of the
    update.

    Args:
        policy: a bare (unwrapped) `PolicyModel`: `PolicyModel.unwrapped(accelerator)` inside a recipe.
        scorer: `reward_models.Scorer` (or anything with `score_rollout(rollout, records)`).
        records: prompt records (`prompt` plus whatever the rewards read: task, meta, answer...).
        seed: the sampling seed of this rollout (a function of the step, so a resumed run samples the same).
        with_old_logprobs: compute log π_old. A purely on-policy update (one epoch, one minibatch) needs none: its
            old log-probs are the current ones, detached (TRL does the same), which also makes the ratio exactly 1.
        with_reference: compute log π_ref (False when β = 0: the reference is never run).
        critic: returns values (B, T) for a rollout (PPO); None = no values.
        first_prompt: the position of `records[0]` among the step's prompts over all processes: each prompt's
            samples draw from a stream of (`seed`, its position), so a split batch samples what a whole one would.
    """
    timings: dict[str, float] = {}
    was_training = policy.model.training
    policy.model.eval()  # no dropout while sampling or computing the fixed targets (N implementation details)
    try:
        with _timed(timings, "generate"):
            rollout = policy.generate(
                [r["prompt"] for r in records], n=sampling.n, max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=seed,
                backend=sampling.backend, bf16=sampling.bf16, first_prompt=first_prompt,
            )
        with _timed(timings, "score"):
            scores = scorer.score_rollout(rollout, list(records))
        old = ref = values = None
        if with_old_logprobs:
            with _timed(timings, "old_logprobs"):
                old = batched_logprobs(policy, rollout, sampling.temperature, micro_batch_size)
        if with_reference:
            with _timed(timings, "reference"), policy.reference() as reference:
                ref = batched_logprobs(reference, rollout, sampling.temperature, micro_batch_size)
        if critic is not None:
            with _timed(timings, "values"):
                values = critic(rollout).detach() * rollout.response_mask
    finally:
        policy.model.train(was_training)
    device = rollout.response_ids.device
    return Experience(
        rollout=rollout,
        scores=scores.total.to(device),
        components={k: v.to(device) for k, v in scores.components.items()},
        old_logprobs=old,
        ref_logprobs=ref,
        values=values,
        timings=timings,
    )
