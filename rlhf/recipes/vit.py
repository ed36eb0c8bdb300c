"""Vision Transformer image classification (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"): the image cut
into patches, each linearly embedded, a learned [CLS] token prepended, position embeddings added, a Transformer
encoder, and a linear head on the final [CLS] state (eq. 1-4). Built with transformers' own `ViTConfig` /
`ViTForImageClassification`, so the saved directory is a plain Hugging Face ViT (`ViTModel.from_pretrained` reads its
trunk, `AutoImageProcessor.from_pretrained` its preprocessing).

Two uses, one recipe: pre-training from scratch (`model.path: null`, a `model.size` from `VIT_SIZES`), and the
paper's downstream fine-tuning (§3.2) from a saved ViT: the pre-trained head is removed and a zero-initialised D × K
head for the new label set attached (kept when the label set is the same), and at a new resolution the pre-trained
position embeddings are 2D-interpolated on the patch grid.

Data: JSONL rows `{"image": "images/x.png", "label": 3, "label_name": "3"}`, image paths relative to the file's
directory (or a PIL image, as a `datasets` Image column gives). All images are decoded once, resized by the
`ViTImageProcessor`, and held as one uint8 tensor; rescale and normalize happen per batch, exactly as the processor does.

Steps: 1 accelerator and seed → 2 labels → 3 model and image processor (built or loaded) → 4 images → 5 optimizer →
6 resume → 7 train loop (log / eval / checkpoint) → 8 final eval (accuracy with a Wilson 95% CI) and save.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from rlhf.config import OptimSettings, Section, StageConfig, TrainSettings
from rlhf.data import Record, load_records
from rlhf.distributed import (
    check_engine, make_accelerator, map_over_processes, reduce_metrics, sharded_parameters, sync_unless_last,
)
from rlhf.errors import UserError
from rlhf.policy import check_model_dir, loading
from rlhf.stage import StageContext, write_into
from rlhf.training import (
    end_of_step, make_optimizer, make_scheduler, micro_batch_indices, optimizer_step, progress_axes, resume_state,
)
from rlhf.tracking import progress

# ViTConfig kwargs per size. base / large / huge are the paper's Table 1 (86M / 307M / 632M parameters) at their
# standard 224-pixel resolution with 16-pixel patches (huge: 14); nano / tiny are for 64-pixel images on a CPU.
VIT_SIZES: dict[str, dict] = {
    # ~0.03M: unit tests
    "nano": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 image_size=64, patch_size=8),
    # ~0.3M: the demo world's digits and products in about a minute each on 2 CPU cores (wide and shallow: at a
    # minute's compute two layers of 128 learned the digits better than four, or than 64 / 96 / 192 wide);
    # configs/vit uses 16 px patches (17 tokens: cheaper a step, and what the vision-language policy reads)
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 image_size=64, patch_size=8),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 image_size=224, patch_size=16),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  image_size=224, patch_size=16),
    "huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                 image_size=224, patch_size=14),
}
CI_LEVEL = 0.95


class VitModelSettings(Section):
    """The ViT: built from `size` (from scratch) or loaded from `path` (fine-tuning)."""

    path: str | None = Field(None, description="a saved ViT directory (or hub id) to fine-tune; null = build one from scratch")
    size: Literal["nano", "tiny", "base", "large", "huge"] = Field(
        "tiny", description="from scratch: the architecture (VIT_SIZES); ignored when fine-tuning `path`")
    image_size: int | None = Field(None, ge=8, description="input resolution in pixels; null = the size's default (from "
                                   "scratch) or the loaded model's (fine-tuning; another value interpolates its position embeddings)")
    patch_size: int | None = Field(None, ge=1, description="patch side in pixels; null = the size's default (fine-tuning: must "
                                   "be the loaded model's)")


class VitData(Section):
    """Labelled images: train and test JSONL files (or saved datasets) with an image and an integer label per row."""

    train: str = Field("runs/world/digits_train.jsonl", description="training images (file, saved dataset dir or hub id); "
                       "the demo world's: `rlhf world --vision --out runs/world`")
    test: str | None = Field("runs/world/digits_test.jsonl", description="held-out images for accuracy; null = no evaluation")
    image_field: str = Field("image", description="the field holding each image: a path relative to the file's directory")
    label_field: str = Field("label", description="the field holding each integer class label (0 .. num_labels-1)")
    label_name_field: str = Field("label_name", description="the field naming each label (absent = the label's number)")
    num_labels: int | None = Field(None, ge=1, description="classes; null = the largest training label + 1")
    eval_batch_size: int = Field(256, ge=1, description="images per evaluation forward pass")


class AugmentSettings(Section):
    """Training-time augmentation (none by default): seeded by the step, so a resumed run sees the same images."""

    random_shift: int = Field(0, ge=0, description="translate each image by up to this many pixels (edges replicated)")
    hflip: bool = Field(False, description="flip half the images left-right (not for digits or text)")


class Config(StageConfig):
    """`rlhf vit`: train a Vision Transformer image classifier ([CLS] head), from scratch or fine-tuned from a saved ViT."""

    model: VitModelSettings = Field(default_factory=VitModelSettings, description="the ViT to train")
    data: VitData = Field(default_factory=VitData, description="labelled train and test images")
    augment: AugmentSettings = Field(default_factory=AugmentSettings, description="training-time augmentation")
    train: TrainSettings = Field(default_factory=TrainSettings, description="loop length, batch (images) and cadence")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="AdamW and lr schedule")


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    # 1. accelerator and seed (the seed also fixes a from-scratch model's initial weights) ----------------------
    accelerator = make_accelerator(cfg.train, cfg.seed)
    check_engine(accelerator, micro_batches=cfg.train.grad_accum)

    # 2. labels of both files, checked before any image is decoded ---------------------------------------------
    train_records = load_records(cfg.data.train)
    test_records = load_records(cfg.data.test) if cfg.data.test is not None else []
    train_labels = [read_label(r, cfg.data.label_field) for r in train_records]
    test_labels = [read_label(r, cfg.data.label_field) for r in test_records]
    num_labels = cfg.data.num_labels or max(train_labels) + 1
    why = "data.num_labels" if cfg.data.num_labels else f"the largest label in {cfg.data.train} + 1"
    for records, labels in ((train_records, train_labels), (test_records, test_labels)):
        for record, label in zip(records, labels):
            if label >= num_labels:
                raise UserError(f"{record.origin}: field '{cfg.data.label_field}' is {label}, outside 0..{num_labels - 1} "
                                f"({num_labels} classes: {why})")
    id2label = label_names(train_records + test_records, train_labels + test_labels, num_labels, cfg.data)

    # 3. model and image processor ------------------------------------------------------------------------------
    if cfg.model.path is None:
        model = build_vit(cfg.model, id2label, cfg.seed)
        processor = make_processor(model.config.image_size)
        what = f"ViT-{cfg.model.size} from scratch"
    else:
        model, processor, new_head = load_vit(cfg.model, id2label, cfg.seed)
        what = f"ViT from {cfg.model.path} ({'new zero-initialised head' if new_head else 'same label set: head kept'})"
    vit = model.config
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_image = (vit.image_size // vit.patch_size) ** 2 + 1  # patches + [CLS]
    print(f"{ctx.name}: {what}, {n_params / 1e6:.2f}M parameters, {vit.image_size}px images in {vit.patch_size}px "
          f"patches ({tokens_per_image} tokens), {num_labels} classes")

    # 4. images: decoded and resized once into uint8 tensors ------------------------------------------------------
    train_pixels = load_images(train_records, cfg.data.image_field, processor, cfg.data.train)
    test_pixels = load_images(test_records, cfg.data.image_field, processor, cfg.data.test) if test_records else None
    train_y, test_y = torch.tensor(train_labels), torch.tensor(test_labels, dtype=torch.long)
    print(f"{ctx.name}: {len(train_y)} training images, {len(test_y)} test images")

    # 5. optimizer and schedule, prepared by accelerate -----------------------------------------------------------
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # 6. resume: weights, optimizer, scheduler and RNG; the data order and augmentation are functions of the step --
    start, counters, timer = resume_state(accelerator, ctx)

    def batch_for(micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = micro_batch_indices(len(train_y), cfg.train.batch_size, micro_index, cfg.seed,
                                  accelerator.process_index, accelerator.num_processes)
        rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + micro_index * accelerator.num_processes
                                            + accelerator.process_index)
        pixels = augment(train_pixels[idx], cfg.augment, rng)
        return normalize(pixels, processor).to(accelerator.device), train_y[idx].to(accelerator.device)

    def evaluate() -> dict[str, float]:
        if test_pixels is None:
            return {}
        model.eval()
        metrics = evaluate_images(model, test_pixels, test_y, processor, id2label, cfg.data.eval_batch_size, accelerator)
        model.train()
        return metrics

    # 7. train loop ---------------------------------------------------------------------------------------------
    model.train()
    metrics: dict[str, float] = {}
    images_per_step = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    for step in progress(range(start, cfg.train.max_steps), total=cfg.train.max_steps, initial=start, desc=ctx.name):
        loss_sum, correct = 0.0, 0
        for m in range(cfg.train.grad_accum):
            pixels, labels = batch_for(step * cfg.train.grad_accum + m)
            with accelerator.autocast(), sync_unless_last(accelerator, model, m, cfg.train.grad_accum):
                logits = model(pixel_values=pixels).logits
                # equal micro-batches: each one's mean over grad_accum is its share of the step's mean
                loss = classification_loss(logits, labels)
                accelerator.backward(loss / cfg.train.grad_accum)
            loss_sum += loss.item() / cfg.train.grad_accum
            correct += int((logits.argmax(-1) == labels).sum())
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.optim.max_grad_norm, loss=loss_sum)

        counters["samples"] += images_per_step
        counters["tokens"] += images_per_step * tokens_per_image
        end_of_step(ctx, accelerator, cfg.train, step + 1, counters, timer, tokens=images_per_step * tokens_per_image,
                    evaluate=evaluate, metrics={
                        "loss/total": loss_sum, "train/accuracy": correct / (cfg.train.batch_size * cfg.train.grad_accum),
                        "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm})
        metrics["loss/total"] = loss_sum

    # 8. final evaluation, then the model and its image processor in Hugging Face format --------------------------
    metrics = {**reduce_metrics(accelerator, metrics), **evaluate()}
    ctx.tracker.log({**metrics, **progress_axes(counters, timer)}, step=cfg.train.max_steps)
    if "eval/accuracy" in metrics:
        print(f"{ctx.name}: test accuracy {metrics['eval/accuracy']:.3f} (Wilson 95% CI "
              f"{metrics['eval/accuracy_ci_low']:.3f}-{metrics['eval/accuracy_ci_high']:.3f}, {len(test_y)} images)")
    state_dict = accelerator.get_state_dict(model) if sharded_parameters(accelerator) else None
    if accelerator.is_main_process:
        bare = accelerator.unwrap_model(model)
        write_into(ctx.dir, lambda tmp: save_vit(bare, processor, tmp, state_dict))
    accelerator.wait_for_everyone()
    return metrics


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (B, K) logits against (B,) class indices."""
    return F.cross_entropy(logits.float(), labels)


