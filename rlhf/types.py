"""Typed containers passed between stages. Shapes use B = sequences in the batch, P = prompt length,
T = response length."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from rlhf.ops import position_ids_from_mask


@dataclass
class Rollout:
    """Sampled responses to a batch of prompts.

    Rows are grouped by prompt: with n samples per prompt, rows i*n .. i*n+n-1 answer prompt i.
    """

    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) bool, True on real prompt tokens
    response_ids: torch.Tensor  # (B, T) long, pad after the first EOS
    response_mask: torch.Tensor  # (B, T) bool, True = the token counts (through the first EOS)
    ended: torch.Tensor  # (B,) bool, the response stopped with EOS (False = truncated at max_new_tokens)
    lengths: torch.Tensor  # (B,) long, number of counting response tokens (EOS included)
    prompt_index: torch.Tensor  # (B,) long, which input prompt each row answers
    prompts: list[str] = field(default_factory=list)  # (B,) prompt text of each row
    completions: list[str] = field(default_factory=list)  # (B,) decoded response text, without EOS and padding
    pixel_values: torch.Tensor | None = None  # (B, C, H, W) float: each row's image (a vision-language policy)

    def __len__(self) -> int:
        return self.response_ids.size(0)

    def to(self, device: torch.device | str) -> "Rollout":
        """Move every tensor to `device` (lists stay as they are)."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v) for f in fields(self)
        }
        return Rollout(**moved)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Prompt and response as one model input: `input_ids`, `attention_mask` and `position_ids` (B, P + T), the
        positions starting at 0 on each row's first real token so that left padding does not shift them. The
        outputs that predict the T response tokens are those at positions [-T - 1, -1)."""
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask, self.response_mask], dim=1).long()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "position_ids": position_ids_from_mask(attention_mask)}
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values
        return inputs

    def select(self, idx: torch.Tensor | list[int]) -> "Rollout":
        """Rows `idx` (a minibatch), tensors and text lists alike. `prompt_index` keeps its values, so rows of one
        prompt still share an index."""
        index = torch.as_tensor(idx, dtype=torch.long)
        rows = index.tolist()
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value.index_select(0, index.to(value.device))
            elif value is not None:
                picked[f.name] = [value[i] for i in rows] if value else []
        return Rollout(**picked)


@dataclass
class ForwardOut:
    """Per-response-token outputs of a policy forward pass. Shapes: (B, T)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None


@dataclass
class Experience:
    """What a policy-gradient update needs from one rollout: made by `rlhf.rollout.make_experience`, then the
    recipe fills `advantages` (and `returns` for PPO). Shapes: B rows (prompts × n), T response tokens.

    Every tensor is detached: these are the fixed targets of the update, not part of its graph.
    """

    rollout: Rollout  # the sampled responses (B rows, grouped by prompt)
    scores: torch.Tensor  # (B,) float: the total reward of each completion (Σ weight · component)
    components: dict[str, torch.Tensor]  # name -> (B,) float: each reward term before weighting
    old_logprobs: torch.Tensor | None  # (B, T) float: log π_old at the sampling temperature; None = on-policy update
    ref_logprobs: torch.Tensor | None = None  # (B, T) float: log π_ref(token); None when β = 0 (never computed)
    values: torch.Tensor | None = None  # (B, T) float: V(state before each token) from the critic (PPO)
    advantages: torch.Tensor | None = None  # (B,) or (B, T) float: filled by the recipe's estimator
    returns: torch.Tensor | None = None  # (B, T) float: value targets (PPO)
    is_weights: torch.Tensor | None = None  # (B, T) float: min(π_prox / π_behav, cap) of a stale rollout (async)
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds (generate, score, reference, values)

    def __len__(self) -> int:
        return len(self.rollout)

    @property
    def response_mask(self) -> torch.Tensor:
        return self.rollout.response_mask

    def select(self, idx: torch.Tensor | list[int]) -> "Experience":
        """The rows `idx` (a minibatch): every per-row tensor sliced, the rollout too; timings kept."""
        index = torch.as_tensor(idx, dtype=torch.long)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Rollout):
                picked[f.name] = value.select(index)
            elif isinstance(value, torch.Tensor):
                picked[f.name] = value.index_select(0, index.to(value.device))
            elif f.name == "components":
                picked[f.name] = {k: v.index_select(0, index.to(v.device)) for k, v in value.items()}
            else:
                picked[f.name] = value
        return Experience(**picked)


def cat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Rows of several rollouts as one (prompts left-padded, responses right-padded to the widest); `prompt_index`
    is offset so that groups stay distinct. Used to refill a batch (DAPO's dynamic sampling)."""
    if len(parts) == 1:
        return parts[0]
    width_p = max(r.prompt_ids.size(1) for r in parts)
    width_t = max(r.response_ids.size(1) for r in parts)
    pad_id = pad_token_id
    out: dict[str, list] = {f.name: [] for f in fields(Rollout) if f.name != "pixel_values"}
    offset = 0
    for r in parts:
        lp, lt = width_p - r.prompt_ids.size(1), width_t - r.response_ids.size(1)
        out["prompt_ids"].append(torch.nn.functional.pad(r.prompt_ids, (lp, 0), value=pad_id))
        out["prompt_mask"].append(torch.nn.functional.pad(r.prompt_mask, (lp, 0), value=False))
        out["response_ids"].append(torch.nn.functional.pad(r.response_ids, (0, lt), value=pad_id))
        out["response_mask"].append(torch.nn.functional.pad(r.response_mask, (0, lt), value=False))
        for name in ("ended", "lengths"):
            out[name].append(getattr(r, name))
        out["prompt_index"].append(r.prompt_index + offset)
        offset += int(r.prompt_index.max()) + 1 if len(r) else 0
        out["prompts"] += r.prompts
        out["completions"] += r.completions
    images = [r.pixel_values for r in parts]
    if any(p is None for p in images) != all(p is None for p in images):
        raise ValueError("cannot join rollouts with images and rollouts without")
    return Rollout(**{k: (torch.cat(v) if k not in ("prompts", "completions") else v) for k, v in out.items()},
                   pixel_values=None if images[0] is None else torch.cat(images))


def cat_experiences(parts: list[Experience], pad_token_id: int) -> Experience:
    """Rows of several experiences as one (responses right-padded to the widest: extra positions do not count);
    timings add up."""
    if len(parts) == 1:
        return parts[0]
    rollout = cat_rollouts([p.rollout for p in parts], pad_token_id)
    width = rollout.response_ids.size(1)

    def cat(name):
        tensors = [getattr(p, name) for p in parts]
        if tensors[0] is None:
            return None
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.size(1))) for t in tensors])

    timings = {k: sum(p.timings.get(k, 0.0) for p in parts) for k in parts[0].timings}
    return Experience(rollout=rollout, scores=torch.cat([p.scores for p in parts]),
                      components={k: torch.cat([p.components[k] for p in parts]) for k in parts[0].components},
                      old_logprobs=cat("old_logprobs"), ref_logprobs=cat("ref_logprobs"), values=cat("values"),
                      timings=timings)
