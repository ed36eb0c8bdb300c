"""Pure advantage estimators, KL reward shaping and KL-coefficient controllers. Only torch is imported.

Estimators are separate from normalization: each function returns exactly what its definition says and whitens
only when the definition itself whitens (REINFORCE++). Whether to whiten GAE advantages is the recipe's visible
choice (torchtune `rlhf/rewards.py` keeps the same split).

Vocabulary: `scores` (B,) one scalar per response; `token_rewards`, `values`, `advantages`, `returns` (B, T) per
response token; `response_mask` (B, T) True where the token counts (the policy chose it).
"""

from __future__ import annotations

import torch

from rlhf.ops import AllReduce, masked_moments, masked_whiten

SCALES = ("group", "batch", "none")
MAX_KL_ERROR = 0.2  # the adaptive β controller's clip of its proportional error (Ziegler et al. 2019, eq. 3)


def _groups(prompt_index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group ids 0..G-1 for rows with equal `prompt_index` values (any order), and G."""
    _, group = torch.unique(prompt_index, return_inverse=True)
    return group, int(group.max()) + 1 if group.numel() else 0


def _group_sum(x: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Σ of `x` over each row's group, broadcast back to the rows. Shape: (B,) -> (B,)."""
    return x.new_zeros(n_groups).index_add_(0, group, x)[group]


def group_normalized(
    scores: torch.Tensor, prompt_index: torch.Tensor, scale: str = "group", eps: float = 1e-4,
    all_reduce: AllReduce | None = None,
) -> torch.Tensor:
    """GRPO's group-relative advantage A_i = (r_i - mean_group(r)) / (std + eps).

    Shape: scores (B,), prompt_index (B,) -> (B,). Rows with equal `prompt_index` form a group (they need not be
    contiguous). `scale`:
      - "group": std of the row's group (GRPO, Shao et al. 2024, §4.1.2);
      - "batch": std of the whole batch, mean still per group (TRL `scale_rewards="batch"`, after Hu 2025);
      - "none":  no division (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training", §3.1).
    Matches TRL 1.16 `GRPOTrainer._generate_and_score_completions` exactly: Bessel-corrected (unbiased) std and
    eps = 1e-4 added to the std (not the variance). A zero-variance group gets advantage 0; a group of one has no
    spread either, so it also gets 0 (TRL yields NaN there and then zeroes it with `nan_to_num`). Groups never span
    processes; with `all_reduce`, "batch" takes the std of the batch over every process.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    scores = scores if scores.is_floating_point() else scores.float()
    group, n_groups = _groups(prompt_index)
    counts = _group_sum(torch.ones_like(scores), group, n_groups)
    centered = scores - _group_sum(scores, group, n_groups) / counts
    if scale == "none":
        return centered
    if scale == "group":
        std = torch.sqrt(_group_sum(centered**2, group, n_groups) / (counts - 1).clamp(min=1))
    elif all_reduce is not None:
        std = masked_moments(scores, torch.ones_like(scores, dtype=torch.bool), all_reduce)[1].sqrt()
    else:
        std = scores.std() if scores.numel() > 1 else scores.new_zeros(())
    return centered / (std + eps)


def rloo(scores: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantage A_i = r_i - mean of the OTHER samples in the group.

    Shape: scores (B,), prompt_index (B,) -> (B,). Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for
    free"); Ahmadian et al. 2024, eq. 5. Equals n/(n-1)·(r_i - mean_group). A group of one has no other sample to
    form a baseline, so its advantage is 0 (no learning signal rather than an unbaselined reward).
    """
    scores = scores if scores.is_floating_point() else scores.float()
    group, n_groups = _groups(prompt_index)
    counts = _group_sum(torch.ones_like(scores), group, n_groups)
    baseline = (_group_sum(scores, group, n_groups) - scores) / (counts - 1).clamp(min=1)
    return torch.where(counts > 1, scores - baseline, torch.zeros_like(scores))


def _last_counting_token(response_mask: torch.Tensor) -> torch.Tensor:
    """One-hot (B, T) bool marking each row's last True in `response_mask` (all False for rows with none)."""
    positions = torch.arange(1, response_mask.size(-1) + 1, device=response_mask.device)
    last = (response_mask.long() * positions).max(dim=-1, keepdim=True).values  # 0 where the row has no token
    return (positions == last) & response_mask.bool()


def kl_shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, beta: float | torch.Tensor
) -> torch.Tensor:
    """Per-token rewards r_t = -β·kl_t, plus the sequence score on the last counting token.

    Shape: scores (B,), kl (B, T), response_mask (B, T) -> (B, T); 0 on non-counting tokens. Ziegler et al. 2019
    ("Fine-Tuning LMs from Human Preferences", eq. 2) / InstructGPT's per-token KL penalty, laid out as TRL
    `PPOTrainer` and torchtune `get_rewards_ppo` do. A row with no counting token gets no reward at all.
    """
    mask = response_mask.bool()
    rewards = torch.where(mask, -beta * kl, torch.zeros_like(kl))
    return rewards + _last_counting_token(mask) * scores.to(rewards.dtype).unsqueeze(-1)