# ---------------------------------------------------------------------------------------------------------------
# Labels


def read_label(record: Record, field: str) -> int:
    """The record's integer label (≥ 0); anything else is a `UserError` naming the record's file:line and the field."""
    if field not in record or record[field] is None:
        raise UserError(f"{record.origin}: missing field '{field}' (the integer class label)")
    value = record[field]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{record.origin}: field '{field}' must be an integer class label, got {value!r:.40}")
    if value < 0:
        raise UserError(f"{record.origin}: field '{field}' is {value}: class labels count from 0")
    return value


def label_names(records: list[Record], labels: list[int], num_labels: int, data: VitData) -> dict[int, str]:
    """id2label: each label's name from `data.label_name_field` (the same name wherever the label appears, and no
    name for two labels), or its number when no row names it."""
    names: dict[int, tuple[str, str]] = {}  # label -> (name, where it was first given)
    for record, label in zip(records, labels):
        name = record.get(data.label_name_field)
        if name is None:
            continue
        if not isinstance(name, (str, int)) or isinstance(name, bool):
            raise UserError(f"{record.origin}: field '{data.label_name_field}' must be a string, got {type(name).__name__}")
        name = str(name)
        if label in names and names[label][0] != name:
            raise UserError(f"{record.origin}: field '{data.label_name_field}' is {name!r} for label {label}, which "
                            f"{names[label][1]} names {names[label][0]!r}")
        names.setdefault(label, (name, record.origin))
    id2label = {i: names[i][0] if i in names else str(i) for i in range(num_labels)}
    seen: dict[str, int] = {}
    for i, name in id2label.items():
        if name in seen:
            raise UserError(f"{names.get(i, ('', data.train))[1]}: labels {seen[name]} and {i} are both named {name!r} "
                            f"(field '{data.label_name_field}')")
        seen[name] = i
    return id2label


