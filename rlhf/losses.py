"""Pure losses. Each returns `(loss, metrics)` where metrics are detached floats-to-be. Only torch is imported.

Aggregation: token-level losses are summed and divided by a normalizer the caller may pass in, so that under
gradient accumulation every micro-batch divides by the same global count (verl `agg_loss`, OpenRLHF
`test_loss_aggregation.py`): the accumulated gradient then equals the full-batch gradient exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.ops import KL_ESTIMATORS, kl_k3, masked_log_ratio, masked_mean


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood. Shape: logits (B, L, V), input_ids (B, L) -> (B, L-1).

    Position t holds -log p(input_ids[t+1] | input_ids[:t+1]).
    """
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)


def sft_loss_weights(completion_mask: torch.Tensor, attention_mask: torch.Tensor, prompt_loss_weight: float) -> torch.Tensor:
    """Per-target-token weights: 1 on completion tokens, λ on prompt tokens, 0 on padding. Shape: (B, L) -> (B, L-1).

    Masks describe the *input* positions; weights describe the *targets*, so both are shifted left by one (the
    first token, BOS, is never a target).
    """
    completion = completion_mask[:, 1:].float()
    real = attention_mask[:, 1:].float()
    return completion + prompt_loss_weight * (real - completion)


def sft_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    weights: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_total = L_task + λ·L_LM as one weighted token mean.

    L = (Σ_completion nll + λ Σ_prompt nll) / (N_completion + λ N_prompt), with `weights` from `sft_loss_weights`.
    λ = 0 is the usual masked-label SFT loss; λ = 1 is exactly the plain LM loss over the whole sequence
    (GPT-1's L3 = L2 + λ·L1 with one shared token normalizer). `normalizer` defaults to Σ weights of this batch;
    pass the global Σ weights under gradient accumulation.
    """
    return weighted_nll_loss(token_nll(logits, input_ids), weights, normalizer)


def weighted_nll_loss(
    nll: torch.Tensor, weights: torch.Tensor, normalizer: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`sft_loss` from per-target NLLs (B, L-1) already computed (e.g. a chunk of positions at a time)."""
    total = (nll * weights).sum()
    denom = weights.sum() if normalizer is None else normalizer
    loss = total / torch.as_tensor(denom, dtype=total.dtype).clamp(min=1e-8)
    return loss, {"loss/nll_sum": total.detach(), "loss/weight_sum": weights.sum().detach()}


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalizer=None):
    """Plain next-token loss over every real token (pretraining). Returns (loss, metrics)."""
    weights = attention_mask[:, 1:].float()
    nll = token_nll(logits, input_ids)
    denom = weights.sum() if normalizer is None else normalizer
    total = (nll * weights).sum()
    loss = total / torch.as_tensor(denom, dtype=nll.dtype).clamp(min=1e-8)
    return loss, {"loss/nll_sum": total.detach(), "loss/weight_sum": weights.sum().detach()}


# ---------------------------------------------------------------------------------------------------------------
# RL losses. Per-token terms are (B, T) and are combined by `aggregate` once, under a named mode.
# ---------------------------------------------------------------------------------------------------------------

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")


