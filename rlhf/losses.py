"""Pure losses. Each returns `(loss, metrics)` where metrics are detached floats-to-be. Only torch is imported.

Aggregation: token-level losses are summed and divided by a normalizer the caller may pass in, so that under
gradient accumulation every micro-batch divides by the same global count (verl `agg_loss`, OpenRLHF
`test_loss_aggregation.py`): the accumulated gradient then equals the full-batch gradient exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    nll = token_nll(logits, input_ids)
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