def wilson_interval(successes: int, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Agresti & Coull 1998 recommend it over the
    normal approximation, which leaves [0, 1] and collapses at 0 or n successes):

        centre = (p + z²/2n) / (1 + z²/n),   half-width = z·sqrt(p(1−p)/n + z²/4n²) / (1 + z²/n),   p = successes / n

    e.g. 8 of 10 at 95% (z = 1.96): [0.490, 0.943]. With n = 0 nothing is known: [0, 1]."""
    if n == 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exactly 0 / 1 at 0 / n successes (where centre ∓ half-width is 0 / 1 up to rounding)
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


# ---------------------------------------------------------------------------------------------------------------
# Model and image processor


def vit_config(size: str, id2label: dict[int, str], image_size: int | None = None, patch_size: int | None = None):
    """A `ViTConfig` of `VIT_SIZES[size]` for the label set `id2label` (resolution and patch overridable)."""
    from transformers import ViTConfig

    kwargs = dict(VIT_SIZES[size])
    kwargs["image_size"] = image_size or kwargs["image_size"]
    kwargs["patch_size"] = patch_size or kwargs["patch_size"]
    if kwargs["image_size"] % kwargs["patch_size"]:
        raise UserError(f"model.image_size {kwargs['image_size']} is not a multiple of model.patch_size "
                        f"{kwargs['patch_size']}: the patches must tile the image")
    return ViTConfig(**kwargs, id2label=dict(id2label), label2id={v: k for k, v in id2label.items()})


def build_vit(settings: VitModelSettings, id2label: dict[int, str], seed: int):
    """A randomly initialised `ViTForImageClassification` (the global RNG is left as it was)."""
    from transformers import ViTForImageClassification

    config = vit_config(settings.size, id2label, settings.image_size, settings.patch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTForImageClassification(config)


def load_vit(settings: VitModelSettings, id2label: dict[int, str], seed: int):
    """(model, image processor, new_head) for fine-tuning the saved ViT at `settings.path` on `id2label`.

    A `ViTForImageClassification` directory or a bare `ViTModel` one (whose head is then new) both load. Unless the
    checkpoint was trained on the same label set, its head is replaced by a zero-initialised one (ViT §3.2); at a
    new `image_size` its position embeddings are interpolated to the new patch grid.
    """
    from transformers import AutoConfig, ViTForImageClassification

    path = settings.path
    check_model_dir(path)
    with loading(path, "ViT"):
        config = AutoConfig.from_pretrained(path)
    if config.model_type != "vit":
        raise UserError(f"model.path {path}: a '{config.model_type}' model, not a ViT (config.json model_type 'vit')")
    if settings.patch_size is not None and settings.patch_size != config.patch_size:
        raise UserError(f"model.patch_size {settings.patch_size}: the model at {path} has {config.patch_size}px patches "
                        "(its patch embedding cannot change); leave model.patch_size null")
    image_size = settings.image_size or config.image_size
    if image_size % config.patch_size:
        raise UserError(f"model.image_size {image_size} is not a multiple of the model's {config.patch_size}px patches")
    with loading(path, "ViT"):
        loaded = _quietly(ViTForImageClassification.from_pretrained, path)
    old_labels = {int(k): v for k, v in loaded.config.id2label.items()}
    has_head = "ViTForImageClassification" in (config.architectures or [])
    new_head = not has_head or old_labels != id2label
    if not new_head and image_size == config.image_size:
        return loaded, _loaded_processor(path, image_size), False

    new_config = loaded.config.__class__.from_dict(
        {**loaded.config.to_dict(), "image_size": image_size, "id2label": dict(id2label),
         "label2id": {v: k for k, v in id2label.items()}})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(new_config)
    state = loaded.state_dict()
    key = "vit.embeddings.position_embeddings"
    if image_size != config.image_size:
        state[key] = resize_position_embeddings(state[key], image_size // config.patch_size)
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise UserError(f"model.path {path}: its weights do not fit a ViT of its own config (missing "
                        f"{[k for k in missing if not k.startswith('classifier.')][:3]}, unexpected {unexpected[:3]})")
    if new_head:
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
    return model, _loaded_processor(path, image_size), new_head


def resize_position_embeddings(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g², D) position embeddings -> (1, 1 + grid², D): the [CLS] one kept, the patch ones bicubically
    interpolated as a g × g image with D channels (ViT §3.2, "2D interpolation ... according to their location")."""
    cls, patches = pos[:, :1], pos[:, 1:]
    old = math.isqrt(patches.shape[1])
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)


