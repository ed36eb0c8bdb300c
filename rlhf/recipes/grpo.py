"""GRPO and the critic-free family (Dr. GRPO, RLOO, REINFORCE++) on one loop.

For P prompts per step, sample G completions each, score them, turn the scores into advantages, then take μ passes
over the rollout in shuffled minibatches of the clipped surrogate plus β·KL(π‖π_ref) per token:

    L = agg_t[ −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β·KL_t ],   ρ_t = π(y_t) / π_old(y_t)

(Shao et al. 2024, DeepSeekMath eq. 3; clip-higher and token-mean from DAPO, Yu et al. 2025; unscaled advantages
and a constant normalizer from Dr. GRPO, Liu et al. 2025; the sequence ratio from GSPO, Zheng et al. 2025.)
The estimators differ only in the advantage and in where the KL goes:

    grpo          A_i = (r_i − mean_group) / std_group          KL in the loss (k3 by default)
    dr_grpo       A_i = r_i − mean_group                        KL in the loss, Σ/(rows·max_len) aggregation
    rloo          A_i = r_i − mean of the other G − 1           KL in the loss (or in the reward)
    reinforce_pp  whitened returns of −β·k1 per token + score   KL in the reward, by definition (Hu 2025)

Steps: 1 accelerator → 2 policy (+ LoRA; reference = adapters off) → 3 prompts and rewards → 4 optimizer →
5 resume → 6 loop: rollout, advantages, μ × minibatch updates, log / eval / checkpoint → 7 final eval and save.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Literal

import torch
from pydantic import Field, model_validator

from rlhf.async_rollouts import RolloutWorker, importance_stats, importance_weights
from rlhf.advantages import (
    fixed_score_without_eos, group_normalized, kl_shaped_rewards, make_kl_controller, reinforce_pp, rloo,
)
from rlhf.config import LoopSettings, ModelSettings, OptimSettings, RLSettings, SamplingSettings, Section, StageConfig
from rlhf.data import load_rl_prompts, prompt_budget
from rlhf.distributed import check_engine, global_normalizer, make_accelerator, prepare_reference, sync_unless_last
from rlhf.errors import UserError
from rlhf.evaluation import evaluate_gold, scorer_score_fn
from rlhf.generation import check_environment
from rlhf.losses import aggregate, aggregate_normalizer, clipped_surrogate, importance_ratio, kl_penalty
from rlhf.ops import kl_k1, masked_mean
from rlhf.policy import PolicyModel
from rlhf.recipes.rl_settings import (
    KLSettings, PromptData, RewardShaping, RLEvalSettings, check_step_shape, rl_micro_batches,
)
from rlhf.rollout import (
    add_fixed_targets, log_samples, rollout_metrics, sample_experience, score_rollout, step_seed, update_plan,
    updates_per_step,
)
from rlhf.stage import StageContext
from rlhf.tracking import progress
from rlhf.training import (
    EarlyStop, MetricSums, early_stopped, end_of_step, final_eval_and_save, make_optimizer, make_scheduler,
    micro_batch_indices, optimizer_step, resume_state,
)
from rlhf.types import Experience, cat_experiences
from reward_models.scoring import RewardComponent, Scorer


class GRPOLoss(Section):
    """The estimator and the surrogate."""

    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = Field("grpo", description="advantage estimator")
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        None, description="grpo: divide by the group's std, the batch's, or nothing (null = group; dr_grpo: none)")
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] | None = Field(
        None, description="loss aggregation (null = token_mean as DAPO and TRL; dr_grpo: seq_mean_token_sum_norm)")
    eps_low: float = Field(0.2, gt=0.0, lt=1.0, description="clip the ratio below at 1 − eps_low")
    eps_high: float = Field(0.2, gt=0.0, description="clip the ratio above at 1 + eps_high (DAPO's clip-higher: 0.28)")
    ratio_level: Literal["token", "sequence"] = Field("token", description="per-token ratio, or GSPO's sequence ratio")
    mask_truncated: bool = Field(False, description="completions cut at max_new_tokens get no gradient (DAPO overlong filtering)")
    dynamic_sampling: bool = Field(False, description="drop groups whose rewards all tie and refill the batch (DAPO)")
    max_sampling_rounds: int = Field(3, ge=1, description="dynamic sampling: at most this many rollouts per step")


class Config(StageConfig):
    """`rlhf grpo`: GRPO-family RL (grpo | dr_grpo | rloo | reinforce_pp) with rule rewards and/or reward models."""

    model: ModelSettings = Field(default_factory=ModelSettings, description="the policy (an SFT stage's output)")
    data: PromptData = Field(default_factory=PromptData, description="training prompts")
    rewards: list[RewardComponent] = Field(
        default_factory=lambda: [RewardComponent(name="correct", rule="verifiable")],
        description="reward components summed with their weights (rules and/or reward models)")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description="rollout sampling (n = group size G)")
    rl: RLSettings = Field(default_factory=RLSettings, description="prompts per step, epochs μ, minibatches, micro-batches")
    loss: GRPOLoss = Field(default_factory=GRPOLoss, description="estimator and surrogate")
    kl: KLSettings = Field(default_factory=KLSettings, description="KL to the reference")
    train: LoopSettings = Field(default_factory=LoopSettings, description="steps and the cadence of log / eval / checkpoint")
    optim: OptimSettings = Field(default_factory=lambda: OptimSettings(lr=1e-5, schedule="constant"), description="AdamW")
    reward: RewardShaping = Field(default_factory=RewardShaping, description="the score of responses without EOS")
    disable_dropout: bool = Field(True, description="train in eval mode (no dropout), as sampling and the old / reference "
                                  "log-probs run: else the ratio is not 1 where the policy has not moved")
    eval: RLEvalSettings = Field(default_factory=RLEvalSettings, description="held-out evaluation")
    samples_every: int = Field(10, ge=0, description="write sampled completions (JSONL + W&B table) every N steps (0 = never)")
    save_merged: bool = Field(False, description="with LoRA, also write the merged full model (else the adapter)")

    @model_validator(mode="after")
    def _step_shape(self) -> "Config":
        check_step_shape(self.rl, self.sampling, self.kl)
        return self


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    # 1. accelerator and seed ---------------------------------------------------------------------------------
    check_environment()
    accelerator = make_accelerator(cfg.train, cfg.seed)
    check_step_shape(cfg.rl, cfg.sampling, cfg.kl, processes=accelerator.num_processes)
    check_engine(accelerator, micro_batches=rl_micro_batches(cfg.rl, cfg.sampling.n), generates="grpo's rollouts",
                 merges="save_merged" if cfg.save_merged and cfg.model.lora else None)
    adv_name = cfg.loss.advantage
    scale = cfg.loss.scale_rewards or ("none" if adv_name == "dr_grpo" else "group")
    agg = cfg.loss.aggregation or ("seq_mean_token_sum_norm" if adv_name == "dr_grpo" else "token_mean")
    kl_in_reward = cfg.kl.in_reward or adv_name == "reinforce_pp"  # REINFORCE++ shapes token rewards by definition
    beta_on = cfg.kl.beta > 0
    # batch statistics (scale_rewards: batch, REINFORCE++'s whitening, the logged reward std) over every process
    all_reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None
    if cfg.sampling.n < 2 and adv_name != "reinforce_pp":
        raise UserError(f"config key 'sampling.n' must be ≥ 2 for '{adv_name}' (its baseline is the rest of the group)")

    # 2. policy; with LoRA the reference is the same weights with adapters disabled, else a frozen copy --------------
    policy = PolicyModel.load(cfg.model, with_reference=beta_on, seed=cfg.seed)
    tokenizer = policy.tokenizer

    # 3. prompts and the scoring interface ----------------------------------------------------------------------
    records = load_rl_prompts(cfg.data.prompts, cfg.data.tasks, cfg.data.limit, tokenizer,
                              max_prompt_tokens=prompt_budget(policy.model.config, cfg.sampling.max_new_tokens),
                              image_inputs=policy.image_inputs, model_name=cfg.model.path)
    if len(records) < cfg.rl.prompts_per_step:
        raise UserError(f"{cfg.data.prompts}: {len(records)} prompts, fewer than rl.prompts_per_step={cfg.rl.prompts_per_step}")
    scorer = Scorer(cfg.rewards, device=policy.device)
    eval_budget = prompt_budget(policy.model.config, cfg.eval.generation.max_new_tokens, "eval.generation.max_new_tokens")
    eval_records = (load_rl_prompts(cfg.eval.prompts, cfg.eval.tasks, cfg.eval.limit, tokenizer,
                                    max_prompt_tokens=eval_budget, image_inputs=policy.image_inputs,
                                    model_name=cfg.model.path) if cfg.eval.prompts else [])
    eval_scorer = Scorer(cfg.eval.rewards, device=policy.device) if cfg.eval.rewards else scorer

    # 4. optimizer and schedule (one optimizer step per minibatch), prepared by accelerate -------------------------
    optimizer = make_optimizer(policy.model.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps * updates_per_step(cfg.rl))
    policy.keep_whole_weights(accelerator)  # FSDP: an unsharded copy to sample and save with
    policy.model, optimizer, scheduler = accelerator.prepare(policy.model, optimizer, scheduler)
    prepare_reference(accelerator, policy)
    model = policy.model

    # 5. resume: weights, optimizer, scheduler, RNG and β; prompts and sampling seeds are functions of the step -------
    start, counters, timer = resume_state(accelerator, ctx)
    kl_ctl = make_kl_controller(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon, counters.pop("kl", None))
    early = cfg.rl.early_stop
    stopper = EarlyStop(early, ctx.dir, accelerator, counters.pop("early_stop", None)) if early else None
    last_step = cfg.train.max_steps

    def evaluate() -> dict[str, float]:
        if not eval_records:
            return {}
        score_fn = scorer_score_fn(eval_scorer, scorer if eval_scorer is not scorer else None)
        return evaluate_gold(policy.unwrapped(accelerator), eval_records, cfg.eval.generation, score_fn, seed=cfg.seed,
                            accelerator=accelerator)

    # 6. the loop -----------------------------------------------------------------------------------------------
    model.train(not cfg.disable_dropout)  # eval mode = no dropout: the update sees the function that sampled
    metrics: dict[str, float] = {}
    with _start_worker(cfg, accelerator, policy, records, start) as worker:  # None: sampling in the loop
        for step in progress(range(start, cfg.train.max_steps), total=cfg.train.max_steps, initial=start, desc=ctx.name):
            # 6.1 rollout: P prompts × G completions, scored; old / reference log-probs in the first epoch's micro-batches
            plan = update_plan(cfg.seed, step, cfg.rl.prompts_per_step * cfg.sampling.n, cfg.rl)
            bare = policy.unwrapped(accelerator)
            if worker is None:
                exp, rounds, zero_std_frac = _rollout(cfg, step, records, bare, scorer, accelerator)
                behaviour, async_metrics = None, {}
            else:
                exp, behaviour, async_metrics = _worker_rollout(cfg, step, records, worker, scorer)
                rounds, zero_std_frac = 1, _zero_std_frac(exp.scores, cfg.sampling.n)
            add_fixed_targets(exp, bare, temperature=cfg.sampling.temperature, micro_batches=sum(plan[0], []),
                              old_logprobs=len(plan) * len(plan[0]) > 1 or kl_in_reward or behaviour is not None,
                              reference=beta_on)
            mask = exp.response_mask
            if behaviour is not None:  # stale samples: decoupled objective, π_old = π_prox (these weights), TIS weights
                exp.is_weights = importance_weights(exp.old_logprobs, behaviour, mask, cfg.rl.asynchronous.importance_cap)
                async_metrics.update(importance_stats(exp.old_logprobs, behaviour, mask, cfg.rl.asynchronous.importance_cap))
            loss_mask = mask & exp.rollout.ended[:, None] if cfg.loss.mask_truncated else mask

            # 6.2 advantages (the estimators are pure functions; the KL goes into the reward or into the loss) ----------
            seq_kl = kl_k1(exp.old_logprobs, exp.ref_logprobs, mask) if beta_on and exp.old_logprobs is not None else None
            beta = kl_ctl.value
            if adv_name == "reinforce_pp":
                kl = seq_kl if seq_kl is not None else torch.zeros_like(mask, dtype=torch.float32)
                exp.advantages, exp.returns = reinforce_pp(kl_shaped_rewards(exp.scores, kl, mask, beta), mask,
                                                           all_reduce=all_reduce)
            else:
                rewards = exp.scores - beta * seq_kl.sum(-1) if kl_in_reward and seq_kl is not None else exp.scores
                if adv_name == "rloo":
                    exp.advantages = rloo(rewards, exp.rollout.prompt_index)
                else:
                    exp.advantages = group_normalized(rewards, exp.rollout.prompt_index, scale=scale, all_reduce=all_reduce)

            # 6.3 μ epochs × minibatches of the clipped surrogate (+ β·KL in the loss), micro-batched -----------------
            sums = MetricSums()
            # KL(π_old‖π_ref) per row for the logs and the adaptive β: from the stored old log-probs, or (on-policy) from
            # the first pass, whose log-probs are π_old's
            row_kl = seq_kl.sum(-1) if seq_kl is not None else torch.zeros(len(exp), device=mask.device)
            update_started = time.perf_counter()
            for epoch, minibatches in enumerate(plan):
                for micro in minibatches:
                    # one global normalizer over the minibatch's micro-batches (and processes): accumulation = one batch
                    normalizer = global_normalizer(accelerator, sum(
                        aggregate_normalizer(loss_mask[m], agg, max_len=cfg.sampling.max_new_tokens) for m in micro))
                    for i, rows in enumerate(micro):
                        part = exp.select(rows)
                        with accelerator.autocast(), sync_unless_last(accelerator, model, i, len(micro)):
                            loss, stats, old = _policy_loss(policy, part, loss_mask[rows], cfg, agg, normalizer, beta, kl_in_reward)
                            accelerator.backward(loss)
                        if epoch == 0 and beta_on and seq_kl is None:
                            row_kl[rows] = kl_k1(old, part.ref_logprobs, part.response_mask).sum(-1)
                        sums.add(stats, 1 / len(micro))
                    norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.optim.max_grad_norm,
                                          loss=sums.current.get("loss/total"))
                    sums.end_minibatch({"train/grad_norm": norm})
            update_seconds = time.perf_counter() - update_started

            if worker is not None:  # the worker may sample ahead with these weights while the step is logged and saved
                worker.publish(bare, step + 1)

            # 6.4 β, counters, metrics, then the shared tail (log / eval / checkpoint) -------------------------------
            if beta_on:  # the same β on every process: the KL over the global batch
                kl_ctl.update(float(accelerator.reduce(row_kl.mean(), "mean")), len(exp) * accelerator.num_processes)
            tokens = int(mask.sum()) * accelerator.num_processes
            counters["samples"] += len(exp) * accelerator.num_processes
            counters["tokens"] += tokens
            advantages = exp.advantages if exp.advantages.dim() == 2 else exp.advantages[:, None].expand_as(mask)
            step_metrics = {
                **rollout_metrics(exp, all_reduce),
                "train/frac_zero_std_groups": zero_std_frac,
                "train/advantage_abs": float(masked_mean(advantages.abs(), mask)),
                "train/kl_coef": beta, "train/sampling_rounds": rounds, "train/lr": scheduler.get_last_lr()[0],
                **sums.means(),  # means over the step's optimizer updates
                **sums.first_minibatch("train/ratio_mean", "train/approx_kl_old"),
                "perf/update_seconds": update_seconds,
                **async_metrics,
            }
            if beta_on:
                step_metrics["train/kl"] = float(row_kl.mean())
                step_metrics["train/reward_with_kl"] = float((exp.scores - beta * row_kl).mean())
            if cfg.samples_every and (step + 1) % cfg.samples_every == 0 and accelerator.is_main_process:
                log_samples(ctx.tracker, exp, step + 1)
            stop = stopper is not None and stopper.update(step_metrics, step + 1, bare.model)
            end_of_step(ctx, accelerator, cfg.train, step + 1, counters, timer, tokens=tokens, metrics=step_metrics,
                        evaluate=evaluate, state={"kl": kl_ctl.state_dict(),
                                                  **({"early_stop": stopper.state_dict()} if stopper else {})})
            metrics.update({k: step_metrics[k] for k in ("train/reward", "loss/policy") if k in step_metrics})
            if stop:
                last_step = early_stopped(ctx, stopper, step + 1)
                break

    # 7. final evaluation and the policy in Hugging Face format (the best step's under rl.early_stop) ---------------
    if stopper is not None:
        metrics.update(stopper.restore(policy.unwrapped(accelerator).model))
    metrics = final_eval_and_save(ctx, accelerator, policy, metrics, evaluate, counters, timer, last_step,
                                  merged=cfg.save_merged)
    if stopper is not None:
        stopper.remove()
    return metrics


def _start_worker(cfg: Config, accelerator, policy, records, start: int):
    """`rl.asynchronous`: the rollout worker process, sampling from step `start` with the current weights, as a
    context that closes it; without it, a context holding None."""
    settings = cfg.rl.asynchronous
    if settings is None:
        return nullcontext()
    if accelerator.num_processes > 1:
        raise UserError("config key 'rl.asynchronous' runs one trainer process with one rollout worker: launch without "
                        "accelerate's multi-process config, or set rl.asynchronous: null")
    if cfg.loss.dynamic_sampling:
        raise UserError("config key 'rl.asynchronous' cannot refill a batch (loss.dynamic_sampling): set one of them off")
    return RolloutWorker(policy.unwrapped(accelerator), cfg.model, records, cfg.sampling, settings, seed=cfg.seed,
                         prompts_per_step=cfg.rl.prompts_per_step, start=start, max_steps=cfg.train.max_steps)


def _zero_std_frac(scores: torch.Tensor, n: int) -> float:
    groups = scores.view(-1, n)
    return 1.0 - float(((groups.max(1).values - groups.min(1).values) > 1e-6).float().mean())


def _worker_rollout(cfg: Config, step: int, records, worker: RolloutWorker, scorer):
    """The worker's rollout of `step`, scored here: (experience, behaviour log-probs or None, async metrics)."""
    waited = time.perf_counter()
    item = worker.get(step)
    wait = time.perf_counter() - waited
    exp = score_rollout(item.rollout, scorer, [records[i] for i in item.prompt_indices],
                        {"generate": item.seconds, "wait_for_worker": wait})
    if cfg.reward.missing_eos_score is not None:
        exp.scores = fixed_score_without_eos(exp.scores, exp.rollout.ended, cfg.reward.missing_eos_score)
    return exp, item.behaviour_logprobs, {"async/staleness": float(step - item.version),
                                          "async/worker_restarts": float(worker.restarts)}


