"""Advantage estimators, KL shaping and KL controllers, checked on examples worked by hand."""

import math

import pytest
import torch

from rlhf.advantages import (
    AdaptiveKLController, FixedKLController, discounted_returns, gae, group_normalized, kl_shaped_rewards,
    reinforce_pp, rloo,
)

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0])


def test_group_normalized_one_group_of_four():
    # mean 0.5; deviations ±0.5; unbiased var = 4·0.25 / 3 = 1/3; std = 0.57735
    # A = ±0.5 / (0.57735 + 1e-4) = ±0.86588
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    out = group_normalized(REWARDS, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(out, torch.tensor([a, -a, -a, a]), atol=1e-6)
    assert math.isclose(a, 0.86588, abs_tol=1e-5)


def test_group_normalized_two_groups_of_two():
    # groups {1, 0} and {0, 1}: each mean 0.5, deviations ±0.5, unbiased var = 2·0.25 / 1 = 0.5, std = 0.70711
    # A = ±0.5 / (0.70711 + 1e-4) = ±0.70700
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    out = group_normalized(REWARDS, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(out, torch.tensor([a, -a, -a, a]), atol=1e-6)
    # "batch": same group means, std of the whole batch (sqrt(1/3)) -> ±0.86588
    b = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(group_normalized(REWARDS, torch.tensor([0, 0, 1, 1]), scale="batch"), torch.tensor([b, -b, -b, b]))
    # "none" (Dr. GRPO): only the group mean is subtracted
    assert group_normalized(REWARDS, torch.tensor([0, 0, 1, 1]), scale="none").tolist() == [0.5, -0.5, -0.5, 0.5]


def test_zero_variance_group_gets_zero_advantage_and_rows_need_not_be_contiguous():
    # index [0, 1, 1, 0] groups rows {0, 3} = {1, 1} and {1, 2} = {0, 0}: no spread in either group
    for scale in ("group", "batch", "none"):
        assert group_normalized(REWARDS, torch.tensor([0, 1, 1, 0]), scale=scale).tolist() == [0.0] * 4
    # a group of one has no spread either
    assert group_normalized(torch.tensor([3.0, 1.0, 0.0]), torch.tensor([7, 8, 8]))[0].item() == 0.0


def test_group_normalized_is_permutation_equivariant():
    torch.manual_seed(0)
    scores, index = torch.randn(12), torch.arange(12) % 3
    perm = torch.randperm(12)
    for scale in ("group", "batch", "none"):
        assert torch.allclose(group_normalized(scores, index, scale)[perm], group_normalized(scores[perm], index[perm], scale),
                              atol=1e-6)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_normalized(scores, index, scale="std")


def test_rloo_hand_example():
    # one group of 4: A_0 = 1 - (0 + 0 + 1)/3 = 2/3, A_1 = 0 - (1 + 0 + 1)/3 = -2/3 (= 4/3 · (r - 0.5))
    out = rloo(REWARDS, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(out, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    # two groups of 2: the baseline is the other sample: 1 - 0, 0 - 1, 0 - 1, 1 - 0
    assert rloo(REWARDS, torch.tensor([0, 0, 1, 1])).tolist() == [1.0, -1.0, -1.0, 1.0]
    # a singleton group has no baseline -> 0
    assert rloo(torch.tensor([5.0, 1.0, 2.0]), torch.tensor([0, 1, 1])).tolist() == [0.0, -1.0, 1.0]


def test_kl_shaped_rewards_hand_example():
    scores = torch.tensor([2.0, 5.0, 7.0])
    kl = torch.tensor([[0.5, -0.2, 1.0, 9.0], [0.3, 0.4, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()
    out = kl_shaped_rewards(scores, kl, mask, beta=0.1)
    # row 0: -0.1·[0.5, -0.2, 1.0], score 2 on the 3rd token: [-0.05, 0.02, -0.1 + 2 = 1.9, 0]
    # row 1: -0.1·[0.3, 0.4], score 5 on the 2nd token:       [-0.03, -0.04 + 5 = 4.96, 0, 0]
    # row 2: nothing counts -> nothing, not even the score
    expected = torch.tensor([[-0.05, 0.02, 1.9, 0.0], [-0.03, 4.96, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_discounted_returns_hand_example():
    # γ = 0.5: G_2 = 3, G_1 = 2 + 0.5·3 = 3.5, G_0 = 1 + 0.5·3.5 = 2.75; the padded 99 is ignored
    out = discounted_returns(torch.tensor([[1.0, 2.0, 3.0, 99.0]]), torch.tensor([[1, 1, 1, 0]]).bool(), gamma=0.5)
    assert out.tolist() == [[2.75, 3.5, 3.0, 0.0]]
    # a non-counting token inside the row (tool output) is skipped, not discounted through: G_0 = 1 + 0.5·4 = 3
    out = discounted_returns(torch.tensor([[1.0, 50.0, 4.0]]), torch.tensor([[1, 0, 1]]).bool(), gamma=0.5)
    assert out.tolist() == [[3.0, 0.0, 4.0]]


def test_reinforce_pp_hand_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    advantages, returns = reinforce_pp(rewards, mask)
    # γ = 1 returns-to-go: [1, 1, 1] and [-1, -1, (0)]
    assert returns.tolist() == [[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]
    # whiten over the 5 counting tokens: mean 0.2; deviations 0.8 (×3), -1.2 (×2);
    # unbiased var = (3·0.64 + 2·1.44) / 4 = 1.2; std = 1.09545 -> 0.73030 and -1.09545
    a, b = 0.8 / math.sqrt(1.2), -1.2 / math.sqrt(1.2)
    assert torch.allclose(advantages, torch.tensor([[a, a, a], [b, b, 0.0]]), atol=1e-6)


def test_gae_three_token_hand_example():
    # γ = 0.9, λ = 0.5; the 4th token does not count (its value 5 and reward 3 must not leak in: bootstrap 0)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 3.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    # δ_2 = 1 + 0.9·0   - 0.7 = 0.3       A_2 = 0.3
    # δ_1 = 0 + 0.9·0.7 - 0.6 = 0.03      A_1 = 0.03 + 0.45·0.3   = 0.165
    # δ_0 = 0 + 0.9·0.6 - 0.5 = 0.04      A_0 = 0.04 + 0.45·0.165 = 0.11425
    # returns = A + V = [0.61425, 0.765, 1.0]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert torch.allclose(advantages, torch.tensor([[0.11425, 0.165, 0.3, 0.0]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0.61425, 0.765, 1.0, 0.0]]), atol=1e-6)


def _gae_loop_reference(rewards, values, mask, gamma, lam):
    """Textbook per-row GAE on the counting tokens only (compacted), scattered back; 0 elsewhere."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.size(0)):
        idx = mask[b].nonzero().flatten().tolist()
        last = 0.0
        for k in reversed(range(len(idx))):
            next_value = values[b, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = rewards[b, idx[k]].item() + gamma * next_value - values[b, idx[k]].item()
            last = delta + gamma * lam * last
            advantages[b, idx[k]] = last
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("holes", [False, True])
def test_gae_equals_loop_reference_on_random_ragged_masks(holes):
    torch.manual_seed(1 + holes)
    B, T = 6, 9
    lengths = torch.tensor([9, 1, 0, 5, 7, 3])
    mask = torch.arange(T) < lengths.unsqueeze(1)
    if holes:  # tool-output tokens inside the response
        mask &= torch.rand(B, T) > 0.3
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)]:
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = _gae_loop_reference(rewards, values, mask, gamma, lam)
        assert torch.allclose(advantages, ref_adv, atol=1e-5)
        assert torch.allclose(returns, ref_ret, atol=1e-5)
    # λ = 1: GAE is the discounted return minus the value (Monte Carlo advantage)
    advantages, _ = gae(rewards, values, mask, 0.97, 1.0)
    assert torch.allclose(advantages, (discounted_returns(rewards, mask, 0.97) - values) * mask, atol=1e-5)


def test_adaptive_kl_controller_worked_numbers():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    # KL 9: e = 9/6 - 1 = 0.5, clipped to 0.2; β = 0.1 · (1 + 0.2·256/10000) = 0.1 · 1.00512 = 0.100512
    ctl.update(9.0, n_steps=256)
    assert math.isclose(ctl.value, 0.100512, rel_tol=1e-12)
    # KL 5.4: e = 0.9 - 1 = -0.1 (inside the clip); β = 0.100512 · (1 - 0.1·500/10000) = 0.100512 · 0.995
    ctl.update(torch.tensor(5.4), n_steps=500)
    assert math.isclose(ctl.value, 0.100512 * 0.995, rel_tol=1e-6)
    restored = AdaptiveKLController(init_beta=1.0, target=1.0, horizon=1)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict() and all(isinstance(v, float) for v in ctl.state_dict().values())


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
