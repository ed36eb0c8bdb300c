"""PPO with a learned critic: RLHF as in InstructGPT (Ouyang et al. 2022), on the shared rollout path.

Each step samples a batch, scores it (learned reward models and/or rules), and shapes per-token rewards with a KL
penalty to the reference, the score landing on the last counting token (the EOS):

    r_t = −β·kl_t + [t = last]·score,    kl_t = log π_old(y_t) − log π_ref(y_t)   (k1; k2 / k3 as options)

(Ziegler et al. 2019, eq. 2; Stiennon et al. 2020). The critic gives a value per token; GAE(γ, λ) turns rewards and
values into advantages and returns (Schulman et al. 2016, eq. 16); then K epochs over shuffled minibatches of

    L = agg[ −min(ρ_t A_t, clip(ρ_t, 1 ± ε) A_t) ] + c_v·agg[ ½ max((V − R)², (clip(V, V_old ± ε_v) − R)²) ] − c_H·H

(Schulman et al. 2017, eq. 7 and 9; the clipped value loss of OpenAI baselines' PPO2), the gradient norm clipped.
β is fixed or adapted toward a target KL (Ziegler et al. 2019, §2.2). The critic (`critic.kind`):

    model       a separate value model initialised from the reward model: its score head read at every position,
                on the reward's normalized scale (InstructGPT; Huang et al. 2024, "The N+ Implementation Details").
                Without a learned reward model: the policy's weights with a zero head.
    value_head  a scalar head on the policy's own trunk (shared weights; lm-human-preferences).
    adapter     with LoRA: a second adapter plus a head on the policy's frozen base, so policy, reference (adapters
                off) and critic share one copy of the weights.

The implementation details of Huang et al. 2023 ("The N Implementation Details of RLHF with PPO") and 2024 are
config keys with their documented defaults: a fixed score for responses without EOS (`reward.missing_eos_score`),
reward whitening (`reward.whiten`), advantage whitening (`loss.whiten_advantages`), dropout off
(`disable_dropout`), value clipping (`loss.value_clip`), Adam ε (`optim.eps`); pad ≠ EOS, the score read at EOS,
left-padded generation, reward normalization with the RM's stored statistics and one temperature for sampling and
training log-probs come from the shared policy, scorer and rollout.

Steps: 1 accelerator → 2 policy (+ LoRA; reference = adapters off) → 3 prompts and rewards → 4 critic →
5 optimizer → 6 resume → 7 loop: rollout (+ old log-probs and values), shaped rewards, GAE, K × minibatch updates,
log / eval / checkpoint → 8 final eval, save policy and critic.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from rlhf.advantages import AdaptiveKLController, FixedKLController, fixed_score_without_eos, gae, kl_shaped_rewards
from rlhf.config import (
    LoopSettings, LoraSettings, ModelSettings, OptimSettings, RLSettings, SamplingSettings, Section, StageConfig,
)
from rlhf.distributed import check_engine, make_accelerator
from rlhf.errors import UserError
from rlhf.data import load_rl_prompts
from rlhf.evaluation import evaluate_gold, scorer_score_fn
from rlhf.losses import aggregate, aggregate_normalizer, clipped_surrogate, importance_ratio, kl_penalty, value_loss
from rlhf.ops import (
    KL_ESTIMATORS, kl_k1, masked_mean, masked_moments, masked_whiten, position_ids_from_mask,
)
from rlhf.policy import PolicyModel
from rlhf.recipes.rl_settings import KLSettings, PromptData, RLEvalSettings, rl_micro_batches
from rlhf.rollout import log_samples, make_experience
from rlhf.stage import StageContext
from rlhf.tracking import progress
from rlhf.training import (
    end_of_step, final_eval_and_save, make_optimizer, make_scheduler, micro_batch_indices, optimizer_step, resume_state,
)
from rlhf.types import Experience, Rollout
from reward_models.model import RewardModel
from reward_models.scoring import RewardComponent, Scorer
from reward_models.shared_base import shared_reward_models

CRITIC_DIR = "critic"  # the critic's weights inside the stage directory
CRITIC_ADAPTER = "critic"  # the critic adapter's name on a LoRA policy (peft saves it under <stage dir>/critic)
VALUE_HEAD_FILE = "value_head.safetensors"


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


class RewardShaping(Section):
    """What happens to the scorer's scores before they become per-token rewards."""

    missing_eos_score: float | None = Field(
        -1.0, description="score of a response cut at max_new_tokens without EOS, replacing the scorer's (null = keep it)")
    whiten: Literal["none", "scale", "center"] = Field(
        "none", description="whiten the KL-shaped token rewards over the batch: scale = divide by the std and keep the "
        "mean (TRL whiten_rewards), center = also subtract the mean")
    share_base: bool = Field(
        True, description="with model.lora: a reward model trained as LoRA on the policy's own base runs as one more "
        "adapter on it (no second copy of the weights); its scores are the same")


