"""Build the demo world's tiny Llama-style causal LM from a config (random init, no download)."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from rlhf.errors import UserError

MAX_POSITIONS = 256

# LlamaConfig kwargs per size. Parameter counts are for a 512-token vocabulary (tied embeddings counted once).
MODEL_SIZES: dict[str, dict] = {
    # ~0.13M: unit tests.
    "nano": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    # ~0.86M: the default; pretrain + SFT in a few minutes on 2 CPU cores.
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4),
    # ~4.9M: closer to a "real" run when there is time (or a GPU).
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8),
}


def build_tiny_lm(tokenizer: PreTrainedTokenizerBase, size: str = "tiny", seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` sized by ``MODEL_SIZES[size]`` for ``tokenizer``.

    vocab_size = ``len(tokenizer)`` (added tokens included); pad/bos/eos ids come from the tokenizer; embeddings are
    tied; ``max_position_embeddings`` is 256. The same ``seed`` gives the same weights, and the global torch RNG is
    left as it was. The model round-trips through ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained``.
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **MODEL_SIZES[size],
    )
    # fork_rng: seeding must not reset the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def scratch_builder(size: str | None) -> Callable[[PreTrainedTokenizerBase, int], LlamaForCausalLM] | None:
    """What `PolicyModel.load(build=...)` needs for `model.scratch_size`: `build_tiny_lm` at that size (None for no
    size). An unknown size is the user's error, named with the valid ones."""
    if size is None:
        return None
    if size not in MODEL_SIZES:
        raise UserError(f"model.scratch_size '{size}' is not one of {', '.join(MODEL_SIZES)}")
    return lambda tokenizer, seed: build_tiny_lm(tokenizer, size, seed=seed)
