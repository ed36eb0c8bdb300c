"""PPO with a learned critic: RLHF as in InstructGPT (Ouyang et al. 2022), on the shared rollout path.

Each step samples a batch, scores it (learned reward models and/or rules), and shapes per-token rewards with a KL
penalty to the reference, the score landing on the last counting token (the EOS):

    r_t = −β·kl_t + [t = last]·score,    kl_t = log π_old(y_t) − log π_ref(y_t)   (k1; k2 / k3 as options)

(Ziegler et al. 2019, eq. 2; Stiennon et al. 2020). The critic gives a value per token; GAE(γ, λ) turns rewards and
values into advantages and returns (Schulman et al. 2016, eq. 16); then K epochs over shuffled minibatches of

    L = agg[ −min(ρ_t A_t, clip(ρ_t, 1 ± ε) A_t) ] + c_v·agg[ ½ max((V − R)², (clip(V, V_old ± ε_v) − R)²) ] − c_H·H

(Schulman et al. 2017, eq. 7 and 9; the clipped value loss of OpenAI baselines' PPO2), the gradient norm clipped.
β is fixed or adapted toward a target KL (Ziegler et al. 2019, §2.2). The critic (`critic.kind`: a separate value
model from the reward model, a value head on the policy's trunk, or a second LoRA adapter) is a `rlhf.critic.Critic`.

The implementation details of Huang et al. 2023 ("The N Implementation Details of RLHF with PPO") and 2024 are
config keys with their documented defaults: a fixed score for responses without EOS (`reward.missing_eos_score`),
reward whitening (`reward.whiten`), advantage whitening (`loss.whiten_advantages`), dropout off
(`disable_dropout`), value clipping (`loss.value_clip`), Adam ε (`optim.eps`); pad ≠ EOS, the score read at EOS,
left-padded generation, reward normalization with the RM's stored statistics and one temperature for sampling and
training log-probs come from the shared policy, scorer and rollout.

Steps: 1 accelerator → 2 policy (+ LoRA; reference = adapters off) → 3 prompts and rewards → 4 critic →
5 optimizer → 6 resume → 7 loop: rollout with old log-probs, reference log-probs and values (one no-grad pass),
shaped rewards, GAE, K × minibatch updates, log / eval / checkpoint → 8 final eval, save policy and critic.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from rlhf.advantages import fixed_score_without_eos, gae, kl_shaped_rewards, make_kl_controller
from rlhf.config import LoopSettings, ModelSettings, OptimSettings, RLSettings, SamplingSettings, Section, StageConfig
from rlhf.critic import Critic, CriticSettings, build_critic, policy_settings
from rlhf.data import load_rl_prompts, prompt_budget
from rlhf.distributed import (
    check_engine, global_normalizer, is_fsdp, make_accelerator, prepare_reference, shard_together, sync_unless_last,
)
from rlhf.errors import UserError
from rlhf.evaluation import evaluate_gold, scorer_score_fn
from rlhf.generation import check_environment
from rlhf.losses import aggregate, aggregate_normalizer, clipped_surrogate, importance_ratio, kl_penalty, value_loss
from rlhf.ops import KL_ESTIMATORS, kl_k1, masked_mean, masked_moments, masked_whiten
from rlhf.policy import PolicyModel
from rlhf.recipes.rl_settings import (
    KLSettings, PromptData, RewardShaping, RLEvalSettings, check_step_shape, rl_micro_batches,
)
from rlhf.rollout import log_samples, make_experience, rollout_metrics, step_seed, update_plan, updates_per_step
from rlhf.stage import StageContext, write_into
from rlhf.tracking import progress
from rlhf.training import (
    EarlyStop, MetricSums, early_stopped, end_of_step, final_eval_and_save, make_optimizer, make_scheduler,
    micro_batch_indices, optimizer_step, resume_state,
)
from rlhf.types import Experience
from reward_models.scoring import RewardComponent, Scorer
from reward_models.shared_base import shared_reward_models

__all__ = ["Config", "CriticSettings", "run"]


class PPOLoss(Section):
    """The clipped surrogate, the value loss, the entropy bonus and GAE."""

    eps: float = Field(0.2, gt=0.0, lt=1.0, description="ε: clip the ratio to [1 − eps, 1 + eps]")
    value_clip: float | None = Field(
        0.2, gt=0.0, description="ε_v: clip values to V_old ± value_clip in the value loss (null = unclipped)")
    value_coef: float = Field(0.1, ge=0.0, description="c_v: weight of the value loss (lm-human-preferences: 0.1)")
    entropy_coef: float = Field(0.0, ge=0.0, description="c_H: entropy bonus (0 = none)")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="γ: discount per token")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="λ: GAE's bias-variance trade-off")
    whiten_advantages: bool = Field(True, description="whiten the advantages over the batch's counting tokens")
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="how per-token losses are averaged (rlhf.losses.aggregate)")


class PPORewardShaping(RewardShaping):
    """What happens to the scorer's scores before they become per-token rewards."""

    whiten: Literal["none", "scale", "center"] = Field(
        "none", description="whiten the KL-shaped token rewards over the batch: scale = divide by the std and keep the "
        "mean (TRL whiten_rewards), center = also subtract the mean")
    share_base: bool = Field(
        True, description="with model.lora: a reward model trained as LoRA on the policy's own base runs as one more "
        "adapter on it (no second copy of the weights); its scores are the same")