class CriticSettings(Section):
    """The value function V(state before each response token)."""

    kind: Literal["model", "value_head", "adapter"] = Field(
        "model", description="model = a separate value model (from the reward model); value_head = a head on the "
        "policy's trunk; adapter = a second LoRA adapter + head on the policy's frozen base (needs model.lora)")
    path: str | None = Field(
        None, description="model: initial weights, a reward model directory (its score head read per token) or a causal "
        "LM (a zero head); null = the first reward model in `rewards`, else the policy")
    normalize: bool = Field(
        True, description="model from a reward component: read values on that component's scale, "
        "weight·(score − mean)/std with its stored statistics, so initial values match the rewards")
    lora: LoraSettings | None = Field(None, description="adapter: the critic adapter's settings (null = model.lora's)")
    warmup_steps: int = Field(0, ge=0, description="the first N steps train only the critic; the policy does not move")


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
    reward: RewardShaping = Field(default_factory=RewardShaping, description="no-EOS score and reward whitening")
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


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    # 1. accelerator and seed ---------------------------------------------------------------------------------
    accelerator = make_accelerator(cfg.train, cfg.seed)
    check_engine(accelerator, micro_batches=rl_micro_batches(cfg.rl, cfg.sampling.n), generates="ppo's rollouts",
                 merges="save_merged" if cfg.save_merged and cfg.model.lora else None)
    kind = cfg.critic.kind
    beta_on = cfg.kl.beta > 0
    kl_in_reward = cfg.kl.in_reward
    temperature = cfg.sampling.temperature  # sampling and every training log-prob use the same one (N details)
    # whitening and the logged batch statistics over every process's share of the batch
    all_reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None
    if kind == "adapter" and cfg.model.lora is None:
        raise UserError("config key 'critic.kind' is 'adapter': set model.lora too (the critic adapter shares the "
                        "policy's frozen base), or use critic.kind: model")

    # 2. policy; with LoRA the reference is the same weights with adapters disabled, else a frozen copy --------------
    policy = PolicyModel.load(cfg.model.model_copy(update={"value_head": kind == "value_head"}),
                              with_reference=beta_on, seed=cfg.seed)
    tokenizer = policy.tokenizer

    # 3. prompts and the scoring interface (the same for rules and reward models) ----------------------------------
    records = load_rl_prompts(cfg.data.prompts, cfg.data.tasks, cfg.data.limit, tokenizer)
    if len(records) < cfg.rl.prompts_per_step:
        raise UserError(f"{cfg.data.prompts}: {len(records)} prompts, fewer than rl.prompts_per_step={cfg.rl.prompts_per_step}")
    shared = shared_reward_models(cfg.rewards, policy, cfg.model.path) if cfg.reward.share_base and policy.is_lora else {}
    scorer = Scorer(cfg.rewards, device=policy.device, models=shared)
    eval_records = load_rl_prompts(cfg.eval.prompts, cfg.eval.tasks, cfg.eval.limit, tokenizer) if cfg.eval.prompts else []
    eval_scorer = Scorer(cfg.eval.rewards, device=policy.device) if cfg.eval.rewards else scorer

    # 4. critic: a value model of its own, a head on the policy's trunk, or an adapter + head on its frozen base ------
    critic: nn.Module | None = None  # the critic's modules outside policy.model (value_head: policy.value_head)
    if kind == "model":
        critic = _value_model(cfg, tokenizer).to(policy.device)
    elif kind == "adapter":
        critic = _critic_adapter(cfg, policy, shared).to(policy.device)

    # 5. one AdamW over policy and critic (one loss, one clipped gradient norm), prepared by accelerate --------------
    modules = [m for m in (*policy.modules(), critic) if m is not None]
    check_engine(accelerator, modules=len(modules))  # DeepSpeed takes one model
    updates_per_step = cfg.rl.epochs * cfg.rl.minibatches
    optimizer = make_optimizer([p for m in modules for p in m.parameters()], cfg.optim)
    for group in optimizer.param_groups:
        group["eps"] = cfg.optim.eps
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps * updates_per_step)
    *modules, optimizer, scheduler = accelerator.prepare(*modules, optimizer, scheduler)
    policy.model = modules[0]
    if kind == "value_head":
        policy.value_head = modules[1]
    if critic is not None:
        critic = modules[-1]
    trainable = nn.ModuleList(modules)  # what the gradient norm is clipped over
    critic_ids = {id(p) for n, p in policy.model.named_parameters() if f".{CRITIC_ADAPTER}." in n} if kind == "adapter" else set()
    policy_params = [p for p in policy.model.parameters() if p.requires_grad and id(p) not in critic_ids]

    def set_mode() -> None:  # eval mode = no dropout (N details); the gradient flows the same
        for m in modules:
            m.train(not cfg.disable_dropout)

    def values_of(rollout: Rollout) -> torch.Tensor:
        """V per response token from the critic (with grad). Shape: (B, T). value_head: from `policy.forward`."""
        if kind == "model":
            return critic(rollout)
        with policy.using_adapter(CRITIC_ADAPTER):
            return _head_values(policy.model, critic, rollout)

    # 6. resume: weights (policy and critic), optimizer, scheduler, RNG and β ---------------------------------------
    start, counters, timer = resume_state(accelerator, ctx)
    if cfg.kl.target is not None:
        kl_ctl = AdaptiveKLController(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon)
    else:
        kl_ctl = FixedKLController(cfg.kl.beta)
    if "kl_coef" in counters:
        kl_ctl.load_state_dict({"value": counters.pop("kl_coef")})

    def evaluate() -> dict[str, float]:
        """Held-out gold scores (`eval.rewards`) and, on the same completions, the training reward (`eval/rm_score`):
        the two side by side show over-optimization (the RM score rising while gold falls)."""
        if not eval_records:
            return {}
        return evaluate_gold(policy.unwrapped(accelerator), eval_records, cfg.eval.generation,
                             scorer_score_fn(eval_scorer, scorer), seed=cfg.seed, accelerator=accelerator)

    # 7. the loop -----------------------------------------------------------------------------------------------
    set_mode()
    metrics: dict[str, float] = {}
    for step in progress(range(start, cfg.train.max_steps), total=cfg.train.max_steps, initial=start, desc=ctx.name):
        policy_on = step >= cfg.critic.warmup_steps  # critic warm-up: the policy does not move yet
        orders = [_order(cfg.seed, step, epoch, cfg.rl.prompts_per_step * cfg.sampling.n) for epoch in range(cfg.rl.epochs)]
        first_micro = _micro_batches(orders[0], cfg.rl)

        # 7.1 rollout: sample, score, reference log-probs, values; old log-probs in the first epoch's micro-batches,
        # so the first minibatch's forward repeats them bit for bit: ratio exactly 1 there ------------------------------
        def critic_hook(rollout: Rollout) -> torch.Tensor:
            for m in modules:
                m.eval()
            try:
                return _gather(values_of, rollout, first_micro)
            finally:
                set_mode()

        idx = micro_batch_indices(len(records), cfg.rl.prompts_per_step, step, cfg.seed, accelerator.process_index,
                                  accelerator.num_processes)
        bare = policy.unwrapped(accelerator)
        exp = make_experience(bare, scorer, [records[i] for i in idx], cfg.sampling,
                              seed=cfg.seed * 1_000_003 + step * 1009, with_old_logprobs=False, with_reference=beta_on,
                              critic=critic_hook if kind != "value_head" else None,
                              micro_batch_size=cfg.rl.micro_batch_size,
                              first_prompt=accelerator.process_index * cfg.rl.prompts_per_step)
        if len(exp) != len(orders[0]):
            raise RuntimeError(f"rollout has {len(exp)} rows, expected {len(orders[0])}")
        mask = exp.response_mask
        old_started = time.perf_counter()
        for m in modules:
            m.eval()
        if kind == "value_head":  # the shared trunk: the values come from the same forward as the log-probs
            both = _gather(lambda r: torch.stack(_logprobs_and_values(bare, r, temperature), -1), exp.rollout, first_micro)
            exp.old_logprobs, exp.values = both[..., 0] * mask, both[..., 1] * mask
        else:
            exp.old_logprobs = _gather(lambda r: bare.forward(r, temperature).logprobs, exp.rollout, first_micro) * mask
        set_mode()
        exp.timings["old_logprobs"] = time.perf_counter() - old_started
        if kind == "value_head":
            exp.timings["values"] = 0.0  # read in the old-log-prob pass above (one forward of the shared trunk)

        # 7.2 scores → per-token rewards: fixed score without EOS, −β·KL per token, the score on the last token ---------
        beta = kl_ctl.value
        scores = exp.scores
        if cfg.reward.missing_eos_score is not None:
            scores = fixed_score_without_eos(scores, exp.rollout.ended, cfg.reward.missing_eos_score)
        row_kl = (kl_k1(exp.old_logprobs, exp.ref_logprobs) * mask).sum(-1) if beta_on else torch.zeros_like(scores)
        kl_tokens = (KL_ESTIMATORS[cfg.kl.estimator](exp.old_logprobs, exp.ref_logprobs) * mask if beta_on
                     else torch.zeros_like(exp.old_logprobs))
        token_rewards = kl_shaped_rewards(scores, kl_tokens if kl_in_reward else torch.zeros_like(kl_tokens), mask, beta)
        reward_with_kl = scores - beta * kl_tokens.sum(-1)  # the KL-regularized objective, wherever the KL enters
        if cfg.reward.whiten != "none":  # over the batch's counting tokens; "scale" keeps the mean (TRL)
            token_rewards = masked_whiten(token_rewards, mask, shift_mean=cfg.reward.whiten == "center",
                                          all_reduce=all_reduce) * mask

        # 7.3 GAE on the critic's values (raw), then advantage whitening, visibly here -------------------------------
        advantages, exp.returns = gae(token_rewards, exp.values, mask, cfg.loss.gamma, cfg.loss.lam)
        if cfg.loss.whiten_advantages:
            advantages = masked_whiten(advantages, mask, all_reduce=all_reduce) * mask
        exp.advantages = advantages
        advantage_mean, advantage_var = masked_moments(advantages, mask, all_reduce)
        residual_var = masked_moments(exp.returns - exp.values, mask, all_reduce)[1]
        returns_var = masked_moments(exp.returns, mask, all_reduce)[1]
        explained_var = 1.0 - float(residual_var / returns_var.clamp(min=1e-8))

        # 7.4 K epochs × minibatches of the clipped surrogate + clipped value loss (− entropy bonus), micro-batched ------
        sums: dict[str, float] = {}
        losses: list[float] = []
        first: dict[str, float] = {}  # the first minibatch of the first epoch: ratio 1, approx-KL 0 (a sanity check)
        update_started = time.perf_counter()
        for epoch, order in enumerate(orders):
            for mb_index, mb in enumerate(order.chunk(cfg.rl.minibatches)):
                micro = mb.split(cfg.rl.micro_batch_size)
                # one global normalizer over the minibatch's micro-batches (and processes): accumulation = one batch
                local = sum(aggregate_normalizer(mask[m], cfg.loss.aggregation, max_len=cfg.sampling.max_new_tokens)
                            for m in micro)
                normalizer = accelerator.reduce(torch.as_tensor(float(local), device=accelerator.device), "sum")
                normalizer = normalizer / accelerator.num_processes
                for i, rows in enumerate(micro):
                    part = exp.select(rows)
                    with accelerator.autocast(), _no_sync(accelerator, modules, i, len(micro)):
                        stats = _micro_batch_update(cfg, policy, values_of, part, normalizer, beta, policy_on,
                                                    accelerator.backward)
                    for key, value in stats.items():
                        # a micro-batch's loss is its share of the minibatch loss (global normalizer): sum the shares;
                        # rates (clip fractions, entropy...) are averaged over micro-batches
                        share = 1 if key.startswith("loss/") else 1 / len(micro)
                        sums[key] = sums.get(key, 0.0) + float(value) * share
                        if epoch == 0 and mb_index == 0 and key in ("train/ratio_mean", "train/approx_kl_old"):
                            first[key] = first.get(key, 0.0) + float(value) * share
                mb_loss = sums.get("loss/total", 0.0) - sum(losses)
                losses.append(mb_loss)
                if not policy_on:  # warm-up: only the critic's weights move (a shared trunk stays as it is)
                    for p in policy_params:
                        p.grad = None
                sums["train/grad_norm"] = sums.get("train/grad_norm", 0.0) + optimizer_step(
                    accelerator, trainable, optimizer, scheduler, cfg.optim.max_grad_norm, loss=mb_loss)
        update_seconds = time.perf_counter() - update_started

        # 7.5 β, counters, metrics, then the shared tail (log / eval / checkpoint) -------------------------------
        if beta_on and policy_on:  # the same β on every process: the KL over the global batch
            kl_ctl.update(float(accelerator.reduce(row_kl.mean(), "mean")), len(exp) * accelerator.num_processes)
        tokens = int(mask.sum()) * accelerator.num_processes
        counters["samples"] += len(exp) * accelerator.num_processes
        counters["tokens"] += tokens
        step_metrics = {
            "train/reward": float(scores.mean()),
            "train/reward_std": float(masked_moments(scores, torch.ones_like(mask[:, 0]), all_reduce)[1].sqrt()),
            "train/reward_with_kl": float(reward_with_kl.mean()),
            "train/kl_coef": beta,
            "train/response_length": float(exp.rollout.lengths.float().mean()),
            "train/truncated_frac": 1.0 - float(exp.rollout.ended.float().mean()),
            "train/lr": scheduler.get_last_lr()[0],
            "train/policy_updating": float(policy_on),
            "train/advantage_mean": float(advantage_mean),
            "train/advantage_std": float(advantage_var.sqrt()),
            "value/explained_var": explained_var,
            "value/mean": float(masked_mean(exp.values, mask)),
            "value/returns_mean": float(masked_mean(exp.returns, mask)),
            **{k: v / updates_per_step for k, v in sums.items()},  # means over the step's optimizer updates
            **{f"train/first_minibatch_{k.split('/')[-1]}": v for k, v in first.items()},
            **{f"reward/{k}": float(v.mean()) for k, v in exp.components.items()},
            **{f"perf/{k}_seconds": v for k, v in exp.timings.items()},
            "perf/update_seconds": update_seconds,
        }
        if beta_on:
            step_metrics["train/kl"] = float(row_kl.mean())
        if cfg.samples_every and (step + 1) % cfg.samples_every == 0 and accelerator.is_main_process:
            log_samples(ctx.tracker, exp, step + 1)
        end_of_step(ctx, accelerator, cfg.train, step + 1, counters, timer, tokens=tokens, metrics=step_metrics,
                    evaluate=evaluate, state={"kl_coef": kl_ctl.value})
        metrics.update({k: step_metrics[k] for k in ("train/reward", "train/kl", "loss/policy", "loss/value") if k in step_metrics})

    # 8. final evaluation; the policy in Hugging Face format, the critic beside it ---------------------------------
    metrics = final_eval_and_save(ctx, accelerator, policy, metrics, evaluate, counters, timer, cfg.train.max_steps,
                                  merged=cfg.save_merged)  # value_head: its head file; adapter: peft writes critic/
    if accelerator.is_main_process and kind == "model":
        accelerator.unwrap_model(critic).save(ctx.dir / CRITIC_DIR)
    elif accelerator.is_main_process and kind == "adapter":
        from safetensors.torch import save_file

        (ctx.dir / CRITIC_DIR).mkdir(exist_ok=True)
        head = accelerator.unwrap_model(critic)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(ctx.dir / CRITIC_DIR / VALUE_HEAD_FILE))
    accelerator.wait_for_everyone()
    return metrics