def make_processor(image_size: int, like=None):
    """A `ViTImageProcessor` (the PIL backend: no torchvision needed) resizing to `image_size`², rescaling to [0, 1]
    and normalizing with mean = std = 0.5 (to [-1, 1], as Google's ViT checkpoints), or with `like`'s settings."""
    from transformers import ViTImageProcessorPil

    kwargs = {}
    if like is not None:
        kwargs = {k: getattr(like, k) for k in ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                                                 "resample")}
    else:
        kwargs = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return ViTImageProcessorPil(do_resize=True, size={"height": image_size, "width": image_size}, **kwargs)


def _loaded_processor(path: str, image_size: int):
    """The saved model's image processor (its normalization is what the trunk learned on) at `image_size`; the
    default ViT one when the directory has none."""
    from transformers import AutoImageProcessor

    local = Path(path).expanduser()
    if local.is_dir() and not (local / "preprocessor_config.json").is_file():
        return make_processor(image_size)
    try:
        saved = _quietly(AutoImageProcessor.from_pretrained, path)
    except OSError:  # a hub model without a preprocessor config
        return make_processor(image_size)
    return make_processor(image_size, like=saved)


def save_vit(model, processor, directory: Path, state_dict: dict | None = None) -> None:
    """Hugging Face files: config.json + model.safetensors (`ViTForImageClassification`; `ViTModel` loads the trunk)
    and preprocessor_config.json (`AutoImageProcessor`)."""
    model.save_pretrained(str(directory), **({"state_dict": state_dict} if state_dict is not None else {}))
    processor.save_pretrained(str(directory))