def _policy_loss(policy, part: Experience, loss_mask, cfg: Config, agg: str, normalizer, beta: float, kl_in_reward: bool):
    """The aggregated loss of one micro-batch, its detached stats, and the old log-probs it used."""
    out = policy.forward(part.rollout, temperature=cfg.sampling.temperature, with_entropy=True)
    old = part.old_logprobs if part.old_logprobs is not None else out.logprobs.detach()  # on-policy: ratio exactly 1
    per_token, stats = clipped_surrogate(out.logprobs, old, part.advantages, loss_mask, eps_low=cfg.loss.eps_low,
                                         eps_high=cfg.loss.eps_high, ratio_level=cfg.loss.ratio_level)
    if part.is_weights is not None:  # a stale rollout: each token's truncated importance weight (decoupled PPO)
        per_token = per_token * part.is_weights
    policy_loss = aggregate(per_token, loss_mask, agg, normalizer, max_len=cfg.sampling.max_new_tokens)
    loss = policy_loss
    metrics = {"loss/policy": policy_loss.detach(), "train/entropy": masked_mean(out.entropy.detach(), part.response_mask),
               **{f"train/{k}": v for k, v in stats.items()}}
    if beta > 0 and not kl_in_reward:
        ratio = importance_ratio(out.logprobs, old, loss_mask, cfg.loss.ratio_level) if cfg.kl.importance_weighted else None
        kl = kl_penalty(out.logprobs, part.ref_logprobs, cfg.kl.estimator, importance_ratio=ratio, response_mask=loss_mask)
        kl_loss = aggregate(kl, loss_mask, agg, normalizer, max_len=cfg.sampling.max_new_tokens)
        loss = loss + beta * kl_loss
        metrics["loss/kl"] = kl_loss.detach()
    metrics["loss/total"] = loss.detach()
    return loss, metrics, old


