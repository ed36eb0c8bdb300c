"""Images in prompts: a record's images (TRL's `images` column), how a vision-language model takes them (placeholder
tokens and pixel values), and a LLaVA-style model built from a saved vision tower and a causal LM.

A prompt marks where its image goes with `IMAGE_TOKEN`, as LLaVA's processor expects; before tokenizing, each
placeholder becomes the `tokens_per_image` tokens the vision tower's patch features replace inside the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf.errors import UserError

IMAGE_TOKEN = "<image>"
IMAGE_FIELDS = ("images", "image")  # TRL's column, and the single-image spelling some datasets use


# ---------------------------------------------------------------------------------------------------------------
# A record's images


def has_images(record: dict) -> bool:
    return any(record.get(name) not in (None, []) for name in IMAGE_FIELDS)


def _record_dir(record) -> Path:
    """The directory a record's relative image paths start from: its file's (origin "path:line" or "path[i]")."""
    origin = getattr(record, "origin", "")
    path = origin.rsplit(":", 1)[0] if ":" in origin else origin.split("[", 1)[0]
    return Path(path).parent if path else Path(".")


@lru_cache(maxsize=16384)
def _open(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def record_images(record) -> list:
    """A record's images as RGB PIL images: `images` (a list) or `image` (one), each a file path (relative to the
    record's file) or a PIL image. A missing or unreadable file is a `UserError` naming the record and field."""
    from PIL import Image, UnidentifiedImageError

    name = next((n for n in IMAGE_FIELDS if record.get(n) not in (None, [])), None)
    if name is None:
        return []
    items = record[name] if isinstance(record[name], list) else [record[name]]
    images = []
    for i, item in enumerate(items):
        where = f"{getattr(record, 'origin', '?')}: field '{name}'" + (f" item {i}" if isinstance(record[name], list) else "")
        if isinstance(item, Image.Image):
            images.append(item.convert("RGB"))
            continue
        if isinstance(item, dict) and isinstance(item.get("path"), str):  # datasets' Image feature, undecoded
            item = item["path"]
        if not isinstance(item, str) or not item:
            raise UserError(f"{where}: expected an image file path, got {type(item).__name__}")
        path = Path(item).expanduser()
        path = path if path.is_absolute() else _record_dir(record) / path
        if not path.is_file():
            raise UserError(f"{where}: image file not found: {path}")
        try:
            images.append(_open(str(path.resolve())))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UserError(f"{where}: {path} is not a readable image ({type(exc).__name__})") from None
    return images


def image_paths(record) -> list[str]:
    """A record's image files as absolute paths (relative ones resolved against its file's directory, as
    `record_images` reads them), for writing the record's images into another file. In-memory images have no path:
    an error naming the record."""
    name = next((n for n in IMAGE_FIELDS if record.get(n) not in (None, [])), None)
    if name is None:
        return []
    items = record[name] if isinstance(record[name], list) else [record[name]]
    out = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            item = item["path"]
        if not isinstance(item, str) or not item:
            raise UserError(f"{getattr(record, 'origin', '?')}: field '{name}': an image without a file path cannot "
                            "be written out")
        path = Path(item).expanduser()
        out.append(str((path if path.is_absolute() else _record_dir(record) / path).resolve()))
    return out


def message_text(content: Any) -> str:
    """A chat message's content as text: TRL's typed parts ({"type": "text", "text": ...}, {"type": "image"}) joined,
    each image part as `IMAGE_TOKEN`; plain strings unchanged."""
    if not isinstance(content, list):
        return content if isinstance(content, str) else str(content)
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image":
            parts.append(IMAGE_TOKEN)
        elif isinstance(part, dict):
            parts.append(str(part.get("text", "")))
        else:
            parts.append(str(part))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# How a model takes images