def importance_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor | None = None, level: str = "token"
) -> torch.Tensor:
    """π_θ / π_old per token ("token") or per sequence ("sequence", GSPO), with the gradient flowing through it.

    Shape: (B, T) -> (B, T). "sequence": s_i = exp(mean over counting tokens of (logprobs - old_logprobs)),
    broadcast to every token of the row (Zheng et al. 2025, GSPO eq. 7; TRL 1.16 `importance_sampling_level=
    "sequence"` computes this (B, 1) `coef_1`). This is the ratio to hand to `kl_penalty(importance_ratio=...)` for
    the bias-corrected KL; `clipped_surrogate` builds its own. With `response_mask` the ratio is exactly 1 on tokens
    that do not count (their log-probs are never compared).
    """
    log_ratio = -masked_log_ratio(logprobs, old_logprobs, response_mask)
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        if response_mask is None:
            raise ValueError("ratio level 'sequence' needs response_mask")
        return torch.exp(masked_mean(log_ratio, response_mask, dim=-1)).unsqueeze(-1).expand_as(log_ratio)
    raise ValueError(f"unknown ratio level {level!r}; valid: {', '.join(RATIO_LEVELS)}")


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ratio_level: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per token: -min(ρ·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A). Returns (per_token_loss, metrics).

    Shape: logprobs, old_logprobs, response_mask (B, T); advantages (B,) or (B, T) -> per_token_loss (B, T), whose
    values on non-counting tokens are meaningless (`aggregate` masks them).
    Schulman et al. 2017, eq. 7; asymmetric ε ("clip-higher") from DAPO (Yu et al. 2025, eq. 10).
    ratio_level "sequence" is GSPO-token (Zheng et al. 2025, eq. 13): ρ_{i,t} = sg[s_i]·π_t / sg[π_t], whose value
    is the sequence ratio s_i and whose gradient is s_i·∇log π_t. Because every aggregation weights the tokens of a
    row equally, loss and gradient equal TRL 1.16's `importance_sampling_level="sequence"` (a (B, 1) ratio with the
    gradient through the mean) — the oracle test checks this.

    Metrics (detached means over counting tokens, TRL's `clip_ratio/*` definitions): `clip_frac_low` (ρ < 1 - ε_low
    with A < 0: the gradient is cut), `clip_frac_high` (ρ > 1 + ε_high with A > 0), `clip_frac` (either),
    `approx_kl_old` (k3 estimate of KL(π_old || π_θ) from the samples of π_old, cleanrl's `approx_kl`),
    `ratio_mean`.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    # masked before exp: stored old log-probs are 0 on padding, the current ones are not (ratio exactly 1 there)
    log_ratio = -masked_log_ratio(logprobs, old_logprobs, response_mask)
    if ratio_level == "token":
        ratio = torch.exp(log_ratio)
    elif ratio_level == "sequence":
        seq_log_ratio = masked_mean(log_ratio, response_mask, dim=-1).unsqueeze(-1)
        # straight-through: value s_i, gradient s_i·∇log π_t on each token
        ratio = torch.exp(seq_log_ratio.detach() + logprobs - logprobs.detach())
    else:
        raise ValueError(f"unknown ratio level {ratio_level!r}; valid: {', '.join(RATIO_LEVELS)}")
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(ratio * advantages, clipped * advantages)

    with torch.no_grad():
        mask = response_mask.bool()
        low = (ratio < 1 - eps_low) & (advantages < 0)
        high = (ratio > 1 + eps_high) & (advantages > 0)
        metrics = {
            "clip_frac_low": masked_mean(low.float(), mask),
            "clip_frac_high": masked_mean(high.float(), mask),
            "clip_frac": masked_mean((low | high).float(), mask),
            # samples come from π_old, so r = π_θ / π_old and k3 = (r - 1) - log r (Schulman's blog, reversed roles)
            "approx_kl_old": masked_mean(kl_k3(old_logprobs, logprobs, mask), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return per_token_loss, metrics


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k3",
    importance_ratio: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL(π_θ || π_ref) term for the loss (GRPO's β·D_KL, Shao et al. 2024, eq. 3-4). Shape: (B, T) -> (B, T).

    `estimator` names one of `rlhf.ops.KL_ESTIMATORS` (k1 / k2 / k3). With `importance_ratio` (π_θ / π_old, e.g.
    from `importance_ratio()`), the KL is multiplied by it: the samples come from π_old, so this reweighting makes
    the KL gradient unbiased off-policy (DeepSeek-V3.2 report, §3.1 "Unbiased KL Estimate"). As in TRL 1.16
    (`use_bias_correction_kl=True`: `per_token_kl * coef_1`), the ratio is NOT detached: the gradient flows through
    both factors. With `response_mask` the inputs are masked before the estimator (`rlhf.ops`): the KL is exactly 0
    on tokens that do not count, and finite with a finite gradient whatever the log-probs of padding are.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    kl = KL_ESTIMATORS[estimator](logprobs, ref_logprobs, response_mask)
    return kl if importance_ratio is None else kl * importance_ratio


def aggregate_normalizer(response_mask: torch.Tensor, mode: str, max_len: int | None = None) -> torch.Tensor:
    """The count a (micro-)batch contributes to `aggregate`'s denominator; sum it over micro-batches (and ranks).

    Shape: response_mask (B, T) -> scalar. token_mean: Σ mask; seq_mean_token_mean: B (every row, even an empty
    one); seq_mean_token_sum_norm: B · max_len (`max_len` defaults to T — pass the configured maximum response
    length so that every micro-batch uses the same constant, as Dr. GRPO and TRL's `max_completion_length` do).
    """
    _check_mode(mode)
    if mode == "token_mean":
        return response_mask.float().sum()
    rows = torch.tensor(float(response_mask.size(0)), device=response_mask.device)
    if mode == "seq_mean_token_mean":
        return rows
    return rows * (response_mask.size(-1) if max_len is None else max_len)


def aggregate(
    loss_mat: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str,
    normalizer: torch.Tensor | float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar under a named mode (verl `core_algos.agg_loss`). Shape: (B, T) -> ().

    - "token_mean": Σ loss·mask / normalizer (default Σ mask). Every token weighs the same (DAPO, Yu et al. 2025,
      eq. 12; TRL `bnpo` and `dapo`).
    - "seq_mean_token_mean": Σ_rows (mean over the row's counting tokens) / normalizer (default B). Every sequence
      weighs the same (original GRPO, Shao et al. 2024, eq. 3; TRL `grpo`).
    - "seq_mean_token_sum_norm": Σ loss·mask / normalizer (default B · max_len, `max_len` default T). A constant
      denominator removes the length bias (Dr. GRPO, Liu et al. 2025, §3.1; TRL `dr_grpo`).
    Under gradient accumulation pass `normalizer` = the global sum of `aggregate_normalizer` over the micro-batches:
    the micro-batch losses then add up to exactly the full-batch loss (and gradient).
    """
    _check_mode(mode)
    # where, not a product: a non-finite value on a token that does not count must not turn the sum into NaN
    masked = torch.where(response_mask.bool(), loss_mat, torch.zeros_like(loss_mat))
    if mode == "seq_mean_token_mean":
        total = (masked.sum(-1) / response_mask.sum(-1).clamp(min=1).to(loss_mat.dtype)).sum()
    else:
        total = masked.sum()
    if normalizer is None:  # an empty batch divides by 1, not 0
        denom = aggregate_normalizer(response_mask, mode, max_len).clamp(min=1)
    else:  # a caller's global count may be < 1 per process (one token over two processes): only guard against 0
        denom = torch.as_tensor(normalizer, dtype=total.dtype, device=total.device).clamp(min=1e-8)
    return total / torch.as_tensor(denom, dtype=total.dtype, device=total.device)


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid: {', '.join(AGGREGATIONS)}")


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float | None = None,
    mode: str = "token_mean",
    normalizer: torch.Tensor | float | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic loss ½·max((V - R)², (clip(V, V_old - ε, V_old + ε) - R)²), aggregated by `aggregate`. Returns (loss, metrics).

    Shape: values, old_values, returns, response_mask (B, T) -> scalar. The pessimistic clipped value loss of
    OpenAI baselines' PPO2 ("The 37 Implementation Details of PPO", detail 9; cleanrl `ppo.py`); `clip_eps=None`
    gives the plain ½(V - R)². Metric `value_clip_frac`: share of counting tokens where the clipped term is the
    larger one (TRL's `vf_clipfrac`).
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        loss_mat = 0.5 * unclipped
        clip_frac = torch.zeros((), device=values.device)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (clipped_values - returns) ** 2
        loss_mat = 0.5 * torch.max(unclipped, clipped)
        clip_frac = masked_mean((clipped > unclipped).float(), response_mask.bool()).detach()
    loss = aggregate(loss_mat, response_mask, mode, normalizer, max_len)
    return loss, {"value_clip_frac": clip_frac}


# ---------------------------------------------------------------------------------------------------------------
# Direct preference optimization: Bradley-Terry on implicit rewards. Inputs are per-sequence log-probabilities
# (summed over the response tokens), one per pair. Shapes: (B,) -> scalar.
# ---------------------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    normalizer: torch.Tensor | float | None = None,
    margin: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO-family loss of a batch of pairs: Σ_pairs ℓ / normalizer (default B). Returns (loss, metrics).

    With the log-ratio gap h = [log π(y_c) − log π_ref(y_c)] − [log π(y_r) − log π_ref(y_r)] (each a sum over the
    response tokens, EOS included) and ε = `label_smoothing`:

    - "sigmoid": ℓ = −(1 − ε)·log σ(β·h − m) − ε·log σ(−(β·h − m)). ε = 0 is DPO (Rafailov et al. 2023, eq. 7:
      Bradley-Terry on the implicit rewards β·log π/π_ref); ε > 0 is conservative DPO (cDPO, Mitchell 2023: the
      label is right with probability 1 − ε). `margin` m (B,) is a per-pair offset the reward gap must exceed (ODPO,
      Amini et al. 2024, eq. 6); None = 0. TRL 1.16's "sigmoid" has no ε: cDPO there is (1 − ε)·sigmoid(pair) +
      ε·sigmoid(swapped pair), which the oracle test checks.
    - "robust": ℓ = [−(1 − ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε), the unbiased loss under labels flipped with
      probability ε (rDPO, Chowdhury et al. 2024, eq. 7; TRL "robust"). ε in [0, 0.5).
    - "ipo": ℓ = (h̄ − 1/(2β))², the squared loss that keeps the log-ratio gap at 1/(2β) (Azar et al. 2023, eq. 17,
      β = τ). h̄ is h with each log-ratio divided by its response length when `chosen_lengths` / `rejected_lengths`
      are given (TRL 1.16 and the IPO authors' length-normalized form), else the paper's sums. No ε, no margin.

    Under gradient accumulation pass `normalizer` = the number of pairs in the whole batch (all micro-batches and
    processes), so that the micro-batch losses add up to the full-batch mean.

    Metrics (detached, means over the pairs of this call): the implicit rewards `reward_chosen` = β·(log π −
    log π_ref)(y_c) and `reward_rejected`, `accuracy` (share of pairs with reward_chosen > reward_rejected, TRL's
    `rewards/accuracies`), `margin` (mean reward_chosen − reward_rejected), `loss` (mean ℓ).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type == "ipo" and (label_smoothing or margin is not None):
        raise ValueError("the ipo loss takes no label_smoothing and no margin")
    if loss_type == "robust" and margin is not None:
        raise ValueError("the robust loss takes no margin")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    eps = label_smoothing
    if loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            h = (chosen_logratios / chosen_lengths.to(chosen_logratios.dtype).clamp(min=1)
                 - rejected_logratios / rejected_lengths.to(rejected_logratios.dtype).clamp(min=1))
        else:
            h = chosen_logratios - rejected_logratios
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        logits = beta * (chosen_logratios - rejected_logratios)
        if loss_type == "sigmoid":
            if margin is not None:
                logits = logits - margin.to(logits.dtype)
            losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        else:  # robust
            losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    denom = losses.numel() if normalizer is None else normalizer
    loss = losses.sum() / torch.as_tensor(denom, dtype=losses.dtype, device=losses.device).clamp(min=1e-8)

    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios
        rejected_rewards = beta * rejected_logratios
        metrics = {
            "reward_chosen": chosen_rewards.mean(),
            "reward_rejected": rejected_rewards.mean(),
            "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "margin": (chosen_rewards - rejected_rewards).mean(),
            "loss": losses.mean(),
        }
    return loss, metrics
