"""RL losses (clipped surrogate, KL penalty, aggregation, value loss) and KL estimators, checked by hand."""

import math

import pytest
import torch

from rlhf.losses import (
    AGGREGATIONS, aggregate, aggregate_normalizer, clipped_surrogate, importance_ratio, kl_penalty, value_loss,
)
from rlhf.ops import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3


def test_kl_estimators_on_one_worked_token():
    # π = 0.5, π_ref = 0.25: log r = log(π_ref/π) = -log 2
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert math.isclose(kl_k1(logp, ref).item(), math.log(2), rel_tol=1e-6)  # -log r = 0.69315
    assert math.isclose(kl_k2(logp, ref).item(), 0.5 * math.log(2) ** 2, rel_tol=1e-6)  # ½(log r)² = 0.24023
    assert math.isclose(kl_k3(logp, ref).item(), 0.5 - 1 + math.log(2), rel_tol=1e-6)  # r - 1 - log r = 0.19315
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    # sample tokens from p; the mean of k1 and k3 approaches KL(p || q), k3 with lower variance
    torch.manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    true_kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[x], q.log()[x]
    assert math.isclose(kl_k1(logp, logq).mean().item(), true_kl, abs_tol=5e-3)
    assert math.isclose(kl_k3(logp, logq).mean().item(), true_kl, abs_tol=5e-3)
    assert kl_k3(logp, logq).var() < kl_k1(logp, logq).var() and (kl_k3(logp, logq) >= 0).all()


def test_asymmetric_clipping_which_tokens_clip():
    # ε_low = 0.2, ε_high = 0.28 (DAPO clip-higher): the clip range is [0.8, 1.28]
    ratios = torch.tensor([[0.7, 0.7, 1.3, 1.3, 1.25, 1.0]])
    adv = torch.tensor([[-1.0, 1.0, 1.0, -1.0, 1.0, 1.0]])
    old = torch.zeros(1, 6)
    logprobs = ratios.log().requires_grad_()
    loss, m = clipped_surrogate(logprobs, old, adv, torch.ones(1, 6, dtype=torch.bool), eps_low=0.2, eps_high=0.28)
    # t0 ρ 0.7,  A<0: -min(-0.7, -0.8)  = 0.8    clipped LOW (gradient cut)
    # t1 ρ 0.7,  A>0: -min(0.7, 0.8)    = -0.7   not clipped (pessimistic bound keeps ρ)
    # t2 ρ 1.3,  A>0: -min(1.3, 1.28)   = -1.28  clipped HIGH (gradient cut)
    # t3 ρ 1.3,  A<0: -min(-1.3, -1.28) = 1.3    not clipped
    # t4 ρ 1.25, A>0: -1.25, inside [0.8, 1.28]: not clipped (a symmetric ε = 0.2 would have clipped it)
    # t5 ρ 1.0,  A>0: -1.0
    assert torch.allclose(loss, torch.tensor([[0.8, -0.7, -1.28, 1.3, -1.25, -1.0]]), atol=1e-6)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    # d(-ρA)/dlog π = -ρA where not clipped, 0 where clipped
    assert torch.allclose(grad, torch.tensor([[0.0, -0.7, 0.0, 1.3, -1.25, -1.0]]), atol=1e-6)
    assert math.isclose(m["clip_frac_low"].item(), 1 / 6, rel_tol=1e-6)
    assert math.isclose(m["clip_frac_high"].item(), 1 / 6, rel_tol=1e-6)
    assert math.isclose(m["clip_frac"].item(), 2 / 6, rel_tol=1e-6)
    assert math.isclose(m["ratio_mean"].item(), (0.7 * 2 + 1.3 * 2 + 1.25 + 1) / 6, rel_tol=1e-6)
    _, sym = clipped_surrogate(logprobs, old, adv, torch.ones(1, 6, dtype=torch.bool), eps_low=0.2, eps_high=0.2)
    assert math.isclose(sym["clip_frac_high"].item(), 2 / 6, rel_tol=1e-6)  # t2 and t4