def _rollout(cfg: Config, step: int, records, policy, scorer, accelerator):
    """One step's sampled and scored experience, P prompts × G completions (responses cut without EOS get
    `reward.missing_eos_score`). With dynamic sampling, groups whose rewards all tie (zero advantage, no gradient)
    are dropped and more prompts are sampled, up to `max_sampling_rounds` rollouts; the prompts of round r are a
    function of (seed, step, r), so a resumed run samples the same.
    Returns (experience, rounds, fraction of zero-std groups in the first round)."""
    kept: list[Experience] = []
    n_groups, zero_frac, rounds = 0, 0.0, 0
    max_rounds = cfg.loss.max_sampling_rounds if cfg.loss.dynamic_sampling else 1
    for rnd in range(max_rounds):
        idx = micro_batch_indices(len(records), cfg.rl.prompts_per_step, step * max_rounds + rnd, cfg.seed,
                                  accelerator.process_index, accelerator.num_processes)
        exp = sample_experience(policy, scorer, [records[i] for i in idx], cfg.sampling, seed=step_seed(cfg.seed, step, rnd),
                                first_prompt=accelerator.process_index * cfg.rl.prompts_per_step)
        if cfg.reward.missing_eos_score is not None:
            exp.scores = fixed_score_without_eos(exp.scores, exp.rollout.ended, cfg.reward.missing_eos_score)
        rounds += 1
        groups = exp.scores.view(-1, cfg.sampling.n)
        varied = (groups.max(1).values - groups.min(1).values) > 1e-6
        if rnd == 0:
            zero_frac = _zero_std_frac(exp.scores, cfg.sampling.n)
        if not cfg.loss.dynamic_sampling:
            return exp, rounds, zero_frac
        rows = torch.nonzero(varied.repeat_interleave(cfg.sampling.n)).flatten()
        if len(rows):
            kept.append(exp.select(rows))
            n_groups += int(varied.sum())
        if n_groups >= cfg.rl.prompts_per_step:
            break
    if not kept:  # every group tied in every round: train on the last rollout (its advantages are all zero)
        return exp, rounds, zero_frac
    if n_groups < cfg.rl.prompts_per_step:
        # rounds ran out: top up with tied groups of the last round (zero advantage), so that every step (and every
        # process: their micro-batch counts must match under DDP) trains on exactly P groups
        tied = torch.nonzero(~varied).flatten()[: cfg.rl.prompts_per_step - n_groups]
        kept.append(exp.select((tied[:, None] * cfg.sampling.n + torch.arange(cfg.sampling.n)).flatten()))
    merged = cat_experiences(kept, policy.tokenizer.pad_token_id)
    return merged.select(list(range(min(len(merged), cfg.rl.prompts_per_step * cfg.sampling.n)))), rounds, zero_frac
