"""Typed containers passed between stages. Shapes use B = sequences in the batch, P = prompt length,
T = response length."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


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

    def __len__(self) -> int:
        return self.response_ids.size(0)

    def to(self, device: torch.device | str) -> "Rollout":
        """Move every tensor to `device` (lists stay as they are)."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v) for f in fields(self)
        }
        return Rollout(**moved)


@dataclass
class ForwardOut:
    """Per-response-token outputs of a policy forward pass. Shapes: (B, T)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
