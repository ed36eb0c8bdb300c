"""Sampling: `generate` picks the backend; "fast" (`sample`) is a prefix-shared prefill, then a KV-cache decode loop.

Why: sampling is about half of an RL step, and for the small models this framework trains on CPU, transformers'
`generate` spends most of a decode step outside the matmuls (cache objects growing by `torch.cat`, mask building,
logits processors, dozens of small ops per layer). One `sample` call here:

1. Reads the weights once as plain tensors (`_read_weights`): q/k/v and gate/up concatenated (4 GEMMs a layer, not
   7). LoRA adapters are merged into these copies (W + ΔW, peft's own `get_delta_weight`), so a LoRA policy samples
   with merged weights while the model is never touched: no merge/unmerge round trip that would drift the frozen
   base, which doubles as the reference policy. `bf16=True` casts the copies (and so the KV cache) to bfloat16.
2. Prefills each distinct prompt once (`_prefill`, eager): its K/V become a prefix cache that all n samples of the
   prompt read; their n·g queries per KV head meet it in one product instead of n matrix-vector products.
3. Decodes into a preallocated per-row suffix cache (`_decode_step` / `_layer_step`). Eager, a step reads only the
   slots written so far. Compiled (`torch.compile`, see `compile_mode`), the shapes are fixed for the whole call
   (prompt width and budget rounded up to a multiple of BUCKET, unwritten slots masked), so one graph per bucket
   serves every step of every call in it; a compiler failure warns once and the same function runs eagerly.
4. Picks tokens from the last position's logits only (`select_tokens`): argmax, or transformers' temperature ->
   top-k -> top-p warpers (`warp_scores`, same arithmetic) and one draw per row. Finished rows are fed padding;
   the loop stops when every row has ended. The result is what `model.generate(...)[:, P:]` returns.

Greedy decoding is the correctness anchor: token-identical to `model.generate` in fp32 (tests/rlhf/test_generation.py).
Llama- and Qwen2-family models are supported; `unsupported_reason` says why another is not (`generate` then uses
transformers' `generate`). Measurements: benchmarks/bench_generate.py.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from rlhf.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("hf", "fast")
DEFAULT_BACKEND = "fast"  # what `generate` uses unless told; RLHF_SAMPLING_BACKEND overrides every caller's choice
FAMILIES = ("llama", "qwen2")
BUCKET = 16  # prompt width and response budget are rounded up to a multiple of this: one compile serves many calls

# generation_config fields whose non-default values add logits processors the fast sampler does not implement
# (a hub model's generation_config.json may set them, and `model.generate` would apply them)
_PROCESSOR_DEFAULTS = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "min_p": (None,), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0), "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,), "top_h": (None,),
    "encoder_repetition_penalty": (None, 1.0), "exponential_decay_length_penalty": (None,),
}

_warned: set[str] = set()


def default_backend() -> str:
    """The sampling backend of `generate(backend=None)`: RLHF_SAMPLING_BACKEND if set, else DEFAULT_BACKEND."""
    return backend_override() or DEFAULT_BACKEND


def backend_override() -> str | None:
    """RLHF_SAMPLING_BACKEND (hf | fast), or None when unset. One rule for every stage: when set, it replaces the
    backend any caller asks for (the config keys `sampling.backend`, `eval.generation.backend`...)."""
    value = os.environ.get("RLHF_SAMPLING_BACKEND", "").strip().lower()
    if value and value not in BACKENDS:
        raise UserError(f"environment variable RLHF_SAMPLING_BACKEND={_shown(value)}: expected one of "
                        f"{', '.join(BACKENDS)} (or unset, to use each stage's configured backend)")
    return value or None


def compile_after_seconds() -> float:
    """RLHF_COMPILE_AFTER_S: eager decode seconds in one shape bucket before auto mode compiles it (default 60)."""
    raw = os.environ.get("RLHF_COMPILE_AFTER_S", "").strip()
    if not raw:
        return 60.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0:  # also refuses nan
        raise UserError(f"environment variable RLHF_COMPILE_AFTER_S={_shown(raw)}: expected a number of seconds ≥ 0 "
                        "(default 60; RLHF_COMPILE=0 never compiles)")
    return value


def check_environment() -> None:
    """Parse every RLHF_* sampling variable now, so a bad value stops a stage before it loads anything."""
    backend_override()
    compile_mode()
    compile_after_seconds()


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "...")


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


# ---------------------------------------------------------------------------------------------------------------
# Which models


def base_model(model):
    """The bare `*ForCausalLM` inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def is_vision_language(model) -> bool:
    """A LLaVA-style model: vision tower and projector in `.model`, a causal LM's trunk in `.model.language_model`."""
    inner = getattr(base_model(model), "model", None)
    return hasattr(inner, "language_model") and hasattr(inner, "get_image_features")