def _micro_batch_update(cfg: Config, policy: PolicyModel, values_of, part: Experience, normalizer, beta: float,
                        policy_on: bool, backward) -> dict[str, torch.Tensor]:
    """Backpropagate one micro-batch's share of L = clipped surrogate (+ β·KL in the loss) − c_H·entropy
    + c_v·clipped value loss; return its detached stats. Before `policy_on` (critic warm-up) only the value loss.

    With a critic of its own (model / adapter) the policy part is backpropagated before the critic runs, so the two
    graphs never coexist: peak activation memory is the larger of the two, not their sum (the gradients add up the
    same). A value head shares the policy's forward, so its loss goes back in one pass."""
    kind, mask = cfg.critic.kind, part.response_mask
    agg, max_len = cfg.loss.aggregation, cfg.sampling.max_new_tokens
    metrics: dict[str, torch.Tensor] = {}
    policy_part = None
    out = None
    if policy_on or kind == "value_head":
        out = policy.forward(part.rollout, temperature=cfg.sampling.temperature, with_entropy=True,
                             with_values=kind == "value_head")
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
            kl = kl_penalty(out.logprobs, part.ref_logprobs, cfg.kl.estimator, importance_ratio=ratio)
            kl_loss = aggregate(kl, mask, agg, normalizer, max_len=max_len)
            policy_part = policy_part + beta * kl_loss
            metrics["loss/kl"] = kl_loss.detach()
        if kind != "value_head":
            backward(policy_part)
    values = out.values if kind == "value_head" else values_of(part.rollout)
    v_loss, v_stats = value_loss(values, part.values, part.returns, mask, clip_eps=cfg.loss.value_clip, mode=agg,
                                 normalizer=normalizer, max_len=max_len)
    value_part = cfg.loss.value_coef * v_loss
    backward(value_part + policy_part if kind == "value_head" and policy_part is not None else value_part)
    metrics.update({"loss/value": v_loss.detach(), "value/clip_frac": v_stats["value_clip_frac"],
                    "loss/total": (value_part + (policy_part if policy_part is not None else 0.0)).detach()})
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# The critic