def _quietly(fn, *args, **kwargs):
    """A HF loader without its load report: a new head is *meant* to be missing from a backbone."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------------------
# Images


def image_root(source: str) -> Path:
    """Where relative image paths start: the data file's directory (a saved dataset: the directory itself)."""
    path = Path(source).expanduser()
    return path.parent if path.is_file() else path if path.is_dir() else Path(".")


def open_image(record: Record, field: str, root: Path):
    """The record's image as an RGB PIL image: a path (relative to `root`) or a PIL image. A missing file, a file that
    is not an image, or one Pillow cannot decode is a `UserError` naming the record's file:line and the field."""
    from PIL import Image, UnidentifiedImageError

    if field not in record or record[field] is None:
        raise UserError(f"{record.origin}: missing field '{field}' (an image file path)")
    value = record[field]
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and isinstance(value.get("path"), str):  # a `datasets` Image column, undecoded
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise UserError(f"{record.origin}: field '{field}' must be an image file path, got {value!r:.40}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise UserError(f"{record.origin}: field '{field}': image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise UserError(f"{record.origin}: field '{field}': {path} is not an image file Pillow can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # truncated, corrupt, or absurdly large
        raise UserError(f"{record.origin}: field '{field}': {path} cannot be decoded ({str(exc)[:120]})") from None


def load_images(records: list[Record], field: str, processor, source: str, chunk: int = 256) -> torch.Tensor:
    """Every record's image, resized by `processor` (rescale and normalize left to `normalize`), as (N, 3, H, W)
    uint8."""
    root = image_root(source)
    parts = []
    for start in range(0, len(records), chunk):
        images = [open_image(r, field, root) for r in records[start:start + chunk]]
        pixels = processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
        parts.append(pixels if pixels.dtype == torch.uint8 else pixels.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(parts)


def normalize(pixels: torch.Tensor, processor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float pixel values, rescaled and normalized as `processor(images)` does."""
    x = pixels.float()
    if processor.do_rescale:
        x = x * processor.rescale_factor
    if processor.do_normalize:
        mean = torch.tensor(processor.image_mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def augment(pixels: torch.Tensor, settings: AugmentSettings, rng: torch.Generator) -> torch.Tensor:
    """Random left-right flips and translations of a (B, 3, H, W) uint8 batch, drawn from `rng`."""
    if settings.hflip:
        flip = torch.rand(len(pixels), generator=rng) < 0.5
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    k = settings.random_shift
    if k:
        h, w = pixels.shape[-2:]
        padded = F.pad(pixels.float(), (k, k, k, k), mode="replicate")
        offsets = torch.randint(0, 2 * k + 1, (len(pixels), 2), generator=rng).tolist()
        pixels = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)]).to(torch.uint8)
    return pixels


@dataclass
class _EvalPart:
    correct: list[bool]
    labels: list[int]
    loss_sum: float


@torch.no_grad()
def evaluate_images(model, pixels: torch.Tensor, labels: torch.Tensor, processor, id2label: dict[int, str],
                    batch_size: int, accelerator=None) -> dict[str, float]:
    """`eval/loss` (mean cross-entropy), `eval/accuracy` with its Wilson 95% interval (`eval/accuracy_ci_low` /
    `_high`), `eval/accuracy/<label name>` per class, and `eval/examples`. With an `accelerator` of several
    processes every process must call this: each scores its share of the batches."""
    device = accelerator.device if accelerator is not None else torch.device("cpu")

    def score(start: int) -> _EvalPart:
        y = labels[start:start + batch_size].to(device)
        logits = model(pixel_values=normalize(pixels[start:start + batch_size], processor).to(device)).logits.float()
        loss = F.cross_entropy(logits, y, reduction="sum").item()
        return _EvalPart((logits.argmax(-1) == y).tolist(), y.tolist(), loss)

    parts = map_over_processes(score, range(0, len(labels), batch_size), accelerator)
    correct = [c for p in parts for c in p.correct]
    truth = [y for p in parts for y in p.labels]
    n, k = len(correct), sum(correct)
    low, high = wilson_interval(k, n)
    metrics = {"eval/loss": sum(p.loss_sum for p in parts) / n, "eval/accuracy": k / n,
               "eval/accuracy_ci_low": low, "eval/accuracy_ci_high": high, "eval/examples": float(n)}
    for label, name in id2label.items():
        hits = [c for c, y in zip(correct, truth) if y == label]
        if hits:
            metrics[f"eval/accuracy/{name}"] = sum(hits) / len(hits)
    return metrics