class PPOKLSettings(KLSettings):
    """The KL(π‖π_ref) term: β fixed or adaptive, estimator, and where it enters (PPO: in the reward)."""

    beta: float = Field(0.2, ge=0.0, description="β: KL coefficient (the initial one when adaptive; 0 = no KL term)")
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token KL estimator (Schulman's k1, k2, k3)")
    in_reward: bool = Field(True, description="−β·KL per token in the reward (InstructGPT); false = +β·KL in the loss")
    target: float | None = Field(6.0, gt=0.0, description="adaptive β: target KL per sequence, nats (null = fixed β)")
    horizon: int = Field(10000, ge=1, description="adaptive β: the controller's horizon in samples (Ziegler et al. 2019)")


class PPOOptimSettings(OptimSettings):
    """AdamW over the policy and the critic together, with Adam's ε."""

    eps: float = Field(1e-5, gt=0.0, description="Adam ε (1e-5 as OpenAI's TensorFlow code; PyTorch's default is 1e-8)")


class Config(StageConfig):
    """`rlhf ppo`: PPO with a learned critic and a KL-shaped reward (rule rewards and/or reward models)."""

    model: ModelSettings = Field(default_factory=ModelSettings, description="the policy (an SFT stage's output)")
    data: PromptData = Field(default_factory=PromptData, description="training prompts")
    rewards: list[RewardComponent] = Field(
        default_factory=lambda: [RewardComponent(name="rm", model="runs/demo/reward")],
        description="reward components summed with their weights (reward models and/or rules)")
    reward: PPORewardShaping = Field(default_factory=PPORewardShaping, description="no-EOS score and reward whitening")
    sampling: SamplingSettings = Field(default_factory=lambda: SamplingSettings(n=4), description="rollout sampling")
    rl: RLSettings = Field(default_factory=lambda: RLSettings(epochs=4, minibatches=4),
                           description="prompts per step, epochs K, minibatches, micro-batches")
    loss: PPOLoss = Field(default_factory=PPOLoss, description="surrogate, value loss, entropy, GAE")
    kl: PPOKLSettings = Field(default_factory=PPOKLSettings, description="KL to the reference")
    critic: CriticSettings = Field(default_factory=CriticSettings, description="the value function")
    train: LoopSettings = Field(default_factory=LoopSettings, description="steps and the cadence of log / eval / checkpoint")
    optim: PPOOptimSettings = Field(default_factory=lambda: PPOOptimSettings(lr=1e-5, schedule="constant"),
                                    description="AdamW over policy and critic")
    disable_dropout: bool = Field(True, description="run policy and critic in eval mode while training (no dropout)")
    eval: RLEvalSettings = Field(default_factory=RLEvalSettings, description="held-out evaluation")
    samples_every: int = Field(10, ge=0, description="write sampled completions (JSONL + W&B table) every N steps (0 = never)")
    save_merged: bool = Field(False, description="with LoRA, also write the merged full model (else the adapter)")

    @model_validator(mode="after")
    def _step_shape(self) -> "Config":
        check_step_shape(self.rl, self.sampling, self.kl)
        return self

    @model_validator(mode="after")
    def _warmup_ends_before_the_run(self) -> "Config":
        if self.critic.warmup_steps >= self.train.max_steps:  # else the input policy is saved as the PPO result
            raise UserError(
                f"config key 'critic.warmup_steps' ({self.critic.warmup_steps}) must be below train.max_steps "
                f"({self.train.max_steps}): during the warm-up only the critic trains, so the stage would save the "
                "input policy unchanged as its result; lower critic.warmup_steps or raise train.max_steps")
        return self


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    # 1. accelerator and seed ---------------------------------------------------------------------------------
    check_environment()
    accelerator = make_accelerator(cfg.train, cfg.seed)
    check_step_shape(cfg.rl, cfg.sampling, cfg.kl, processes=accelerator.num_processes)
    if cfg.rl.asynchronous is not None:
        raise UserError("config key 'rl.asynchronous' is grpo's (ppo samples in the loop): set rl.asynchronous: null")
    check_engine(accelerator, micro_batches=rl_micro_batches(cfg.rl, cfg.sampling.n), generates="ppo's rollouts",
                 merges="save_merged" if cfg.save_merged and cfg.model.lora else None)
    beta_on = cfg.kl.beta > 0
    # whitening and the logged batch statistics over every process's share of the batch
    all_reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None

    # 2. policy (with what the critic needs of it); with LoRA the reference is the adapters off, else a frozen copy ----
    policy = PolicyModel.load(policy_settings(cfg.model, cfg.critic), with_reference=beta_on, seed=cfg.seed)
    tokenizer = policy.tokenizer

    # 3. prompts and the scoring interface (the same for rules and reward models) ----------------------------------
    records = load_rl_prompts(cfg.data.prompts, cfg.data.tasks, cfg.data.limit, tokenizer,
                              max_prompt_tokens=prompt_budget(policy.model.config, cfg.sampling.max_new_tokens),
                              image_inputs=policy.image_inputs, model_name=cfg.model.path)
    if len(records) < cfg.rl.prompts_per_step:
        raise UserError(f"{cfg.data.prompts}: {len(records)} prompts, fewer than rl.prompts_per_step={cfg.rl.prompts_per_step}")
    shared = shared_reward_models(cfg.rewards, policy, cfg.model.path) if cfg.reward.share_base and policy.is_lora else {}
    scorer = Scorer(cfg.rewards, device=policy.device, models=shared)
    eval_budget = prompt_budget(policy.model.config, cfg.eval.generation.max_new_tokens, "eval.generation.max_new_tokens")
    eval_records = (load_rl_prompts(cfg.eval.prompts, cfg.eval.tasks, cfg.eval.limit, tokenizer,
                                    max_prompt_tokens=eval_budget, image_inputs=policy.image_inputs,
                                    model_name=cfg.model.path) if cfg.eval.prompts else [])
    eval_scorer = Scorer(cfg.eval.rewards, device=policy.device) if cfg.eval.rewards else scorer

    # 4. critic: a value model of its own, a head on the policy's trunk, or an adapter + head on its frozen base ------
    critic = build_critic(cfg.critic, policy, cfg.rewards, cfg.model, shared)

    # 5. one AdamW over policy and critic (one loss, one clipped gradient norm), prepared by accelerate --------------
    modules = [*policy.modules(), *([critic.module] if critic.module is not None else [])]
    check_engine(accelerator, modules=len(modules))  # DeepSpeed takes one model
    policy.keep_whole_weights(accelerator)  # FSDP: unsharded copies to sample and save with
    critic.keep_whole_weights(accelerator)
    together = shard_together(accelerator, modules) if is_fsdp(accelerator) else None  # before the optimizer sees them
    optimizer = make_optimizer([p for m in modules for p in m.parameters()], cfg.optim)
    for group in optimizer.param_groups:
        group["eps"] = cfg.optim.eps
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps * updates_per_step(cfg.rl))
    if together is not None:  # accelerate's FSDP2 prepares one model per call: the modules as one container
        _, optimizer, scheduler = accelerator.prepare(together, optimizer, scheduler)
    else:
        *modules, optimizer, scheduler = accelerator.prepare(*modules, optimizer, scheduler)
    policy.model, policy.value_head = modules[0], modules[1] if policy.value_head is not None else None
    critic.module = modules[-1] if critic.module is not None else None
    prepare_reference(accelerator, policy)
    trainable = nn.ModuleList(modules)  # what the gradient norm is clipped over
    policy_params = critic.policy_parameters(policy)  # what a critic warm-up keeps still

    # 6. resume: weights (policy and critic), optimizer, scheduler, RNG and β ---------------------------------------
    start, counters, timer = resume_state(accelerator, ctx)
    kl_ctl = make_kl_controller(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon, counters.pop("kl", None))
    early = cfg.rl.early_stop
    stopper = EarlyStop(early, ctx.dir, accelerator, counters.pop("early_stop", None)) if early else None
    last_step = cfg.train.max_steps

    def evaluate() -> dict[str, float]:
        """Held-out gold scores (`eval.rewards`) and, on the same completions, the training reward (`eval/rm_score`):
        the two side by side show over-optimization (the RM score rising while gold falls)."""
        if not eval_records:
            return {}
        return evaluate_gold(policy.unwrapped(accelerator), eval_records, cfg.eval.generation,
                             scorer_score_fn(eval_scorer, scorer), seed=cfg.seed, accelerator=accelerator)

    # 7. the loop -----------------------------------------------------------------------------------------------
    for m in modules:
        m.train(not cfg.disable_dropout)  # eval mode = no dropout (N details); the gradient flows the same
    metrics: dict[str, float] = {}
    for step in progress(range(start, cfg.train.max_steps), total=cfg.train.max_steps, initial=start, desc=ctx.name):
        policy_on = step >= cfg.critic.warmup_steps  # critic warm-up: the policy does not move yet
        plan = update_plan(cfg.seed, step, cfg.rl.prompts_per_step * cfg.sampling.n, cfg.rl)

        # 7.1 rollout: sample, score; old log-probs, reference log-probs and values in the first epoch's micro-batches,
        # so the first minibatch's forward repeats them bit for bit: ratio exactly 1 there ------------------------------
        idx = micro_batch_indices(len(records), cfg.rl.prompts_per_step, step, cfg.seed, accelerator.process_index,
                                  accelerator.num_processes)
        exp = make_experience(policy.unwrapped(accelerator), scorer, [records[i] for i in idx], cfg.sampling,
                              seed=step_seed(cfg.seed, step), first_prompt=accelerator.process_index * cfg.rl.prompts_per_step,
                              micro_batches=sum(plan[0], []), with_reference=beta_on, critic=critic)
        mask = exp.response_mask

        # 7.2 scores → per-token rewards: fixed score without EOS, −β·KL per token, the score on the last token ---------
        beta = kl_ctl.value
        if cfg.reward.missing_eos_score is not None:
            exp.scores = fixed_score_without_eos(exp.scores, exp.rollout.ended, cfg.reward.missing_eos_score)
        token_rewards, reward_with_kl = _token_rewards(cfg, exp, beta, all_reduce)

        # 7.3 GAE on the critic's values (raw), then advantage whitening, visibly here -------------------------------
        exp.advantages, exp.returns = gae(token_rewards, exp.values, mask, cfg.loss.gamma, cfg.loss.lam)
        if cfg.loss.whiten_advantages:
            exp.advantages = masked_whiten(exp.advantages, mask, all_reduce=all_reduce) * mask

        # 7.4 K epochs × minibatches of the clipped surrogate + clipped value loss (− entropy bonus), micro-batched ------
        sums = MetricSums()
        update_started = time.perf_counter()
        for minibatches in plan:
            for micro in minibatches:
                # one global normalizer over the minibatch's micro-batches (and processes): accumulation = one batch
                normalizer = global_normalizer(accelerator, sum(
                    aggregate_normalizer(mask[m], cfg.loss.aggregation, max_len=cfg.sampling.max_new_tokens) for m in micro))
                for i, rows in enumerate(micro):
                    with accelerator.autocast(), sync_unless_last(accelerator, modules, i, len(micro)):
                        sums.add(_micro_batch_update(cfg, policy, critic, exp.select(rows), normalizer, beta, policy_on,
                                                     accelerator.backward), 1 / len(micro))
                if not policy_on:  # warm-up: only the critic's weights move (a shared trunk stays as it is)
                    for p in policy_params:
                        p.grad = None
                norm = optimizer_step(accelerator, trainable, optimizer, scheduler, cfg.optim.max_grad_norm,
                                      loss=sums.current.get("loss/total"))
                sums.end_minibatch({"train/grad_norm": norm})
        update_seconds = time.perf_counter() - update_started

        # 7.5 β, counters, metrics, then the shared tail (log / eval / checkpoint) -------------------------------
        row_kl = kl_k1(exp.old_logprobs, exp.ref_logprobs, mask).sum(-1) if beta_on else None
        if beta_on and policy_on:  # the same β on every process: the KL over the global batch
            kl_ctl.update(float(accelerator.reduce(row_kl.mean(), "mean")), len(exp) * accelerator.num_processes)
        tokens = int(mask.sum()) * accelerator.num_processes
        counters["samples"] += len(exp) * accelerator.num_processes
        counters["tokens"] += tokens
        step_metrics = {
            **rollout_metrics(exp, all_reduce),
            "train/reward_with_kl": float(reward_with_kl.mean()),
            "train/kl_coef": beta,
            "train/lr": scheduler.get_last_lr()[0],
            "train/policy_updating": float(policy_on),
            **_value_metrics(exp, all_reduce),
            **sums.means(),  # means over the step's optimizer updates
            **sums.first_minibatch("train/ratio_mean", "train/approx_kl_old"),
            "perf/update_seconds": update_seconds,
        }
        if beta_on:
            step_metrics["train/kl"] = float(row_kl.mean())
        if cfg.samples_every and (step + 1) % cfg.samples_every == 0 and accelerator.is_main_process:
            log_samples(ctx.tracker, exp, step + 1)
        stop = stopper is not None and stopper.update(step_metrics, step + 1, policy.unwrapped(accelerator).model)
        end_of_step(ctx, accelerator, cfg.train, step + 1, counters, timer, tokens=tokens, metrics=step_metrics,
                    evaluate=evaluate, state={"kl": kl_ctl.state_dict(),
                                              **({"early_stop": stopper.state_dict()} if stopper else {})})
        metrics.update({k: step_metrics[k] for k in ("train/reward", "train/kl", "loss/policy", "loss/value") if k in step_metrics})
        if stop:
            last_step = early_stopped(ctx, stopper, step + 1)
            break

    # 8. final evaluation; the policy in Hugging Face format (the best step's under rl.early_stop), the critic beside it
    if stopper is not None:
        metrics.update(stopper.restore(policy.unwrapped(accelerator).model))
    metrics = final_eval_and_save(ctx, accelerator, policy, metrics, evaluate, counters, timer, last_step,
                                  merged=cfg.save_merged)
    if stopper is not None:
        stopper.remove()
    bare_critic = critic.bare(accelerator)  # every process: FSDP gathers the shards
    if accelerator.is_main_process:  # whole files or none: a kill mid-save leaves no half critic in the result
        write_into(ctx.dir, lambda staging: critic.save(staging, bare_critic))
    accelerator.wait_for_everyone()
    return metrics