class ValueModel(nn.Module):
    """A critic of its own: a decoder reward model's trunk and score head, read before every response token.

    V_t = scale · score(prefix up to the token before y_t) + shift, so that a critic initialised from a reward
    model whose scores the scorer normalizes starts on the rewards' scale: scale = weight / std, shift =
    −weight · mean / std (the component's weight and stored statistics).
    """

    def __init__(self, rm: RewardModel, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.rm = rm
        self.scale, self.shift = float(scale), float(shift)

    def forward(self, rollout: Rollout) -> torch.Tensor:
        """Values of the states before each response token. Shape: (B, T)."""
        input_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
        attention_mask = torch.cat([rollout.prompt_mask, rollout.response_mask], dim=1).long()
        t = rollout.response_ids.size(1)
        scores = self.rm.token_scores(input_ids, attention_mask, position_ids_from_mask(attention_mask))
        return scores[:, -t - 1:-1] * self.scale + self.shift

    def save(self, path: str | Path) -> None:
        """The trunk and head as a Hugging Face sequence classifier, plus the scale and shift (critic.json)."""
        self.rm.save(path)
        (Path(path) / "critic.json").write_text(json.dumps({"scale": self.scale, "shift": self.shift}, indent=2))


def _value_model(cfg: Config, tokenizer) -> ValueModel:
    """The separate critic: from `critic.path`, else the first reward model component, else the policy's weights."""
    component = next((c for c in cfg.rewards if c.model is not None), None)
    path = cfg.critic.path or (component.model if component is not None else cfg.model.path)
    if path is None:
        raise UserError("config key 'critic.path' is required when the policy is built from scratch and no reward "
                        "model is configured")
    scale, shift = 1.0, 0.0
    if _is_reward_model(path):
        rm = RewardModel.load(path)
        owner = next((c for c in cfg.rewards if c.model == path), None)
        if owner is not None and owner.normalize and cfg.critic.normalize and rm.stats is not None:
            std = max(rm.stats["std"], 1e-6)
            scale, shift = owner.weight / std, -owner.weight * rm.stats["mean"] / std
    else:  # a causal LM (e.g. the policy): its trunk and a zero head, V = 0 at start
        rm = RewardModel.from_backbone(path, tokenizer=cfg.model.tokenizer)
        nn.init.zeros_(rm.hf.score.weight)
    if rm.backbone != "decoder":
        raise UserError(f"critic from {path}: an encoder cannot give per-token values; use a decoder reward model or "
                        "critic.kind: value_head")
    if rm.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"critic from {path}: its tokenizer differs from the policy's, so it cannot read the policy's "
                        "tokens; set critic.path to a model with the policy's tokenizer, or use critic.kind: value_head")
    return ValueModel(rm, scale, shift)