def test_first_iteration_ratio_is_exactly_one():
    torch.manual_seed(0)
    logprobs = torch.randn(3, 4).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    adv = torch.tensor([1.0, -2.0, 0.5])
    for level in ("token", "sequence"):
        loss, m = clipped_surrogate(logprobs, logprobs.detach(), adv, mask, ratio_level=level)
        assert m["ratio_mean"].item() == 1.0 and m["approx_kl_old"].item() == 0.0 and m["clip_frac"].item() == 0.0
        assert torch.equal(loss.detach(), -adv.unsqueeze(1).expand(3, 4))  # -ρA with ρ = 1 exactly
        (grad,) = torch.autograd.grad(aggregate(loss, mask, "token_mean"), logprobs)
        assert torch.allclose(grad, -adv.unsqueeze(1) * mask / mask.sum())  # the REINFORCE gradient
        assert all(not v.requires_grad for v in m.values())


def test_sequence_ratio_is_gspo_and_matches_the_plain_sequence_ratio():
    torch.manual_seed(0)
    logprobs = (torch.randn(3, 5) - 1).requires_grad_()
    old = logprobs.detach() + 0.1 * torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    adv = torch.tensor([1.0, -1.0, 0.3])
    loss, m = clipped_surrogate(logprobs, old, adv, mask, eps_low=0.05, eps_high=0.05, ratio_level="sequence")
    # s_i = exp(mean over the row's counting tokens of log π - log π_old), the same on every token of the row
    s = torch.stack([torch.exp((logprobs[i] - old[i])[mask[i]].mean()) for i in range(3)]).detach()
    assert torch.allclose(m["ratio_mean"], (s.unsqueeze(1) * mask).sum() / mask.sum())
    # straight-through (GSPO-token) vs the plain (B, 1) ratio with gradient through the mean: same loss and gradient
    plain = importance_ratio(logprobs, old, mask, level="sequence")
    a = adv.unsqueeze(1)
    plain_loss = -torch.min(plain * a, plain.clamp(0.95, 1.05) * a)
    for mode in AGGREGATIONS:
        ours, theirs = aggregate(loss, mask, mode), aggregate(plain_loss, mask, mode)
        g1, g2 = torch.autograd.grad(ours, logprobs, retain_graph=True), torch.autograd.grad(theirs, logprobs, retain_graph=True)
        assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(g1[0], g2[0], atol=1e-6)
    with pytest.raises(ValueError, match="token, sequence"):
        clipped_surrogate(logprobs, old, adv, mask, ratio_level="tokens")


def test_kl_penalty_with_importance_ratio_keeps_the_ratio_gradient():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    ratio = importance_ratio(logp, logp.detach())  # ρ = 1 in value, but d ρ / d log π = ρ = 1
    kl = kl_penalty(logp, ref, "k3", importance_ratio=ratio)
    assert math.isclose(kl.item(), 0.5 - 1 + math.log(2), rel_tol=1e-6)
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    # d(ρ·k3) = ρ·k3 + ρ·(1 - r) with r = π_ref/π = 0.5: 0.19315 + 0.5 = 0.69315 = log 2 (k1's value)
    assert math.isclose(grad.item(), math.log(2), rel_tol=1e-6)
    (plain_grad,) = torch.autograd.grad(kl_penalty(logp, ref, "k3").sum(), logp)
    assert math.isclose(plain_grad.item(), 0.5, rel_tol=1e-6)  # without the ratio: 1 - r
    for name in ("k1", "k2"):
        assert torch.equal(kl_penalty(logp, ref, name), KL_ESTIMATORS[name](logp, ref))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "k4")