@dataclass
class ImageInputs:
    """A vision-language model's image interface: its image processor and the placeholder tokens per image."""

    processor: Any  # a transformers image processor (resize, rescale, normalize)
    tokens_per_image: int
    token: str = IMAGE_TOKEN

    @classmethod
    def of(cls, model, processor) -> "ImageInputs":
        """From a LLaVA-style model's config: (image_size / patch_size)² patch features per image, plus the [CLS]
        token when the projector keeps it (vision_feature_select_strategy "full")."""
        config = getattr(model, "config", model)
        vision = config.vision_config
        side = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        patches = (side // vision.patch_size) ** 2
        return cls(processor, patches + (config.vision_feature_select_strategy == "full"))

    def expand(self, text: str) -> str:
        """`text` with every placeholder repeated `tokens_per_image` times (what LLaVA's processor does)."""
        return text.replace(self.token, self.token * self.tokens_per_image)

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        """Pixel values of PIL images. Shape: (N, C, H, W)."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]


def check_image_prompts(records: Sequence, image_inputs: ImageInputs | None, model_name: str,
                        prompt_of=None) -> None:
    """Every record fits the model: a text-only model takes no images, a vision-language model takes exactly one
    image per prompt, and the prompt's `IMAGE_TOKEN` placeholders match its images. Opens every image (a missing or
    unreadable one is an error now, not mid-run). `prompt_of(record)` gives the prompt text (default `prompt`)."""
    for record in records:
        origin = getattr(record, "origin", "?")
        images = record_images(record)
        if image_inputs is None:
            if images:
                raise UserError(f"{origin}: field 'images': the model {model_name} is text-only (no vision tower); "
                                "use a vision-language model or drop the images")
            continue
        if not images:
            raise UserError(f"{origin}: field 'images' is missing: the model {model_name} is a vision-language model "
                            "and this stage takes one image with every prompt")
        if len(images) != 1:
            raise UserError(f"{origin}: field 'images' holds {len(images)} images; one image per prompt is supported")
        text = prompt_of(record) if prompt_of is not None else record.get("prompt")
        if isinstance(text, list):
            text = "".join(message_text(m.get("content")) for m in text if isinstance(m, dict))
        found = str(text).count(image_inputs.token)
        if found != len(images):
            raise UserError(f"{origin}: field 'prompt' has {found} '{image_inputs.token}' placeholders for "
                            f"{len(images)} image; put one where the image goes")


# ---------------------------------------------------------------------------------------------------------------
# Vision-language models


def is_vision_model_dir(path: str | Path) -> bool:
    """Whether a local model directory holds a vision-language model (its config has a vision_config)."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return "vision_config" in json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return False


def load_image_processor(path: str | Path):
    """The image processor saved with a model: on its own (preprocessor_config.json, e.g. a ViT) or inside a
    processor (processor_config.json, as `save_processor` writes it)."""
    from transformers import AutoImageProcessor, AutoProcessor

    directory = Path(path).expanduser()
    if (directory / "processor_config.json").is_file():
        return AutoProcessor.from_pretrained(str(directory)).image_processor
    if not (directory / "preprocessor_config.json").is_file():
        raise UserError(f"{path}: no image processor (preprocessor_config.json) next to the model")
    return AutoImageProcessor.from_pretrained(str(directory))


def build_vision_language_model(lm, tokenizer, tower_path: str, seed: int = 0):
    """A `LlavaForConditionalGeneration` of the vision tower saved at `tower_path` (a ViT or CLIP vision model), a
    fresh two-layer projector and the causal LM `lm`, whose weights it takes over; `IMAGE_TOKEN` is added to
    `tokenizer`. Returns (model, image processor).

    The projector reads the tower's last layer whole: [CLS] (the ViT's image representation, what its classifier
    read) and every patch feature (LLaVA's "full" strategy). It is the one randomly initialised part, so a first
    SFT stage has to train it."""
    from transformers import AutoConfig, AutoModel, LlavaConfig, LlavaForConditionalGeneration

    from rlhf.policy import loading

    tower_dir = Path(tower_path).expanduser()
    if not (tower_dir / "config.json").is_file():
        raise UserError(f"config key 'model.vision_tower': {tower_path} is not a model directory (no config.json)")
    with loading(tower_path, "vision tower"):
        vision_config = AutoConfig.from_pretrained(str(tower_dir))
        vision_config = getattr(vision_config, "vision_config", vision_config)  # a whole CLIP: its vision half
        if vision_config.model_type not in ("vit", "clip_vision_model", "siglip_vision_model"):
            raise UserError(f"config key 'model.vision_tower': {tower_path} is a {vision_config.model_type} model, "
                            "not a ViT / CLIP / SigLIP vision tower")
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a classifier's head is meant to be left out of the tower
        try:
            tower = AutoModel.from_pretrained(str(tower_dir), config=vision_config)
        finally:
            hf_logging.set_verbosity(level)
    processor = load_image_processor(tower_dir)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    config = LlavaConfig(vision_config=vision_config, text_config=lm.config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                         vision_feature_select_strategy="full", projector_hidden_act="gelu",
                         tie_word_embeddings=lm.config.tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(lm.dtype)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = lm.generation_config
    return model, processor


def save_processor(path: str | Path, tokenizer, image_inputs: ImageInputs, model) -> None:
    """Write a `LlavaProcessor` (tokenizer + image processor), so `AutoProcessor.from_pretrained(path)` works."""
    from transformers import LlavaProcessor

    config = getattr(model, "config", model)
    LlavaProcessor(image_processor=image_inputs.processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
                   num_additional_image_tokens=1, vision_feature_select_strategy=config.vision_feature_select_strategy,
                   image_token=image_inputs.token).save_pretrained(str(path))


def images_for(records: Sequence, image_inputs: ImageInputs | None) -> list | None:
    """Each record's image, for a vision-language model's `generate(images=...)`; None for a text-only model."""
    if image_inputs is None:
        return None
    return [record_images(r)[0] for r in records]
