"""PolicyModel: the one policy/reference wrapper every stage uses (SFT now; PPO, GRPO, DPO later).

It owns a Hugging Face causal LM (optionally with peft LoRA adapters), its tokenizer, an optional scalar value
head, and the frozen reference policy: with LoRA the same weights with adapters disabled (no second copy),
otherwise a frozen copy made at load time (or loaded from `ref_path`).
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from rlhf.config import LoraSettings, ModelSettings
from rlhf.data import encode_prompt
from rlhf.distributed import is_fsdp
from rlhf.errors import UserError
from rlhf.ops import entropy_from_logits, logprobs_from_logits, response_mask_from_ids
from rlhf.types import ForwardOut, Rollout
from rlhf.vision import ImageInputs, build_vision_language_model, is_vision_model_dir, load_image_processor

VALUE_HEAD_FILE = "value_head.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def check_model_dir(name: str) -> None:
    """A local model directory must hold a config.json and weights, or be a LoRA adapter whose base exists; say what
    it holds instead (a tokenizer only, weights without config.json...). Hub ids and missing paths pass through."""
    path = Path(name).expanduser()
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"model path {name} is a file, not a model directory")
    files = sorted(p.name for p in path.iterdir())
    if "adapter_config.json" in files:
        if not any(f in files for f in ADAPTER_FILES):
            raise UserError(f"{name}: a LoRA adapter directory without adapter weights ({ADAPTER_FILES[0]})")
        try:
            base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        except ValueError as exc:
            raise UserError(f"{path / 'adapter_config.json'}: not valid JSON ({exc})") from None
        if isinstance(base, str) and _looks_local(base) and not Path(base).expanduser().exists():
            raise UserError(f"{name}: the LoRA adapter's base model '{base}' is not found (a relative base path is "
                            "read from the working directory)")
        return
    held = ", ".join(files[:6]) + (", ..." if len(files) > 6 else "") if files else "nothing"
    if "config.json" not in files:
        what = "only a tokenizer" if files and all(f.startswith(("tokenizer", "special_tokens", "chat_template", "vocab",
                                                                      "merges")) for f in files) else held
        raise UserError(f"{name}: not a model directory: no config.json (it holds {what})")
    if not any(f in files for f in WEIGHT_FILES):
        raise UserError(f"{name}: no model weights ({WEIGHT_FILES[0]}) next to its config.json (it holds {held})")


@contextmanager
def loading(name: str, what: str = "model"):
    """Turn a Hugging Face loader's failure on `name` (a corrupt or truncated weights file, a bad config, a hub id
    that does not resolve) into one `UserError` line."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if not Path(name).expanduser().exists():
            raise UserError(f"{what} path not found: {name} (no such local path; as a hub id: {first})") from exc
        raise UserError(f"could not load a {what} from '{name}' ({type(exc).__name__}: {first})") from exc