def test_each_aggregation_mode_on_a_ragged_batch():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, 100.0]])  # the 100s do not count
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    # token_mean: (1+2+3+4+5+6) / 6 tokens = 21/6 = 3.5
    assert aggregate(loss, mask, "token_mean").item() == 3.5
    # seq_mean_token_mean: (mean(1..4) = 2.5 + mean(5, 6) = 5.5) / 2 rows = 4.0
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == 4.0
    # seq_mean_token_sum_norm: 21 / (2 rows · T = 4) = 2.625; with max_len 6: 21 / 12 = 1.75
    assert aggregate(loss, mask, "seq_mean_token_sum_norm").item() == 2.625
    assert aggregate(loss, mask, "seq_mean_token_sum_norm", max_len=6).item() == 1.75
    assert [aggregate_normalizer(mask, m, max_len=6).item() for m in AGGREGATIONS] == [6.0, 2.0, 12.0]
    with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean, seq_mean_token_sum_norm"):
        aggregate(loss, mask, "seq_mean")


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_with_global_normalizer_equal_the_full_batch(mode):
    torch.manual_seed(0)
    B, T, max_len = 4, 5, 8
    logprobs = (torch.randn(B, T) - 1).requires_grad_()
    old = logprobs.detach() + 0.3 * torch.randn(B, T)
    ref = logprobs.detach() + 0.2 * torch.randn(B, T)
    adv = torch.randn(B)
    mask = torch.arange(T) < torch.tensor([[5], [2], [3], [1]])

    def per_token(lp, o, r, a, m):
        surrogate, _ = clipped_surrogate(lp, o, a, m, 0.2, 0.28)
        return surrogate + 0.05 * kl_penalty(lp, r, "k3", importance_ratio(lp, o))

    full = aggregate(per_token(logprobs, old, ref, adv, mask), mask, mode, max_len=max_len)
    (full_grad,) = torch.autograd.grad(full, logprobs)

    # two micro-batches, each trimmed to its own longest response (T = 5 and T = 3)
    parts = [(slice(0, 2), T), (slice(2, 4), 3)]
    normalizer = sum(aggregate_normalizer(mask[rows, :t], mode, max_len) for rows, t in parts)
    total = 0.0
    for rows, t in parts:
        lp, o, r, m = (x[rows, :t] for x in (logprobs, old, ref, mask))
        total = total + aggregate(per_token(lp, o, r, adv[rows], m), m, mode, normalizer=normalizer, max_len=max_len)
    (micro_grad,) = torch.autograd.grad(total, logprobs)
    assert torch.allclose(total, full, atol=1e-6)
    assert torch.allclose(micro_grad, full_grad, atol=1e-7)


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 0.0]], requires_grad=True)
    old = torch.tensor([[1.5, 1.5, 1.5, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    # ε = 0.2: clipped values = clip(V, V_old ± 0.2) = [1.3, 1.7, 1.7]
    # t0: (1 - 2)² = 1    vs (1.3 - 2)² = 0.49 -> ½·1    = 0.5
    # t1: (2 - 2)² = 0    vs (1.7 - 2)² = 0.09 -> ½·0.09 = 0.045  (the clipped term wins)
    # t2: (3 - 0)² = 9    vs (1.7 - 0)² = 2.89 -> ½·9    = 4.5
    # token_mean = 5.045 / 3 = 1.681667; value_clip_frac = 1/3
    loss, m = value_loss(values, old, returns, mask, clip_eps=0.2)
    assert math.isclose(loss.item(), 5.045 / 3, rel_tol=1e-6)
    assert math.isclose(m["value_clip_frac"].item(), 1 / 3, rel_tol=1e-6)
    (grad,) = torch.autograd.grad(loss, values)
    # d/dV ½(V - R)² / 3 = (V - R)/3 where unclipped wins; 0 at t1 (clip saturated); 0 on the padded token
    assert torch.allclose(grad, torch.tensor([[-1 / 3, 0.0, 1.0, 0.0]]), atol=1e-6)
    plain, m = value_loss(values, old, returns, mask)
    assert math.isclose(plain.item(), 0.5 * (1 + 0 + 9) / 3, rel_tol=1e-6) and m["value_clip_frac"].item() == 0.0