def fixed_score_without_eos(scores: torch.Tensor, ended: torch.Tensor, score: float) -> torch.Tensor:
    """Replace the score of every response that never emitted EOS (cut at the token budget) by `score`.

    Shape: scores, ended (B,) -> (B,). A reward model scores the text it is shown, so a truncated response can score
    well; a fixed low score (−1 in lm-human-preferences' `penalty_reward_value` and in Huang et al. 2024, "The N+
    Implementation Details of RLHF with PPO") teaches the policy to finish within the budget.
    """
    return torch.where(ended.bool(), scores, torch.full_like(scores, float(score)))


def discounted_returns(token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go G_t = Σ_{k≥t} γ^(k-t) r_k over counting tokens. Shape: (B, T) -> (B, T); 0 on non-counting tokens.

    Rewards on non-counting tokens are ignored and those tokens are skipped, not discounted through: γ steps once
    per action the policy took (as verl skips observation tokens in multi-turn GAE). Same as OpenRLHF
    `get_cumulative_returns` for a trailing-padding mask.
    """
    mask = response_mask.bool()
    rewards = torch.where(mask, token_rewards, torch.zeros_like(token_rewards))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(-1))):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return torch.where(mask, returns, torch.zeros_like(returns))


def reinforce_pp(
    token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0, all_reduce: AllReduce | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, "REINFORCE++", §3): advantages = batch-whitened returns-to-go. Returns (advantages, returns).

    Shape: token_rewards, response_mask (B, T) -> two (B, T); 0 on non-counting tokens. `token_rewards` are the
    KL-shaped rewards (`kl_shaped_rewards`). Unlike the other estimators here this one WHITENS by definition: the
    global (whole-batch, all counting tokens) normalization replaces a critic or a group baseline (OpenRLHF
    `REINFORCE++`: cumulative returns, then `masked_whiten` over the batch; with `all_reduce`, over every process's).
    """
    mask = response_mask.bool()
    returns = discounted_returns(token_rewards, mask, gamma)
    advantages = masked_whiten(returns, mask, all_reduce=all_reduce)
    return torch.where(mask, advantages, torch.zeros_like(advantages)), returns


def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation, raw (NOT whitened). Returns (advantages, returns = advantages + values).

    Shape: token_rewards, values, response_mask (B, T) -> two (B, T); 0 on non-counting tokens.
    Schulman et al. 2016, eq. 16: δ_t = r_t + γ V_{t+1} - V_t, A_t = δ_t + γλ A_{t+1}. The value after a row's last
    counting token is 0 (the episode ends there: bootstrap 0). Non-counting tokens inside a row (tool output) are
    skipped, as verl `compute_gae_advantage_return` does: the next value and the running advantage pass over them.
    """
    mask = response_mask.bool()
    rewards = torch.where(mask, token_rewards, torch.zeros_like(token_rewards))
    values = torch.where(mask, values, torch.zeros_like(values))
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(-1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        m = mask[:, t]
        running = torch.where(m, delta + gamma * lam * running, running)
        next_value = torch.where(m, values[:, t], next_value)
        advantages[:, t] = running
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    return advantages, advantages + values


class FixedKLController:
    """A constant KL coefficient β (Ziegler et al. 2019, the non-adaptive baseline). `.update` does nothing."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive β that steers the measured KL toward `target` (Ziegler et al. 2019, §2.2, eq. 3).

    e = clip(KL / target - 1, -0.2, 0.2);  β ← β · (1 + e · n_steps / horizon). Same rule as TRL's (pre-1.0)
    `AdaptiveKLController` and OpenRLHF `AdaptiveKLController`. The factor is positive only while
    horizon > 0.2 · n_steps (recipes refuse shorter horizons); β is kept ≥ 0 regardless, since a negative β would
    reward moving away from the reference.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        if not (target > 0 and horizon > 0 and init_beta >= 0):
            raise ValueError(f"adaptive KL needs target > 0, horizon > 0, β ≥ 0; got {target}, {horizon}, {init_beta}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Scale β by 1 + e·n_steps/horizon, e the clipped proportional error of `current_kl` (mean KL per sequence)."""
        error = min(max(float(current_kl) / self.target - 1.0, -MAX_KL_ERROR), MAX_KL_ERROR)
        self.value = max(0.0, self.value * (1.0 + error * n_steps / self.horizon))

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


def make_kl_controller(beta: float, target: float | None = None, horizon: float = 10000,
                       state: dict[str, float] | None = None) -> FixedKLController | AdaptiveKLController:
    """β fixed, or adaptive toward `target` (KL per sequence) when one is given; `state`: a checkpoint's
    `state_dict()` to resume from."""
    controller = FixedKLController(beta) if target is None else AdaptiveKLController(beta, target, horizon)
    if state is not None:
        controller.load_state_dict(state)
    return controller
