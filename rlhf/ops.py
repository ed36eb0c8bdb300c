"""Pure tensor helpers shared by every stage. Only torch is imported here.

Vocabulary: `response_mask` is True where a token counts (never a "padding mask").
"""

from __future__ import annotations

from typing import Callable

import torch

# Sums a tensor over the processes of a multi-process run (`lambda t: accelerator.reduce(t, "sum")`). Batch statistics
# take one, so that a batch split over processes is normalized as a whole; None = this process holds the whole batch.
AllReduce = Callable[[torch.Tensor], torch.Tensor]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is True. Shape: values, mask (B, T)."""
    values = values * mask
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is True; 0 where nothing counts (no NaN from empty rows)."""
    mask = mask.to(values.dtype)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the tokens that count (Bessel-corrected by default, as torchtune/TRL whiten)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().clamp(min=2)
        var = var * n / (n - 1)
    return var


def masked_moments(values: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Bessel-corrected variance over the tokens that count; with `all_reduce`, over every process's."""
    if all_reduce is None:
        return masked_mean(values, mask), masked_var(values, mask)
    weights = mask.to(values.dtype)
    count, total = all_reduce(torch.stack([weights.sum(), (values * weights).sum()]))
    mean = total / count.clamp(min=1)
    squares = all_reduce(((values - mean) ** 2 * weights).sum())
    n = count.clamp(min=2)
    return mean, squares / count.clamp(min=1) * n / (n - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_reduce: AllReduce | None = None) -> torch.Tensor:
    """(x - mean) / std over counting tokens; `shift_mean=False` keeps the mean (scale only). With `all_reduce`, the
    mean and std are those of the whole batch over every process."""
    mean, var = masked_moments(values, mask, all_reduce)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def logprobs_from_logits(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(ids) under softmax(logits / temperature), without a full log-softmax tensor.

    Shape: logits (B, T, V), ids (B, T) -> (B, T). Uses gather - logsumexp, so only one extra (B, T) tensor is
    made instead of a (B, T, V) log-probability tensor.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position. Shape: (B, T, V) -> (B, T).

    H = logsumexp(z) - sum(softmax(z) * z), which needs one softmax instead of a log-softmax and a softmax.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# largest logits tensor (elements) made at once; 2**24 fp32 = 64 MB, e.g. 341 positions of a 49,152-token vocabulary
LOGIT_CHUNK_ELEMENTS = 2**24


def projected_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_elements: int = LOGIT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(ids) (and the entropy) under softmax(head(hidden) / temperature), a chunk of positions at a time.

    Shape: hidden (B, T, H), ids (B, T) -> (B, T) each. No chunk's logits outlive it: each is recomputed in backward
    (activation checkpointing), so neither pass holds a (B, T, V) tensor, only (chunk, V). Values and gradients are
    those of the unchunked `logprobs_from_logits` / `entropy_from_logits` on `head(hidden)`.
    """
    from torch.utils.checkpoint import checkpoint

    flat_hidden, flat_ids = hidden.reshape(-1, hidden.size(-1)), ids.reshape(-1)

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        out = [logprobs_from_logits(logits, t, temperature)]
        if with_entropy:
            out.append(entropy_from_logits(logits, temperature))
        return torch.stack(out)

    vocab = getattr(head, "out_features", None) or head(flat_hidden[:1]).size(-1)
    size = max(1, chunk_elements // vocab)
    if flat_ids.numel() <= size:
        parts = [piece(flat_hidden, flat_ids)]
    else:
        parts = [checkpoint(piece, flat_hidden[i:i + size], flat_ids[i:i + size], use_reentrant=False)
                 for i in range(0, flat_ids.numel(), size)]
    out = torch.cat(parts, dim=1).view(-1, *ids.shape)
    return out[0], (out[1] if with_entropy else None)


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True up to and including the first EOS of each row; False after it. Shape: (B, T) -> (B, T) bool.

    The EOS itself counts: the policy chose to stop, and that choice has a log-probability.
    """
    is_eos = response_ids == eos_token_id
    # number of EOS strictly before each position; a token counts while none came before it
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return eos_before == 0


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, so left padding does not shift them. Shape: (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# KL estimators (Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html). Each estimates
# KL(π || π_ref) per token from samples drawn from π, with log r = ref_logprobs - logprobs. With `mask`, log r is set
# to 0 where the mask is False *before* the estimator runs: every estimator is then exactly 0 there, and neither the
# value nor the gradient can overflow on padding (k3's exp(log r) reaches inf once log r > 88.7, and inf · 0 = NaN in
# a masked sum or its gradient).


def masked_log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """log r = ref_logprobs - logprobs, 0 where `mask` is False (None = everywhere). Shape: (B, T) -> (B, T)."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio if mask is None else torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """k1 = log π - log π_ref = -log r: unbiased, high variance, negative on some tokens. Shape: (B, T) -> (B, T)."""
    return -masked_log_ratio(logprobs, ref_logprobs, mask)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """k2 = ½ (log r)²: biased but low variance and always ≥ 0. Shape: (B, T) -> (B, T)."""
    return 0.5 * masked_log_ratio(logprobs, ref_logprobs, mask) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = π_ref / π: unbiased, low variance, always ≥ 0. Shape: (B, T) -> (B, T).

    The form GRPO uses (Shao et al. 2024, eq. 4; TRL `GRPOTrainer._compute_loss` computes the same expression).
    """
    log_ratio = masked_log_ratio(logprobs, ref_logprobs, mask)
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