def _local_or_hub(name: str) -> str:
    """An existing local path made absolute (so what records it, e.g. a LoRA adapter's base, loads from anywhere);
    a hub id unchanged."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


# special tokens that can serve as padding, best first (`<|endoftext|>` is SmolLM2's and Qwen's document separator)
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|fim_pad|>", "<|endoftext|>")


def choose_pad_token(tok) -> None:
    """Give `tok` a pad token distinct from EOS: keep its own, else reuse a special token it already has (a
    pad-named one, then its unknown token), and only when it has none add `<pad>` (which grows the vocabulary).

    pad == EOS would make "stopped" and "padding" indistinguishable in response masks. Padding is always masked out,
    so any special token that is not EOS or BOS serves."""
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return
    taken = {tok.eos_token, tok.bos_token}
    vocab = tok.get_vocab()
    for token in (*PAD_CANDIDATES, tok.unk_token):
        if token and token in vocab and token not in taken:
            tok.pad_token = token
            return
    tok.add_special_tokens({"pad_token": "<pad>"})


def load_tokenizer(name: str):
    """AutoTokenizer with a pad token distinct from EOS (`choose_pad_token`)."""
    from transformers import AutoTokenizer

    if _looks_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"tokenizer path not found: {name}")
    with loading(name, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(_local_or_hub(name))
    choose_pad_token(tok)
    return tok


def load_causal_lm(name: str, dtype: str = "float32"):
    """AutoModelForCausalLM from a local directory or hub id; a LoRA adapter directory is merged into its base."""
    from transformers import AutoModelForCausalLM

    path = Path(name).expanduser()
    if _looks_local(name) and not path.exists():
        raise UserError(f"model path not found: {name}")
    check_model_dir(name)
    torch_dtype = getattr(torch, dtype)
    with loading(name, "causal LM"):
        if (path / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM, PeftModel

            base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
            if isinstance(base, str) and is_vision_model_dir(base):  # peft's auto class knows only causal LMs
                model = load_causal_lm(base, dtype)
                return PeftModel.from_pretrained(model, str(path.resolve())).merge_and_unload()
            return AutoPeftModelForCausalLM.from_pretrained(str(path.resolve()), dtype=torch_dtype).merge_and_unload()
        if is_vision_model_dir(name):
            from transformers import AutoModelForImageTextToText

            return AutoModelForImageTextToText.from_pretrained(_local_or_hub(name), dtype=torch_dtype)
        return AutoModelForCausalLM.from_pretrained(_local_or_hub(name), dtype=torch_dtype)


def load_image_inputs(name: str, model) -> ImageInputs | None:
    """The image interface of a vision-language model saved at `name` (None for a text-only model); a LoRA
    adapter directory reads its base's image processor when it has none of its own."""
    if "vision_config" not in model.config.to_dict():
        return None
    path = Path(name).expanduser()
    has_own = any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))
    if not has_own and (path / "adapter_config.json").is_file():
        path = Path(json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"])
    return ImageInputs.of(model, load_image_processor(path))


def add_special_tokens(model, tokenizer, tokens: Sequence[str]) -> list[int]:
    """Add `tokens` as special tokens and grow the embeddings. Returns the ids of the tokens that were new.

    New rows start at the mean embedding (Hewitt 2021), so the model's output distribution barely moves.
    """
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    # also covers a pad token that load_tokenizer added
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.convert_tokens_to_ids(new)


def check_lora_targets(model, target_modules: list[str] | str) -> None:
    """Every LoRA target must name Linear modules the model has (peft matches a name by its last dotted parts; a
    string other than 'all-linear' is a regex over full names). Raises a `UserError` listing the ones it has."""
    import re

    if target_modules == "all-linear":
        return
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if isinstance(target_modules, str):
        missing = [] if any(re.fullmatch(target_modules, n) for n in names) else [target_modules]
    else:
        missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not target_modules:
        raise UserError(f"config key 'model.lora.target_modules': the model has no Linear module named "
                        f"{', '.join(repr(t) for t in missing) or '(an empty list)'}; it has {', '.join(leaves)} "
                        "(or use 'all-linear')")


def apply_lora(model, lora: LoraSettings, trainable_token_ids: list[int]):
    """Wrap `model` with LoRA adapters; new special tokens get trainable embedding rows (peft trainable tokens)."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, lora.target_modules)
    extra = {"trainable_token_indices": {"embed_tokens": trainable_token_ids}} if trainable_token_ids else {}
    if "vision_config" in model.config.to_dict():  # a VLM's projector trains whole: LoRA of a fresh layer is no use
        extra["modules_to_save"] = ["multi_modal_projector"]
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM", **extra,
    )
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities at real vocabulary sizes


def _output_head(model) -> nn.Module | None:
    """The LM head to project hidden states with outside the model's forward, or None where that is unsafe: under
    FSDP or DeepSpeed ZeRO-3 its weights are only gathered inside the wrapper's forward."""
    inner = getattr(model, "module", model)  # DDP keeps the model as .module
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or any("FullyShardedDataParallel" in type(m).__name__ or type(m).__name__.startswith("FSDP")
                           for m in (model, inner, head)):
        return None
    if any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in head.parameters()):
        return None
    return head


def logits_are_large(model, targets: torch.Tensor, limit: int | None = None) -> bool:
    """Whether the logits of `targets` (B, T) would exceed `limit` elements (default `rlhf.ops.LOGIT_CHUNK_ELEMENTS`)."""
    from rlhf import ops

    config = getattr(model, "module", model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_config, "vocab_size", None) or 0
    return targets.numel() * vocab > (ops.LOGIT_CHUNK_ELEMENTS if limit is None else limit)