def _is_reward_model(path: str) -> bool:
    """A sequence-classification checkpoint with one label (the reward stage's output), not a causal LM."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text())
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _head_values(model, head: nn.Module, rollout: Rollout) -> torch.Tensor:
    """A scalar head on `model`'s last hidden state before each response token (as `PolicyModel.forward` reads its
    value head). Shape: (B, T)."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.response_mask], dim=1).long()
    t = rollout.response_ids.size(1)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                logits_to_keep=1, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1][:, -t - 1:-1]
    return head(hidden.to(head.weight.dtype)).squeeze(-1)


def _critic_adapter(cfg: Config, policy: PolicyModel, shared: dict[str, RewardModel]) -> nn.Linear:
    """The critic as a second adapter on the policy's base, plus its head. When the reward model it starts from
    (`critic.path`, else the first reward model) runs on that base (`shared`), the adapter and head start as that
    reward model's, on the normalized reward scale; otherwise a fresh adapter and a zero head (V = 0)."""
    source = cfg.critic.path or next((c.model for c in cfg.rewards if c.model is not None), None)
    owner = next((c for c in cfg.rewards if c.model is not None and c.model == source and c.name in shared), None)
    hidden = policy.model.config.hidden_size
    if owner is None:
        policy.add_adapter(CRITIC_ADAPTER, cfg.critic.lora or cfg.model.lora)
        head = nn.Linear(hidden, 1)
        nn.init.zeros_(head.weight)  # V = 0 at start, the mean of the normalized rewards
        nn.init.zeros_(head.bias)
        return head
    rm = shared[owner.name]
    reward_adapter = rm.hf.adapter
    policy.add_adapter(CRITIC_ADAPTER, rm.hf.lora)
    params = dict(policy.model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if f".{CRITIC_ADAPTER}." in name:
                param.copy_(params[name.replace(f".{CRITIC_ADAPTER}.", f".{reward_adapter}.")])
    scale, shift = 1.0, 0.0
    if owner.normalize and cfg.critic.normalize and rm.stats is not None:
        std = max(rm.stats["std"], 1e-6)
        scale, shift = owner.weight / std, -owner.weight * rm.stats["mean"] / std
    head = nn.Linear(hidden, 1)
    with torch.no_grad():
        head.weight.copy_(rm.hf.score.weight * scale)
        head.bias.fill_(shift + (float(rm.hf.score.bias) * scale if rm.hf.score.bias is not None else 0.0))
    return head


# ---------------------------------------------------------------------------------------------------------------
# Small pieces


def _order(seed: int, step: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled row order of one epoch: a function of (seed, step, epoch), so a resumed run repeats it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + step * 131 + epoch))


def _micro_batches(order: torch.Tensor, rl: RLSettings) -> list[torch.Tensor]:
    """The micro-batches of one epoch, in training order (minibatches split into rows of at most micro_batch_size)."""
    return [m for mb in order.chunk(rl.minibatches) for m in mb.split(rl.micro_batch_size)]


def _logprobs_and_values(policy: PolicyModel, rollout: Rollout, temperature: float):
    out = policy.forward(rollout, temperature, with_values=True)
    return out.logprobs, out.values


@torch.no_grad()
def _gather(fn, rollout: Rollout, micro: list[torch.Tensor]) -> torch.Tensor:
    """`fn(rollout.select(rows))` for each micro-batch, put back in row order. Shape: (B, T, ...)."""
    out = None
    for rows in micro:
        part = fn(rollout.select(rows))
        if out is None:
            out = part.new_zeros((len(rollout), *part.shape[1:]))
        out[rows.to(out.device)] = part
    return out


def _no_sync(accelerator, modules, index: int, count: int):
    """Skip DDP's gradient all-reduce on every trained module but on the last micro-batch of an optimizer step."""
    stack = ExitStack()
    if index != count - 1:
        for m in modules:
            stack.enter_context(accelerator.no_sync(m))
    return stack