class _TextView:
    """A vision-language model's causal LM (its language model trunk and LM head) in the Llama layout the fast
    sampler reads: the image features enter as prompt embeddings, after which decoding is text-only."""

    def __init__(self, vlm):
        self.model = vlm.model.language_model
        self.config = vlm.config.get_text_config()
        self.generation_config = getattr(vlm, "generation_config", None)
        self._head = vlm.get_output_embeddings()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self._head


def _text_lm(model):
    lm = base_model(model)
    return _TextView(lm) if is_vision_language(lm) else lm


def prompt_embeddings(model, prompt_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """A vision-language model's input embeddings of left-padded prompts (R, P): token embeddings with each image's
    projected patch features in its placeholder positions, as the model's own forward builds them. Shape: (R, P, D)."""
    inner = base_model(model).model
    config = base_model(model).config
    embeds = inner.get_input_embeddings()(prompt_ids)
    features = inner.get_image_features(pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
                                        vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output
    features = torch.cat(list(features), dim=0).to(embeds.dtype)
    slots = (prompt_ids == config.image_token_id)
    if int(slots.sum()) != features.size(0):
        raise ValueError(f"{int(slots.sum())} image tokens in the prompts for {features.size(0)} image features")
    return embeds.masked_scatter(slots[..., None], features)


def unsupported_reason(model) -> str | None:
    """Why the fast sampler cannot run `model` (None = it can): architecture, attention variant, LoRA variant."""
    lm = _text_lm(model)
    config = getattr(lm, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} is not one of {', '.join(FAMILIES)}"
    if not hasattr(lm, "model") or not hasattr(lm.model, "layers") or not hasattr(lm.model, "rotary_emb"):
        return f"{type(lm).__name__} does not have the Llama layout (model.layers, model.rotary_emb)"
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "sliding-window attention layers"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope in ("dynamic", "longrope"):
        return f"rope_type {rope!r} changes with the sequence length"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    gen = getattr(lm, "generation_config", None)
    for name, defaults in _PROCESSOR_DEFAULTS.items():
        if gen is not None and getattr(gen, name, None) not in defaults:
            return f"the model's generation_config sets {name}={getattr(gen, name)!r} (a logits processor the fast sampler lacks)"
    try:
        _read_weights(lm, None, check_only=True)
    except _Unsupported as exc:
        return str(exc)
    return None


class _Unsupported(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Weights


def _is_lora(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _is_trainable_tokens(module) -> bool:
    return hasattr(module, "get_merged_weights") and hasattr(module, "token_indices")


def _adapters_off(module) -> bool:
    return bool(getattr(module, "disable_adapters", False)) or bool(getattr(module, "merged", False))


def _effective(module, what: str, merge: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a Linear or Embedding as the forward pass sees it: LoRA / trainable-token adapters merged into
    a copy, or the module's own tensors when it has none (or they are disabled / already merged). `merge=False` only
    checks that it can (and returns the base tensors)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if not isinstance(base, (torch.nn.Linear, torch.nn.Embedding)):
        raise _Unsupported(f"{what} is a {type(base).__name__}")
    shape = (base.out_features, base.in_features) if isinstance(base, torch.nn.Linear) else (
        base.num_embeddings, base.embedding_dim)
    if type(base.weight).__name__ == "DTensor" or tuple(base.weight.shape) != shape:
        raise _Unsupported(f"{what} has sharded or partitioned weights (FSDP, DeepSpeed ZeRO-3)")
    if _is_lora(module):
        base = module.get_base_layer()
        if not isinstance(base, torch.nn.Linear):
            raise _Unsupported(f"LoRA on a {type(base).__name__} ({what})")
        if _adapters_off(module):
            return base.weight, base.bias
        weight = base.weight
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if getattr(module, "lora_variant", {}).get(name) is not None or getattr(module, "lora_bias", {}).get(name):
                raise _Unsupported(f"a LoRA variant (DoRA, lora_bias, ...) on {what}")
            if merge:
                weight = weight + module.get_delta_weight(name).to(weight.dtype)
        return weight, base.bias
    if _is_trainable_tokens(module):
        base = module.get_base_layer()
        if _adapters_off(module) or not module.active_adapters or not merge:
            return base.weight, getattr(base, "bias", None)
        return module.get_merged_weights(module.active_adapters), None
    if module is base:
        return module.weight, getattr(module, "bias", None)
    raise _Unsupported(f"{what} is a {type(module).__name__}")


@dataclass(frozen=True)
class _Spec:
    """The static numbers of a model the decode step is specialised on (besides tensor shapes)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float
    act: str


@dataclass
class _Weights:
    spec: _Spec
    embed: torch.Tensor  # (V, H)
    layers: list[list[torch.Tensor | None]]  # per layer: ln1, w_qkv, b_qkv, w_o, b_o, ln2, w_gu, b_gu, w_down, b_down
    norm: torch.Tensor  # (H,)
    head: torch.Tensor  # (V, H)
    head_bias: torch.Tensor | None
    rotary: torch.nn.Module = field(repr=False)


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return None if t is None else t.detach() if dtype is None else t.detach().to(dtype)


def _cat(parts: list, dtype: torch.dtype | None) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat([_cast(p, dtype) for p in parts])


def _read_weights(lm, dtype: torch.dtype | None, check_only: bool = False) -> _Weights | None:
    """The weights of a Llama-layout causal LM as the decode step takes them (in `dtype`; None = as they are), or with
    `check_only` just whether it can (`_Unsupported` says why not)."""
    config, body = lm.config, lm.model
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        raise _Unsupported(f"activation {act!r}")
    merge = not check_only
    layers = []
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            raise _Unsupported("q/k norms in attention")
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = [_effective(getattr(attn, n), f"layer {i} {n}", merge)
                                                  for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        (wg, bg), (wu, bu), (wd, bd) = [_effective(getattr(mlp, n), f"layer {i} {n}", merge)
                                        for n in ("gate_proj", "up_proj", "down_proj")]
        if not check_only:
            layers.append([
                _cast(layer.input_layernorm.weight, dtype), _cat([wq, wk, wv], dtype), _cat([bq, bk, bv], dtype),
                _cast(wo, dtype), _cast(bo, dtype), _cast(layer.post_attention_layernorm.weight, dtype),
                _cat([wg, wu], dtype), _cat([bg, bu], dtype), _cast(wd, dtype), _cast(bd, dtype),
            ])
    if getattr(lm.get_input_embeddings(), "embed_scale", None) is not None:
        raise _Unsupported("scaled input embeddings")
    embed, _ = _effective(lm.get_input_embeddings(), "the input embeddings", merge)
    head, head_bias = _effective(lm.get_output_embeddings(), "the output embeddings", merge)
    if check_only:
        return None
    spec = _Spec(layers=len(layers), heads=heads, kv_heads=kv_heads,
                 head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                 eps=float(body.norm.variance_epsilon), scale=float(body.layers[0].self_attn.scaling), act=act)
    return _Weights(spec=spec, embed=_cast(embed, dtype), layers=layers, norm=_cast(body.norm.weight, dtype),
                    head=_cast(head, dtype), head_bias=_cast(head_bias, dtype), rotary=body.rotary_emb)


# ---------------------------------------------------------------------------------------------------------------
# The model's math (the same operations, in the same precision, as transformers' Llama / Qwen2 modules)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # one fused op, bit-identical to LlamaRMSNorm in float32 (variance in float32, weight applied in the input dtype)
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # RoPE as transformers' apply_rotary_pos_emb: x·cos + rotate_half(x)·sin, where rotate_half(x) = (-x2, x1). With
    # sin_signed = (-sin1, sin2) that is x·cos + roll(x)·sin_signed: the same products, bit for bit, in 4 ops not 7
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _act(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_pytorch_tanh" else "none")


def _mlp(x: torch.Tensor, w: list, spec: _Spec) -> torch.Tensor:
    gate, up = F.linear(x, w[6], w[7]).chunk(2, dim=-1)
    return F.linear(_act(gate, spec.act) * up, w[8], w[9])


def _rope_tables(weights: _Weights, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (see `_rotate`) for positions 0..length-1, (length, head_dim), from the model's own rotary
    module (every RoPE variant it implements); each entry is the same product `position · inv_freq` it computes."""
    positions = torch.arange(length, device=device)[None]
    cos, sin = weights.rotary(weights.embed[:1], positions)
    half = sin.shape[-1] // 2
    return cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)


def _prefill(weights: _Weights, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cos_table, sin_table,
             prefix_k: list[torch.Tensor], prefix_v: list[torch.Tensor], embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Run the distinct prompts (R, p) once; write their K/V into the right-most p slots of the prefix caches
    (R, kv_heads, P, d); return the last position's logits (R, V) in float32. `embeds` (R, p, D): the prompts'
    input embeddings when they are not the token embeddings (a vision-language model's image features)."""
    spec = weights.spec
    rows, width = ids.shape
    q_size, kv_size = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    x = F.embedding(ids, weights.embed) if embeds is None else embeds.to(weights.embed.dtype)
    cos, sin = cos_table[positions][:, None], sin_table[positions][:, None]  # (R, 1, p, d)
    causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
    # a padding query sees only itself (a row of nothing but masked keys would give NaN and poison its K/V)
    allowed = (causal & mask[:, None, :]) | torch.eye(width, dtype=torch.bool, device=ids.device)
    allowed = allowed[:, None]  # (R, 1, p, p)
    start = prefix_k[0].size(2) - width
    for i, w in enumerate(weights.layers):
        last = i == spec.layers - 1
        h = _rms_norm(x, w[0], spec.eps)
        q, k, v = F.linear(h, w[1], w[2]).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(rows, width, spec.heads, spec.head_dim).transpose(1, 2)
        k = k.view(rows, width, spec.kv_heads, spec.head_dim).transpose(1, 2)
        v = v.view(rows, width, spec.kv_heads, spec.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        prefix_k[i][:, :, start:] = k
        prefix_v[i][:, :, start:] = v
        if last:  # only the last position's output is needed from the last layer
            q, x, layer_mask = q[:, :, -1:], x[:, -1:], allowed[:, :, -1:]
        else:
            layer_mask = allowed
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layer_mask, scale=spec.scale,
                                             enable_gqa=spec.heads != spec.kv_heads)
        x = x + F.linear(out.transpose(1, 2).reshape(rows, -1, q_size), w[3], w[4])
        x = x + _mlp(_rms_norm(x, w[5], spec.eps), w, spec)
    x = _rms_norm(x[:, -1], weights.norm, spec.eps)
    return F.linear(x, weights.head, weights.head_bias).float()


def _layer_step(spec: _Spec, n: int, x, w, cos, sin, slot, prefix_bias, suffix_bias, prefix_k, prefix_v, suffix_k,
                suffix_v) -> torch.Tensor:
    """One decoder layer for one new token per row, at fixed shapes: x (B, H) -> (B, H), B = R·n rows.

    Shapes: cos, sin (B, 1, d); `slot` is this token's suffix-cache slot (its index in the response): an int when
    eager (then only slots <= slot are read), a (1,) long tensor when compiled (so that one graph serves every
    step: all T slots are read, `suffix_bias` (1, 1, T) masks the unwritten ones); prefix_k/v (R, kv, P, d), one
    per prompt, shared by its n rows; suffix_k/v (R, kv, n, T, d); prefix_bias (R·kv, 1, P) 0 on real prompt
    tokens, -inf on padding. The token's K/V are written at `slot`.

    Attention runs per (prompt, kv head): the n·g queries of a prompt's rows against its prefix in one product, each
    row's g queries against its own suffix, one softmax over both.
    """
    batch = x.size(0)
    rows = batch // n
    kv, group, d = spec.kv_heads, spec.heads // spec.kv_heads, spec.head_dim
    q_size, kv_size = spec.heads * d, kv * d
    h = _rms_norm(x, w[0], spec.eps)
    qk, v = F.linear(h, w[1], w[2]).split([q_size + kv_size, kv_size], dim=-1)
    qk = _rotate(qk.view(batch, spec.heads + kv, d), cos, sin)  # RoPE on q and k at once
    q, k = qk.split([spec.heads, kv], dim=1)
    k = k.reshape(rows, n, kv, d).transpose(1, 2)  # (R, kv, n, d)
    v = v.view(rows, n, kv, d).transpose(1, 2)
    q = q.reshape(rows, n, kv, group, d).transpose(1, 2).reshape(rows * kv, n * group, d).contiguous() * spec.scale
    width_p, width_t = prefix_k.size(2), suffix_k.size(3)
    prefix_k, prefix_v = prefix_k.view(rows * kv, width_p, d), prefix_v.view(rows * kv, width_p, d)
    suffix_k, suffix_v = suffix_k.view(batch * kv, width_t, d), suffix_v.view(batch * kv, width_t, d)
    if isinstance(slot, int):  # eager: read only the slots written so far (no mask); products as batched GEMMs
        suffix_k.view(rows, kv, n, width_t, d)[:, :, :, slot] = k
        suffix_v.view(rows, kv, n, width_t, d)[:, :, :, slot] = v
        suffix_k, suffix_v = suffix_k[:, :slot + 1], suffix_v[:, :slot + 1]
        scores_s = torch.bmm(q.view(batch * kv, group, d), suffix_k.transpose(1, 2))
        scores_p = torch.baddbmm(prefix_bias, q, prefix_k.transpose(1, 2))
        probs = torch.softmax(torch.cat([scores_p.view(batch * kv, group, width_p), scores_s], dim=-1), dim=-1,
                              dtype=torch.float32).to(x.dtype)
        out = torch.bmm(probs[..., :width_p].reshape(rows * kv, n * group, width_p), prefix_v)
        out = torch.baddbmm(out.view(batch * kv, group, d), probs[..., width_p:], suffix_v)
    else:  # compiled: every slot, unwritten ones masked, so the shapes never change; products as multiply + sum,
        # which inductor fuses into one loop each (a batched GEMM call pays ~1 µs per tiny (row, head) matrix)
        suffix_k.view(rows, kv, n, width_t, d).index_copy_(3, slot, k.unsqueeze(3))
        suffix_v.view(rows, kv, n, width_t, d).index_copy_(3, slot, v.unsqueeze(3))
        scores_s = (q.view(batch * kv, group, 1, d) * suffix_k[:, None]).sum(-1) + suffix_bias
        scores_p = (q.view(rows * kv, n * group, 1, d) * prefix_k[:, None]).sum(-1) + prefix_bias
        probs = torch.softmax(torch.cat([scores_p.view(batch * kv, group, width_p), scores_s], dim=-1), dim=-1,
                              dtype=torch.float32).to(x.dtype)
        out = (probs[..., :width_p].reshape(rows * kv, n * group, width_p, 1) * prefix_v[:, None]).sum(-2)
        out = out.view(batch * kv, group, d) + (probs[..., width_p:, None] * suffix_v[:, None]).sum(-2)
    out = out.view(rows, kv, n, group, d).transpose(1, 2).reshape(batch, q_size)
    x = x + F.linear(out, w[3], w[4])
    return x + _mlp(_rms_norm(x, w[5], spec.eps), w, spec)


def _decode_step(spec: _Spec, n: int, embed, layers, norm, head, head_bias, cos_table, sin_table, tokens, position0,
                 slot, prefix_bias, prefix_k, prefix_v, suffix_k, suffix_v) -> torch.Tensor:
    """One new token per row through the whole model: float32 logits (B, V). `tokens`, `position0` (B,) long; the
    rest as in `_layer_step`, caches one per layer."""
    positions = position0 + slot
    cos, sin = cos_table[positions][:, None], sin_table[positions][:, None]  # (B, 1, d)
    suffix_bias = None
    if not isinstance(slot, int):  # compiled: mask the slots after this one
        width_t = suffix_k[0].size(3)
        suffix_bias = torch.zeros(1, 1, width_t, dtype=prefix_bias.dtype, device=tokens.device).masked_fill(
            torch.arange(width_t, device=tokens.device) > slot, float("-inf"))
    x = F.embedding(tokens, embed)
    for i, w in enumerate(layers):
        x = _layer_step(spec, n, x, w, cos, sin, slot, prefix_bias, suffix_bias, prefix_k[i], prefix_v[i], suffix_k[i],
                        suffix_v[i])
    return F.linear(_rms_norm(x, norm, spec.eps), head, head_bias).float()


# ---------------------------------------------------------------------------------------------------------------
# Compiling


def compile_mode() -> str:
    """How `sample` compiles by default, from RLHF_COMPILE: "auto" (unset), "on" (1/true) or "off" (0/false).

    auto compiles a shape bucket once this process has spent RLHF_COMPILE_AFTER_S (default 60) seconds decoding it
    eagerly, so a short stage never waits for a compiler and a long one stops paying the eager overhead: the
    ski-rental rule, never more than about twice the better choice in hindsight (compile costs and speed-ups:
    benchmarks/README.md). Compiled and eager logits differ in float rounding, so the same seed can (rarely) draw a
    different token once a bucket is compiled."""
    value = os.environ.get("RLHF_COMPILE", "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return "on" if value in ("1", "true", "yes", "on") else "off"
    raise UserError(f"environment variable RLHF_COMPILE={_shown(value)}: expected auto (or unset), 1 / true / on, "
                    "or 0 / false / off")


@dataclass
class CompileStats:
    """Compiling in this process: buckets compiled and their seconds, eager decode seconds per bucket (auto mode's
    meter), and why compiling is off if it failed once (then every call runs eagerly)."""

    compiles: int = 0
    seconds: float = 0.0
    failed: str | None = None
    compiled: set = field(default_factory=set)
    eager_seconds: dict = field(default_factory=dict)


# process state, like torch.compile's own graph cache: what was compiled (and the eager seconds that decide it) holds
# for every later call in this process, whoever makes it
COMPILE = CompileStats()
_compiled_step = None


def compiled_decode_step():
    """`_decode_step` under `torch.compile` (fixed shapes, one graph per bucket)."""
    global _compiled_step
    if _compiled_step is None:
        import torch._dynamo

        # one bucket = one graph; a stage sees a handful, the limit only guards against an unbounded number
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_step = torch.compile(_decode_step, dynamic=False, fullgraph=True)
    return _compiled_step


def _bucket(size: int) -> int:
    return -(-size // BUCKET) * BUCKET


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def warp_scores(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """transformers' sampling warpers on float32 logits (B, V), in its order and with its arithmetic: temperature
    (`TemperatureLogitsWarper`), then top-k (`TopKLogitsWarper`: ties with the k-th score stay), then top-p
    (`TopPLogitsWarper`: drop the low tail whose cumulative probability is <= 1 - top_p, keep at least one token);
    removed tokens get -inf. temperature 1, top_k 0 and top_p 1 are off."""
    scores = logits
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.size(-1)))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def prompt_uniforms(seed: int, first_prompt: int, prompts: int, n: int, steps: int) -> torch.Tensor:
    """The uniform numbers that drive sampling, (prompts·n, steps) float64: prompt i's n rows draw from their own
    stream, seeded by (`seed`, `first_prompt` + i). A prompt's samples therefore do not depend on which other prompts
    share its batch or its process: a rollout split across processes draws what one process would (up to float
    rounding of the logits), and so does an evaluation split into other batches."""
    out = torch.empty(prompts * n, steps, dtype=torch.float64)
    for i in range(prompts):
        stream = (seed * 6_364_136_223_846_793_005 + (first_prompt + i) * 1_442_695_040_888_963_407) % 2**63
        out[i * n:(i + 1) * n] = torch.rand(n, steps, dtype=torch.float64, generator=torch.Generator().manual_seed(stream))
    return out


def select_tokens(logits: torch.Tensor, greedy: bool, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row from float32 logits (B, V): the argmax (greedy, first index on ties, as
    `generate`), or one draw from softmax(`warp_scores(...)`).

    The draw is inverse-CDF sampling with one uniform number per row: `uniform` (B,), else from the global RNG. `torch.multinomial`
    (what `generate` calls) draws one exponential per vocabulary entry: a fifth of a small model's decode step on
    CPU at 256 rows. The cumulative sum accumulates in double on CPU; the draw is clamped below the total, so a
    token of probability 0 is never picked."""
    if greedy:
        return logits.argmax(-1)
    cdf = warp_scores(logits, temperature, top_k, top_p).softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand_like(total) if uniform is None else uniform.to(total)[:, None]
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


@dataclass
class SampleStats:
    """What one sampling call ran and where it spent its time (seconds). The hf backend fills `backend`, `steps` and
    `decode` (its whole `model.generate` call) only."""

    backend: str = "fast"
    weights: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    compile: float = 0.0
    steps: int = 0
    compiled: bool = False


def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **kwargs) -> tuple[torch.Tensor, SampleStats]:
    """The fast backend. Sample `n` responses for each distinct left-padded prompt (R, p) and return the raw response
    ids (R·n, T), rows grouped by prompt, finished rows filled with `pad_token_id`, T = the steps run
    (<= max_new_tokens): what `model.generate(...)[:, p:]` returns for the prompts repeated n times; and the call's
    `SampleStats`. Random draws come from `uniforms` (R·n, max_new_tokens; see `prompt_uniforms`), else from the
    global RNG.

    Keyword args: n, max_new_tokens, eos_token_id, pad_token_id, greedy, temperature, top_k, top_p (transformers'
    meaning; top_k = 0 and top_p = 1 are off), and
        bf16: run weights and KV cache in bfloat16 (faster at large batches; the sampled distribution then differs
            slightly from the model's own precision).
        compile: compile the decode step: True, False, or None = `compile_mode()` (auto by default); a compiler
            failure warns once and samples eagerly from then on.
    """
    with torch.inference_mode():  # less dispatcher work per op than no_grad; the result is cloned out of it
        out, stats = _sample(model, prompt_ids, prompt_mask, **kwargs)
    return out.clone(), stats


def _sample(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    n: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    bf16: bool = False,
    compile: bool | None = None,
    uniforms: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    suppress_ids: Sequence[int] = (),
) -> tuple[torch.Tensor, SampleStats]:
    stats = SampleStats()
    lm = _text_lm(model)
    device = prompt_ids.device
    start = time.perf_counter()
    weights = _read_weights(lm, torch.bfloat16 if bf16 else None)
    stats.weights = time.perf_counter() - start
    spec, act_dtype = weights.spec, weights.embed.dtype
    rows, width = prompt_ids.shape
    batch = rows * n

    # compile this bucket? (the shapes of one graph: prompt width and budget rounded up, so that calls share it)
    key = (spec, n, batch, _bucket(width), _bucket(max_new_tokens), act_dtype, device.type)
    mode = compile_mode() if compile is None else "on" if compile else "off"
    after = compile_after_seconds()
    use_compile = COMPILE.failed is None and (mode == "on" or (mode == "auto" and COMPILE.eager_seconds.get(key, 0.0) >= after))
    first = use_compile and key not in COMPILE.compiled
    width_p, width_t = (key[3], key[4]) if use_compile else (width, max_new_tokens)
    cos_table, sin_table = _rope_tables(weights, width_p + width_t, device)

    start = time.perf_counter()
    # eager reads only written slots, so the caches need no clearing; compiled reads masked slots too (must be finite)
    alloc = torch.zeros if use_compile else torch.empty
    prefix_k = [alloc(rows, spec.kv_heads, width_p, spec.head_dim, dtype=act_dtype, device=device)
                for _ in range(spec.layers)]
    prefix_v = [alloc(t.shape, dtype=act_dtype, device=device) for t in prefix_k]
    # transformers' position ids for a left-padded prompt: cumsum(mask) - 1, padding at 1 (it never attends anyway)
    positions = (prompt_mask.long().cumsum(-1) - 1).masked_fill(~prompt_mask, 1)
    embeds = prompt_embeddings(model, prompt_ids, pixel_values) if pixel_values is not None else None
    logits = _prefill(weights, prompt_ids, prompt_mask, positions, cos_table, sin_table, prefix_k, prefix_v, embeds)
    prefix_bias = torch.full((rows, width_p), float("-inf"), dtype=act_dtype, device=device)
    prefix_bias[:, width_p - width:].masked_fill_(prompt_mask, 0.0)
    prefix_bias = prefix_bias.repeat_interleave(spec.kv_heads, dim=0)[:, None]  # (R·kv, 1, P)
    stats.prefill = time.perf_counter() - start

    start = time.perf_counter()
    suffix_k = [alloc(rows, spec.kv_heads, n, width_t, spec.head_dim, dtype=act_dtype, device=device)
                for _ in range(spec.layers)]
    suffix_v = [alloc(t.shape, dtype=act_dtype, device=device) for t in suffix_k]
    position0 = prompt_mask.long().sum(-1).repeat_interleave(n)  # the first response token's position, per row
    step = compiled_decode_step() if use_compile else _decode_step
    # compiled, the slot is a tensor: one graph serves every step
    slots = [torch.tensor([t], device=device) for t in range(max_new_tokens)] if use_compile else range(max_new_tokens)
    fixed = (spec, n, weights.embed, weights.layers, weights.norm, weights.head, weights.head_bias, cos_table, sin_table)
    caches = (prefix_bias, prefix_k, prefix_v, suffix_k, suffix_v)

    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    logits = logits.repeat_interleave(n, dim=0)
    steps = 0
    suppressed = torch.tensor(list(suppress_ids), dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        if len(suppressed):
            logits = logits.index_fill(-1, suppressed, float("-inf"))
        tokens = select_tokens(logits, greedy, temperature, top_k, top_p, None if uniforms is None else uniforms[:, t])
        tokens = torch.where(unfinished, tokens, pad_token_id)
        out[:, t] = tokens
        steps = t + 1
        unfinished &= tokens != eos_token_id
        if steps == max_new_tokens or not bool(unfinished.any()):
            break
        if not first:
            logits = step(*fixed, tokens, position0, slots[t], *caches)
            continue
        first, compile_start = False, time.perf_counter()
        try:
            logits = step(*fixed, tokens, position0, slots[t], *caches)
            COMPILE.compiled.add(key)
            COMPILE.compiles += 1
        except Exception as exc:  # noqa: BLE001 - whatever the compiler raises, the eager step is the same function
            COMPILE.failed = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            warn_once(f"torch.compile of the fast sampler's decode step failed ({COMPILE.failed}); sampling eagerly")
            step, use_compile, slots = _decode_step, False, range(max_new_tokens)
            logits = step(*fixed, tokens, position0, t, *caches)
        stats.compile = time.perf_counter() - compile_start
        COMPILE.seconds += stats.compile
    stats.decode = time.perf_counter() - start - stats.compile
    if not use_compile:
        COMPILE.eager_seconds[key] = COMPILE.eager_seconds.get(key, 0.0) + stats.decode
    stats.steps, stats.compiled = steps, use_compile
    return out[:, :steps], stats


# ---------------------------------------------------------------------------------------------------------------
# The entry point: backend, fallback, seeding


def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    n: int = 1,
    max_new_tokens: int = 64,
    eos_token_id: int,
    pad_token_id: int,
    bos_token_id: int | None = None,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    first_prompt: int = 0,
    backend: str | None = None,
    bf16: bool = False,
    pixel_values: torch.Tensor | None = None,
    suppress_ids: Sequence[int] = (),
) -> tuple[torch.Tensor, SampleStats]:
    """Sample `n` responses for each distinct left-padded prompt (R, P), in eval mode: the raw response ids (R·n, T)
    as `sample` returns them, and the call's `SampleStats`.

    `backend`: "fast" (`sample`) or "hf" (`model.generate` on the prompts repeated n times); None = `default_backend()`;
    RLHF_SAMPLING_BACKEND, when set, replaces it.
    A model the fast sampler does not support samples with "hf", decided on its first call (one warning). With `seed`
    the sampling is reproducible and the global RNG is left untouched; on the fast backend prompt i then draws from its
    own stream, seeded by `seed` and `first_prompt` + i (`prompt_uniforms`), while `model.generate` draws from one
    stream for the whole call. `bf16`: as in `sample` (fast only). `pixel_values` (R, C, H, W): each prompt's image,
    for a vision-language model, whose image token is one of the `suppress_ids`: tokens never sampled.
    """
    backend = _backend_for(model, backend)
    picks = dict(n=n, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                 greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    device = prompt_ids.device
    devices = [device] if device.type == "cuda" else []
    rng = torch.random.fork_rng(devices=devices) if seed is not None else nullcontext()
    was_training = model.training
    model.eval()
    try:
        with rng, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            if backend == "fast":
                uniforms = None if seed is None or greedy else prompt_uniforms(
                    seed, first_prompt, prompt_ids.size(0), n, max_new_tokens).to(device)
                try:
                    return sample(model, prompt_ids, prompt_mask, **picks, bf16=bf16, uniforms=uniforms,
                                  pixel_values=pixel_values, suppress_ids=suppress_ids)
                except _Unsupported as exc:  # sharded since the verdict (FSDP shards in place): hf from now on
                    _fall_back(model, str(exc))
            return _hf_generate(model, prompt_ids, prompt_mask, bos_token_id=bos_token_id, bf16=bf16,
                                pixel_values=pixel_values, suppress_ids=suppress_ids, **picks)
    finally:
        model.train(was_training)


# the fast sampler's verdict per model (None = it can run it): `unsupported_reason` walks every layer, once is enough
_verdicts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend_for(model, backend: str | None) -> str:
    """The backend that samples `model`: RLHF_SAMPLING_BACKEND when set, else `backend` (None = DEFAULT_BACKEND);
    "hf" where fast cannot run it."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown sampling backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    override = backend_override()
    if override and backend and override != backend:
        warn_once(f"RLHF_SAMPLING_BACKEND={override}: sampling with the {override} backend, not the configured {backend}")
    backend = override or backend or DEFAULT_BACKEND
    if backend == "fast":
        if model not in _verdicts:
            _verdicts[model] = unsupported_reason(model)
        if _verdicts[model] is not None:
            _fall_back(model, _verdicts[model])
            backend = "hf"
    return backend


def _fall_back(model, reason: str) -> None:
    _verdicts[model] = reason
    warn_once(f"fast sampling does not support this model ({reason}); using Hugging Face's generate")


def _hf_generate(model, prompt_ids, prompt_mask, *, n, max_new_tokens, eos_token_id, pad_token_id, bos_token_id,
                 greedy, temperature, top_k, top_p, bf16, pixel_values=None,
                 suppress_ids: Sequence[int] = ()) -> tuple[torch.Tensor, SampleStats]:
    from transformers import GenerationConfig

    if bf16:
        warn_once("bf16 sampling needs the fast sampling backend; sampling in the model's own dtype")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_p=top_p if not greedy else None,
        top_k=top_k if not greedy else None,  # 0 disables top-k (transformers' default would be 50)
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        suppress_tokens=list(suppress_ids) or None,
    )
    ids, mask = prompt_ids.repeat_interleave(n, dim=0), prompt_mask.repeat_interleave(n, dim=0)
    start = time.perf_counter()
    images = {} if pixel_values is None else {"pixel_values": pixel_values.repeat_interleave(n, dim=0)}
    out = model.generate(input_ids=ids, attention_mask=mask.long(), generation_config=config, **images)
    response = out[:, ids.size(1):]
    return response, SampleStats(backend="hf", decode=time.perf_counter() - start, steps=response.size(1))