def next_token_logprobs(model, inputs: dict, targets: torch.Tensor, temperature: float = 1.0,
                        with_entropy: bool = False, with_hidden: bool = False,
                        chunk_elements: int | None = None):
    """log p(targets) (and entropy) of the last T + 1 positions' next-token predictions, targets (B, T) being the
    last T tokens of `inputs`. Returns (logprobs (B, T), entropy (B, T) or None, the model output).

    When the (B, T, V) logits would be large (over `rlhf.ops.LOGIT_CHUNK_ELEMENTS`), the model projects only one
    position and the head is applied here a chunk of positions at a time (`rlhf.ops.projected_logprobs`), so no
    full logits tensor exists in forward or backward. Small ones take the model's own logits (the same numbers).
    """
    from rlhf import ops

    limit = ops.LOGIT_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    t = targets.size(1)
    head = _output_head(model) if logits_are_large(model, targets, limit) else None
    if head is None:
        out = model(**inputs, logits_to_keep=t + 1, output_hidden_states=with_hidden, use_cache=False)
        logits = out.logits[:, :-1]
        entropy = entropy_from_logits(logits, temperature) if with_entropy else None
        return logprobs_from_logits(logits, targets, temperature), entropy, out
    out = model(**inputs, logits_to_keep=1, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1][:, -t - 1:-1]
    logprobs, entropy = ops.projected_logprobs(hidden, head, targets, temperature, with_entropy, limit)
    return logprobs, entropy, out