def _token_rewards(cfg: Config, exp: Experience, beta: float, all_reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = −β·kl_t + [t = last]·score (the KL term only with `kl.in_reward`; whitened with
    `reward.whiten`), and each row's KL-regularized objective score − β·Σ kl_t, wherever the KL enters."""
    mask = exp.response_mask
    kl = torch.zeros_like(exp.old_logprobs)
    if cfg.kl.beta > 0:
        kl = KL_ESTIMATORS[cfg.kl.estimator](exp.old_logprobs, exp.ref_logprobs, mask)
    token_rewards = kl_shaped_rewards(exp.scores, kl if cfg.kl.in_reward else torch.zeros_like(kl), mask, beta)
    if cfg.reward.whiten != "none":  # over the batch's counting tokens; "scale" keeps the mean (TRL)
        token_rewards = masked_whiten(token_rewards, mask, shift_mean=cfg.reward.whiten == "center",
                                      all_reduce=all_reduce) * mask
    return token_rewards, exp.scores - beta * kl.sum(-1)


def _value_metrics(exp: Experience, all_reduce) -> dict[str, float]:
    """The critic's fit (explained variance of the returns, value and return means) and the advantages' moments."""
    mask = exp.response_mask
    advantage_mean, advantage_var = masked_moments(exp.advantages, mask, all_reduce)
    residual_var = masked_moments(exp.returns - exp.values, mask, all_reduce)[1]
    returns_var = masked_moments(exp.returns, mask, all_reduce)[1]
    return {
        "train/advantage_mean": float(advantage_mean),
        "train/advantage_std": float(advantage_var.sqrt()),
        "value/explained_var": 1.0 - float(residual_var / returns_var.clamp(min=1e-8)),
        "value/mean": float(masked_mean(exp.values, mask)),
        "value/returns_mean": float(masked_mean(exp.returns, mask)),
    }


def _micro_batch_update(cfg: Config, policy: PolicyModel, critic: Critic, part: Experience, normalizer, beta: float,
                        policy_on: bool, backward) -> dict[str, torch.Tensor]:
    """Backpropagate one micro-batch's share of L = clipped surrogate (+ β·KL in the loss) − c_H·entropy
    + c_v·clipped value loss; return its detached stats. Before `policy_on` (critic warm-up) only the value loss.

    With a critic of its own (model / adapter) the policy part is backpropagated before the critic runs, so the two
    graphs never coexist: peak activation memory is the larger of the two, not their sum (the gradients add up the
    same). A value head shares the policy's forward, so its loss goes back in one pass."""
    mask, shared = part.response_mask, critic.shares_policy_forward
    agg, max_len = cfg.loss.aggregation, cfg.sampling.max_new_tokens
    metrics: dict[str, torch.Tensor] = {}
    policy_part = None
    out = None
    if policy_on or shared:
        out = policy.forward(part.rollout, temperature=cfg.sampling.temperature, with_entropy=True, with_values=shared)
    if policy_on:
        per_token, stats = clipped_surrogate(out.logprobs, part.old_logprobs, part.advantages, mask,
                                             eps_low=cfg.loss.eps, eps_high=cfg.loss.eps)
        policy_loss = aggregate(per_token, mask, agg, normalizer, max_len=max_len)
        entropy = aggregate(out.entropy, mask, agg, normalizer, max_len=max_len)
        policy_part = policy_loss - cfg.loss.entropy_coef * entropy
        metrics.update({"loss/policy": policy_loss.detach(), "loss/entropy": entropy.detach(),
                        "train/entropy": masked_mean(out.entropy.detach(), mask),
                        **{f"train/{k}": v for k, v in stats.items()}})
        if beta > 0 and not cfg.kl.in_reward:
            ratio = importance_ratio(out.logprobs, part.old_logprobs, mask) if cfg.kl.importance_weighted else None
            kl = kl_penalty(out.logprobs, part.ref_logprobs, cfg.kl.estimator, importance_ratio=ratio, response_mask=mask)
            kl_loss = aggregate(kl, mask, agg, normalizer, max_len=max_len)
            policy_part = policy_part + beta * kl_loss
            metrics["loss/kl"] = kl_loss.detach()
        if not shared:
            backward(policy_part)
    values = out.values if shared else critic.values(policy, part.rollout)
    v_loss, v_stats = value_loss(values, part.values, part.returns, mask, clip_eps=cfg.loss.value_clip, mode=agg,
                                 normalizer=normalizer, max_len=max_len)
    value_part = cfg.loss.value_coef * v_loss
    backward(value_part + policy_part if shared and policy_part is not None else value_part)
    metrics.update({"loss/value": v_loss.detach(), "value/clip_frac": v_stats["value_clip_frac"],
                    "loss/total": (value_part + (policy_part if policy_part is not None else 0.0)).detach()})
    return metrics