def sequence_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token NLL of every position, (B, L) -> (B, L-1) as `rlhf.losses.token_nll`, with large logits taken a
    chunk of positions at a time (`next_token_logprobs`). `pixel_values` (B, C, H, W): each row's image, for a
    vision-language model."""
    from rlhf.losses import token_nll

    inputs = {"input_ids": input_ids, "attention_mask": attention_mask.long()}
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
    if not logits_are_large(model, input_ids[:, 1:]):
        return token_nll(model(**inputs, use_cache=False).logits, input_ids)
    return -next_token_logprobs(model, inputs, input_ids[:, 1:])[0]


# ---------------------------------------------------------------------------------------------------------------


class PolicyModel:
    """A causal LM policy with its tokenizer, reference policy and optional value head.

    Args:
        model: a Hugging Face causal LM (or a peft model wrapping one).
        tokenizer: its tokenizer; pad must differ from EOS.
        ref_model: frozen reference weights when `model` has no LoRA adapters (None = no reference kept).
        value_head: optional `nn.Linear(hidden, 1)` on the trunk's last hidden state.
        image_inputs: how a vision-language model takes images (`rlhf.vision.ImageInputs`); None = text-only.
    """

    def __init__(self, model, tokenizer, ref_model=None, value_head: nn.Module | None = None,
                 image_inputs: ImageInputs | None = None):
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("PolicyModel needs a pad token distinct from EOS")
        self.model = model
        self.tokenizer = tokenizer
        self.ref_model = ref_model
        self.value_head = value_head
        self.image_inputs = image_inputs
        self._whole: dict | None = None  # FSDP: unsharded copies of the trained modules (`keep_whole_weights`)

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        settings: ModelSettings,
        *,
        add_tokens: Sequence[str] = (),
        with_reference: bool = False,
        seed: int = 0,
        device: str | torch.device | None = None,
        build: Callable | None = None,
    ) -> "PolicyModel":
        """Build the policy a config describes. `with_reference` keeps a frozen copy (free under LoRA). `build`
        makes the model from the tokenizer when `settings.scratch_size` asks for a new one (the demo world's
        `rlhf.world.scratch_builder`): the engine builds no model of its own.

        `device` defaults to accelerate's device for this process (the local GPU under `accelerate launch`).
        """
        if settings.path and not settings.scratch_size:
            if _looks_local(settings.path) and not Path(settings.path).expanduser().exists():
                raise UserError(f"model path not found: {settings.path}")
            check_model_dir(settings.path)  # before the tokenizer: a tokenizer-only directory is not a model
        tok_name = settings.tokenizer or settings.path
        if tok_name is None:
            raise UserError("config key 'model.path' (or 'model.tokenizer') is required")
        tokenizer = load_tokenizer(tok_name)
        if settings.scratch_size:
            if build is None:
                raise UserError("config key 'model.scratch_size' builds a new model, which only the pretrain and sft "
                                "stages do: set model.path to a trained model instead")
            model = build(tokenizer, seed).to(getattr(torch, settings.dtype))
        elif settings.path:
            model = load_causal_lm(settings.path, settings.dtype)
        else:
            raise UserError("config key 'model.path' is required (or 'model.scratch_size' to build a demo model)")
        image_inputs = load_image_inputs(settings.path, model) if not settings.scratch_size else None
        if settings.vision_tower:
            if image_inputs is not None:
                raise UserError(f"config key 'model.vision_tower': {settings.path} is already a vision-language model; "
                                "drop model.vision_tower")
            model, processor = build_vision_language_model(model, tokenizer, settings.vision_tower, seed)
            image_inputs = ImageInputs.of(model, processor)
        if image_inputs is not None and settings.freeze_vision_tower:
            model.model.vision_tower.requires_grad_(False)
        new_ids = add_special_tokens(model, tokenizer, add_tokens)

        ref_model = None
        if with_reference and settings.lora is None:
            ref_model = load_causal_lm(settings.ref_path, settings.dtype) if settings.ref_path else copy.deepcopy(model)
            add_special_tokens(ref_model, tokenizer, add_tokens)
            ref_model.requires_grad_(False).eval()
        if settings.lora is not None:
            model = apply_lora(model, settings.lora, new_ids)

        value_head = None
        if settings.value_head:
            value_head = nn.Linear(model.config.get_text_config().hidden_size, 1)
            head_file = Path(settings.path or "") / VALUE_HEAD_FILE
            if settings.path and head_file.is_file():
                from safetensors.torch import load_file

                value_head.load_state_dict(load_file(str(head_file)))
            else:
                nn.init.zeros_(value_head.weight)  # V = b at start: no random noise in early advantages
                nn.init.zeros_(value_head.bias)
        if device is None:
            from rlhf.distributed import process_state

            device = process_state().device
        return cls(model, tokenizer, ref_model=ref_model, value_head=value_head, image_inputs=image_inputs).to(device)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "PolicyModel":
        """Shortcut: `PolicyModel.load(ModelSettings(path=path, **kwargs))`."""
        return cls.load(ModelSettings(path=str(path), **kwargs))

    # -- properties ---------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config")

    def modules(self) -> list[nn.Module]:
        """The trainable modules (model, value head): what an optimizer and accelerate.prepare receive."""
        return [self.model] + ([self.value_head] if self.value_head is not None else [])

    def keep_whole_weights(self, accelerator) -> None:
        """Call before `accelerator.prepare`: under FSDP, keep unsharded copies of the trained modules that
        `unwrapped` fills from the shards (sampling and saving read whole weights). A no-op otherwise."""
        from rlhf.distributed import WholeWeights

        self._whole = {"model": WholeWeights(accelerator, self.model),
                       "head": WholeWeights(accelerator, self.value_head) if self.value_head is not None else None}

    def unwrapped(self, accelerator) -> "PolicyModel":
        """This policy with accelerate's wrappers (DDP / FSDP / DeepSpeed) taken off its trainable modules.

        The one way to get a bare view back after `accelerator.prepare(policy.model, ...)` (and of the value head):
        the view keeps the tokenizer, the reference and the value head, so it can `generate` (a DDP wrapper has no
        `generate`), compute reference log-probs and `save`. It shares the weights, except under FSDP, where it is
        the whole-weight copies (`keep_whole_weights`) refreshed from the shards: every process must call it then.
        """
        whole = self._whole or {}
        if whole.get("model") is not None:
            model = whole["model"].get(self.model)
            head = whole["head"].get(self.value_head) if whole.get("head") is not None else None
        else:
            if is_fsdp(accelerator):
                raise RuntimeError("PolicyModel.unwrapped under sharded parameters needs keep_whole_weights() before "
                                   "accelerator.prepare")
            model = accelerator.unwrap_model(self.model)
            head = accelerator.unwrap_model(self.value_head) if self.value_head is not None else None
        return PolicyModel(model, self.tokenizer, ref_model=self.ref_model, value_head=head, image_inputs=self.image_inputs)

    def to(self, device) -> "PolicyModel":
        for m in self.modules() + ([self.ref_model] if self.ref_model is not None else []):
            m.to(device)
        return self

    # -- reference ----------------------------------------------------------------------------------------------

    @contextmanager
    def reference(self) -> Iterator["PolicyModel"]:
        """The frozen reference policy, as a PolicyModel, for the duration of the block (no grad).

        With LoRA this is the same module with adapters disabled, so no second copy of the weights exists. It runs in
        eval mode either way (no dropout): the reference is a fixed function, whatever mode training left it in.
        """
        if self.is_lora:
            # peft re-enables the adapters through `set_adapter`, which freezes every adapter but the active one:
            # restore the flags so that a second trainable adapter (`add_adapter`, e.g. a critic) stays trainable
            flags = [(p, p.requires_grad) for p in self.model.parameters()]
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad(), self.model.disable_adapter():
                    yield PolicyModel(self.model, self.tokenizer, image_inputs=self.image_inputs)
            finally:
                self.model.train(was_training)
                for p, flag in flags:
                    p.requires_grad_(flag)
        elif self.ref_model is not None:
            with torch.no_grad():
                yield PolicyModel(self.ref_model, self.tokenizer, image_inputs=self.image_inputs)
        else:
            raise RuntimeError("this policy keeps no reference: load it with with_reference=True or LoRA")

    # -- sampling -----------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask, (B, P): left padding keeps every prompt's last token adjacent to the
        first generated one. A vision-language model's image placeholders are expanded to its image tokens."""
        if self.image_inputs is not None:
            prompts = [self.image_inputs.expand(p) for p in prompts]
        bos = self.tokenizer.bos_token
        if bos and any(p.startswith(bos) for p in prompts):  # chat-templated prompts may carry BOS already
            encoded = [encode_prompt(p, self.tokenizer) for p in prompts]
        else:
            encoded = self.tokenizer(list(prompts)).input_ids  # one batched call
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], dtype=torch.long)
        mask = torch.tensor([[False] * (width - len(e)) + [True] * len(e) for e in encoded], dtype=torch.bool)
        return ids, mask

    @property
    def never_sampled(self) -> list[int]:
        """Token ids sampling must not produce: a vision-language model's image placeholder (in a response it would
        claim image features that do not exist)."""
        return [self.model.config.image_token_id] if self.image_inputs is not None else []

    def pixel_values(self, images: Sequence | None) -> torch.Tensor | None:
        """Each prompt's image as pixel values on this policy's device (a vision-language model needs them; a
        text-only one takes none). `images`: one PIL image (or a one-image list) per prompt. Shape: (B, C, H, W)."""
        if self.image_inputs is None:
            if images:
                raise ValueError("this text-only policy takes no images")
            return None
        if images is None:
            raise ValueError("this vision-language policy needs an image with every prompt")
        flat = [im[0] if isinstance(im, (list, tuple)) else im for im in images]
        return self.image_inputs.pixel_values(flat).to(self.device, next(self.model.parameters()).dtype)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        greedy: bool = False,
        seed: int | None = None,
        backend: str | None = None,
        bf16: bool = False,
        first_prompt: int = 0,
        images: Sequence | None = None,
    ) -> Rollout:
        """Sample `n` responses per prompt (stopping at EOS) and return them as a `Rollout`.

        `images`: a vision-language policy's image for each prompt (PIL images, `rlhf.vision.record_images`).

        Rows are grouped by prompt. With `seed` the sampling is reproducible and the global RNG is left untouched;
        on the fast backend each prompt then draws from its own stream, seeded by `seed` and its position
        `first_prompt` + i in a larger batch (e.g. the step's prompts over all processes), so its samples do not
        depend on how that batch was split (`rlhf.generation.prompt_uniforms`). Hugging Face's `generate` draws
        from one stream for the whole call.
        `backend`: "fast" (`rlhf.generation`: each prompt prefilled once for its n samples, a fixed-shape KV-cache
        decode loop) or "hf" (`model.generate`); None = `rlhf.generation.default_backend()`. A model the fast sampler
        does not support falls back to "hf" with one warning. `bf16` (fast only): weights and KV cache in bfloat16.
        `rlhf.generation.generate` does the sampling and also returns the call's statistics.
        """
        from rlhf import generation

        pixel_values = self.pixel_values(images)
        ids, mask = self.encode_prompts(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        tok = self.tokenizer
        response, _ = generation.generate(
            self.model, ids, mask, n=n, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, greedy=greedy, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, first_prompt=first_prompt, backend=backend, bf16=bf16,
            pixel_values=pixel_values, suppress_ids=self.never_sampled,
        )
        return self.rollout_from_ids(ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0), response,
                                     prompts, n, pixel_values)

    def rollout_from_ids(self, prompt_ids, prompt_mask, response_ids, prompts: Sequence[str], n: int = 1,
                         pixel_values: torch.Tensor | None = None) -> Rollout:
        """Mask, measure and decode raw generated ids (B, T) into a Rollout; `pixel_values` (one image per prompt)
        are repeated for its n rows."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        response_mask = response_mask_from_ids(response_ids, eos)
        response_ids = response_ids.masked_fill(~response_mask, pad)
        ended = ((response_ids == eos) & response_mask).any(-1)
        lengths = response_mask.sum(-1)
        # text = the counting tokens minus the final EOS; one .tolist() for the batch, then plain list slicing
        text_lengths = (lengths - ended.long()).tolist()
        text_ids = [row[:n] for row, n in zip(response_ids.tolist(), text_lengths)]
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            ended=ended,
            lengths=lengths,
            prompt_index=torch.arange(len(prompts), device=response_ids.device).repeat_interleave(n),
            prompts=[p for p in prompts for _ in range(n)],
            completions=self.tokenizer.batch_decode(text_ids, skip_special_tokens=False),
            pixel_values=pixel_values.repeat_interleave(n, dim=0) if pixel_values is not None else None,
        )

    # -- scoring ------------------------------------------------------------------------------------------------

    def forward(
        self,
        rollout: Rollout,
        temperature: float = 1.0,
        with_entropy: bool = False,
        with_values: bool = False,
    ) -> ForwardOut:
        """Per-token log-probabilities (and entropy / values) of `rollout`'s response tokens. Shapes: (B, T).

        Only the T + 1 positions that predict response tokens are projected to the vocabulary
        (`logits_to_keep`), so no (B, P + T, V) tensor is built. Position ids follow the attention mask, so
        left padding does not change the result. Values are read at the same positions: the value of the state
        before each response token.
        """
        t = rollout.response_ids.size(1)
        logprobs, entropy, out = next_token_logprobs(self.model, rollout.model_inputs(), rollout.response_ids,
                                                     temperature, with_entropy, with_hidden=with_values)
        result = ForwardOut(logprobs=logprobs, entropy=entropy)
        if with_values:
            if self.value_head is None:
                raise RuntimeError("this policy has no value head: load it with model.value_head=true")
            hidden = out.hidden_states[-1][:, -t - 1:-1]
            result.values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return result

    def logprobs(self, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
        """Shorthand for `forward(rollout, temperature).logprobs`. Shape: (B, T)."""
        return self.forward(rollout, temperature).logprobs

    # -- a second adapter on the same frozen base (e.g. a PPO critic) -------------------------------------------

    def add_adapter(self, name: str, lora: LoraSettings) -> None:
        """Add a second LoRA adapter `name` on this LoRA policy's frozen base, trainable but not active: `forward`
        and `generate` keep using the policy's own adapter; `using_adapter(name)` switches for a block. One base then
        serves the policy, the reference (adapters off) and a critic."""
        if not self.is_lora:
            raise RuntimeError("a second adapter needs a LoRA policy (model.lora)")
        from peft import LoraConfig

        self.model.add_adapter(name, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        for param_name, param in self.model.named_parameters():
            if f".{name}." in param_name:  # peft adds it frozen (only the active adapter trains)
                param.requires_grad_(True)

    @contextmanager
    def using_adapter(self, name: str) -> Iterator["PolicyModel"]:
        """This model with adapter `name` active instead of the policy's, for the block (gradients flow as usual).

        Sets each LoRA layer's active adapter directly rather than through peft's `set_adapter`, which would also
        freeze the other adapter's weights: a graph recorded while they were frozen gives them no gradient."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        saved = [m._active_adapter for m in layers]
        for m in layers:
            m._active_adapter = [name]
        try:
            yield self
        finally:
            for m, active in zip(layers, saved):
                m._active_adapter = active

    # -- saving -------------------------------------------------------------------------------------------------

    def save(self, path: str | Path, merged: bool = False, state_dict: dict | None = None) -> None:
        """Write Hugging Face files: the adapter (LoRA, default) or the full / merged model, plus the tokenizer
        and the value head. `state_dict`: the model's weights gathered from sharded processes (FSDP / ZeRO-3)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self.model
        if self.is_lora and merged:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(str(path), **({"state_dict": state_dict} if state_dict is not None else {}))
        if self.is_lora and not merged:
            _absolute_adapter_base(path / "adapter_config.json")
        self.tokenizer.save_pretrained(str(path))
        if self.image_inputs is not None:
            from rlhf.vision import save_processor

            save_processor(path, self.tokenizer, self.image_inputs, model)
        if self.value_head is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()}, str(path / VALUE_HEAD_FILE))
        (path / "policy.json").write_text(json.dumps({"lora": self.is_lora and not merged}, indent=2))


def _absolute_adapter_base(config_file: Path) -> None:
    """Record a LoRA adapter's base model as an absolute path when it is a local directory, so the adapter loads
    from any working directory (peft writes the path the base was loaded from, often a relative one)."""
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and base and not Path(base).is_absolute() and Path(base).expanduser().exists():
        config["base_model_name_or_path"] = str(Path(base).expanduser().resolve())
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
