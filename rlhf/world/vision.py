"""The vision part of the demo world: small rendered images, classification sets and image-conditioned tasks.

Everything is drawn with Pillow primitives (no font files), so the same seed writes byte-identical PNGs everywhere:

- digits as seven-segment glyphs (varied position, size, slant, stroke width and a dark colour);
- four products of the review world (:data:`PRODUCTS`) as simple icons (a mug with a handle, a lamp, an
  umbrella, a tent) in one of a few review-world colours (:data:`COLORS`);

each on a random light background with per-pixel Gaussian noise, ``IMAGE_SIZE`` pixels square, RGB.

Two image-conditioned policy tasks, selected by the text demo's action tokens, whose facts are only in the image
(the prompt text is the same for every row of a task, so a text-only policy cannot beat one constant answer):

    image_add:     prompt "<add> <image>="   image "4+7"           completion " 11"
    image_review:  prompt "<review> <image>" image a red mug icon  completion " the mug is great . i love the rim ."

Their gold scores are the text tasks' own judges (:func:`gold_score`). Files (``python -m rlhf.world.generate_data
--vision --out DIR``; every image path is relative to the directory of the jsonl file that names it):

    digits_train.jsonl / digits_test.jsonl      {"image", "label", "label_name"}          10 classes, ViT pre-training
    products_train.jsonl / products_test.jsonl  {"image", "label", "label_name", "meta"}  4 classes, fine-tuning
    sft.jsonl            {"prompt", "completion", "images", "task", "meta"}  demonstrations of both tasks
    rl_prompts.jsonl     {"prompt", "images", "task", "meta"}                RL prompts
    eval_prompts.jsonl   {"prompt", "images", "task", "meta"}                held-out evaluation prompts

``images`` is a list of paths (TRL's vision dataset format; ``<image>`` in the prompt marks where it goes).
Held-out design: the image_add eval prompts use operand pairs (in either order) that appear in no SFT or RL row,
one pair per sum so the sums stay spread; every image anywhere is a fresh render.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rlhf.world import arithmetic, reviews

IMAGE_SIZE = 64
OPERAND_DIGITS = 1  # image_add's operands are 0 .. 10**OPERAND_DIGITS - 1 (2 renders "47+38" just as well)
IMAGE_TOKEN = "<image>"
TASKS: tuple[str, ...] = ("image_add", "image_review")
ADD_PROMPT = f"{arithmetic.ACTION} {IMAGE_TOKEN}="
REVIEW_PROMPT = f"{reviews.ACTION} {IMAGE_TOKEN}"

# Four review-world products with icons that differ in outline, not only in detail.
PRODUCTS: tuple[str, ...] = ("mug", "lamp", "umbrella", "tent")
# Review-world colours that stay visible on a light background (no white, beige, silver or golden).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 35), "blue": (35, 65, 200), "green": (30, 135, 55),
    "orange": (225, 115, 20), "purple": (120, 45, 160), "black": (25, 25, 25),
}
NOISE_STD = 8.0  # per-pixel Gaussian noise (0-255 scale): visible, but far below the ink/background contrast
FILES = ("digits_train.jsonl", "digits_test.jsonl", "products_train.jsonl", "products_test.jsonl",
         "sft.jsonl", "rl_prompts.jsonl", "eval_prompts.jsonl")

# Which segments (a top, b upper right, c lower right, d bottom, e lower left, f upper left, g middle) each digit lights.
SEGMENTS = {0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg",
            9: "abcdfg"}
_PLUS_WIDTH, _GAP = 0.8, 0.3  # the "+" glyph's width and the space between glyphs, in digit widths


@dataclass(frozen=True)
class Sizes:
    """Row counts of each file (``*_per_task``: rows of each of the two policy tasks in that file)."""

    digits_train: int = 3000
    digits_test: int = 500
    products_train: int = 1200
    products_test: int = 300
    sft_per_task: int = 1500
    rl_per_task: int = 256
    eval_per_task: int = 100
    operand_digits: int = OPERAND_DIGITS


# For tests: the same files in miniature (~270 images, about a second).
SMALL = Sizes(digits_train=60, digits_test=20, products_train=40, products_test=20, sft_per_task=30, rl_per_task=16,
              eval_per_task=20)


# ------------------------------------------------------------------------------------------------- rendering


def image_rng(seed: int, name: str, index: int) -> np.random.Generator:
    """The generator of one image: a function of (seed, set name, index) only, so resizing one set, or rendering
    in another order, leaves every other image unchanged."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), index])


def _canvas(rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int]]:
    background = tuple(int(v) for v in rng.integers(170, 246, size=3))
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background), background


def _finish(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    # luminance noise (one draw per pixel, all channels): grain like a camera's, and PNGs 40% smaller than with
    # independent channel noise
    pixels = np.asarray(image, dtype=np.float32) + NOISE_STD * rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _ink(rng: np.random.Generator) -> tuple[int, int, int]:
    """A dark colour: at least ~70 levels below any background channel."""
    return tuple(int(v) for v in rng.integers(0, 101, size=3))


def _glyph(draw: ImageDraw.ImageDraw, char: str, x: float, y: float, w: float, h: float, t: float, slant: float,
           ink: tuple[int, int, int]) -> None:
    """One seven-segment digit, or "+", in the box (x, y, w, h) with stroke ``t``; ``slant`` shears it (x shifts
    by ``slant`` per pixel above the baseline, like italics)."""
    if char == "+":
        cy = h / 2
        rects = [(0, cy - t / 2, w, cy + t / 2), (w / 2 - t / 2, cy - w / 2, w / 2 + t / 2, cy + w / 2)]
    else:
        mid0, mid1 = (h - t) / 2, (h + t) / 2
        box = {"a": (0, 0, w, t), "b": (w - t, 0, w, mid1), "c": (w - t, mid0, w, h), "d": (0, h - t, w, h),
               "e": (0, mid0, t, h), "f": (0, 0, t, mid1), "g": (0, mid0, w, mid1)}
        rects = [box[s] for s in SEGMENTS[int(char)]]
    for x0, y0, x1, y1 in rects:
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        draw.polygon([(x + px + slant * (h - py), y + py) for px, py in corners], fill=ink)


def render_text(rng: np.random.Generator, text: str) -> Image.Image:
    """``text`` (digits and "+") on one line in seven-segment glyphs, as large as ``rng`` picks within what fits.

    A single digit gets 22-48 px of height; "4+7" up to ~34 px; "47+38" ~14-19 px (still 2 px strokes).
    """
    if not text or any(c not in "+0123456789" for c in text):
        raise ValueError(f"render_text draws digits and '+' only, got {text!r}")
    image, _ = _canvas(rng)
    draw = ImageDraw.Draw(image)
    ratio = rng.uniform(0.48, 0.6)  # digit width / height
    slant = rng.uniform(-0.12, 0.12)
    units = sum(_PLUS_WIDTH if c == "+" else 1.0 for c in text) + _GAP * (len(text) - 1)  # line width / digit width
    margin = 3
    h_max = min(48.0, IMAGE_SIZE - 2 * margin, (IMAGE_SIZE - 2 * margin) / (ratio * units + abs(slant)))
    h = rng.uniform(min(22.0, 0.7 * h_max), h_max)
    w = ratio * h
    t = max(2.0, h * rng.uniform(0.12, 0.2))
    line = w * units + abs(slant) * h
    x = rng.uniform(margin, IMAGE_SIZE - margin - line) + max(0.0, -slant) * h
    y = rng.uniform(margin, IMAGE_SIZE - margin - h)
    ink = _ink(rng)
    for c in text:
        width = w * _PLUS_WIDTH if c == "+" else w
        _glyph(draw, c, x, y, width, h, t, slant, ink)
        x += width + _GAP * w
    return _finish(rng, image)


def render_digit(rng: np.random.Generator, digit: int) -> Image.Image:
    """One digit 0-9 as a seven-segment glyph."""
    return render_text(rng, str(int(digit)))


def render_sum(rng: np.random.Generator, a: int, b: int, digits: int = OPERAND_DIGITS) -> Image.Image:
    """``a+b`` with zero-padded operands, as the text demo writes them ("07+38")."""
    arithmetic.question(a, b, "direct", digits)  # raises on operands that do not fit
    return render_text(rng, f"{a:0{digits}d}+{b:0{digits}d}")


def _icon(draw: ImageDraw.ImageDraw, product: str, x: float, y: float, sx: float, sy: float, t: float,
          fill: tuple[int, int, int], background: tuple[int, int, int]) -> None:
    """The product's icon in the box (x, y, sx, sy); shapes are given in unit coordinates of that box."""

    def p(u: float, v: float) -> tuple[float, float]:
        return x + u * sx, y + v * sy

    def box(u0: float, v0: float, u1: float, v1: float) -> list[tuple[float, float]]:
        return [p(u0, v0), p(u1, v1)]

    width = max(2, round(t))
    if product == "mug":  # a body with a ring handle on the right
        draw.ellipse(box(0.5, 0.32, 0.95, 0.78), outline=fill, width=width)
        draw.rectangle(box(0.08, 0.18, 0.68, 0.95), fill=fill)
    elif product == "lamp":  # a trapezoid shade on a pole on a flat base
        draw.polygon([p(0.3, 0.04), p(0.7, 0.04), p(0.95, 0.46), p(0.05, 0.46)], fill=fill)
        draw.rectangle(box(0.5 - t / sx / 2, 0.46, 0.5 + t / sx / 2, 0.9), fill=fill)
        draw.rectangle(box(0.2, 0.86, 0.8, 0.97), fill=fill)
    elif product == "umbrella":  # a half-disc canopy, a shaft and a hooked handle
        draw.pieslice(box(0.0, 0.04, 1.0, 0.84), 180, 360, fill=fill)
        draw.rectangle(box(0.5 - t / sx / 2, 0.43, 0.5 + t / sx / 2, 0.84), fill=fill)
        draw.arc(box(0.26, 0.7, 0.5 + t / sx / 2, 0.98), 0, 180, fill=fill, width=width)
    elif product == "tent":  # a triangle with a door cut out of it
        draw.polygon([p(0.5, 0.06), p(1.0, 0.94), p(0.0, 0.94)], fill=fill)
        draw.polygon([p(0.5, 0.42), p(0.66, 0.94), p(0.34, 0.94)], fill=background)
    else:
        raise ValueError(f"no icon for product {product!r}; expected one of {PRODUCTS}")


def render_product(rng: np.random.Generator, product: str, color: str) -> Image.Image:
    """The product's icon in ``color`` (a key of :data:`COLORS`, jittered a little), 28-56 px, anywhere inside."""
    if color not in COLORS:
        raise ValueError(f"unknown icon colour {color!r}; expected one of {tuple(COLORS)}")
    image, background = _canvas(rng)
    draw = ImageDraw.Draw(image)
    size = rng.uniform(28, 56)
    sx, sy = (min(IMAGE_SIZE - 4.0, size * rng.uniform(0.85, 1.1)) for _ in range(2))  # a little squashed
    x, y = rng.uniform(2, IMAGE_SIZE - 2 - sx), rng.uniform(2, IMAGE_SIZE - 2 - sy)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], rng.integers(-15, 16, size=3)))
    _icon(draw, product, x, y, sx, sy, max(2.0, size * rng.uniform(0.08, 0.12)), fill, background)
    return _finish(rng, image)


# -------------------------------------------------------------------------------------------------- scoring


def gold_score(task: str, prompt: str, completion: str, meta: dict | None) -> float:
    """The hidden gold score: image_add is the text addition check on ``meta`` (a, b; the direct format: the
    first integer in the completion), image_review the review rubric for ``meta["product"]``.

    The facts are in the image, so they come from ``meta``; without them the prompt text is tried (a text prompt
    of the same task), and failing that image_add scores 0.0 and image_review scores as a review of no product.
    Never raises on any completion string; raises ValueError for a task that is not an image task.
    """
    meta = meta or {}
    if task == "image_add":
        if "a" not in meta or "b" not in meta:
            try:
                meta = arithmetic.parse_prompt(prompt)
            except ValueError:
                return 0.0
        return arithmetic.gold_score(prompt, completion, {**meta, "format": "direct"})
    if task == "image_review":
        product = meta.get("product")
        if product is None:
            try:
                product = reviews.parse_prompt(prompt)["product"]
            except ValueError:
                product = ""
        return reviews.gold_score(product, completion)
    raise ValueError(f"unknown image task {task!r}; expected one of {TASKS}")


# ----------------------------------------------------------------------------------------------------- data


def split_pairs(rng: random.Random, digits: int, n_eval: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(held-out unordered pairs, train ordered pairs). One pair is held out from each of up to ``n_eval`` sums
    that have two or more pairs, so every sum still occurs in training and the held-out sums are spread (no
    constant answer is right on many eval rows); a held-out pair is unseen in both orders."""
    n = 10**digits
    by_sum: dict[int, list[tuple[int, int]]] = {}
    for a in range(n):
        for b in range(a, n):
            by_sum.setdefault(a + b, []).append((a, b))
    sums = [s for s, pairs in sorted(by_sum.items()) if len(pairs) >= 2]
    rng.shuffle(sums)
    held = sorted(rng.choice(by_sum[s]) for s in sums[:n_eval])
    held_set = set(held)
    train = [(a, b) for a in range(n) for b in range(n) if (min(a, b), max(a, b)) not in held_set]
    return held, train


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


class _Writer:
    """Renders and saves the images of one set under ``out/images/<set>/``; returns paths relative to ``out``."""

    def __init__(self, out: Path, seed: int, name: str):
        self.out, self.seed, self.name = out, seed, name
        (out / "images" / name).mkdir(parents=True, exist_ok=True)

    def save(self, index: int, render, *args, stem: str = "") -> str:
        relative = f"images/{self.name}/{stem}{index:06d}.png"
        # compress_level 1: noisy pixels barely compress, and on them Pillow's default level 6 is slower and no smaller
        render(image_rng(self.seed, f"{self.name}/{stem}", index), *args).save(self.out / relative, compress_level=1)
        return relative


def _balanced(rng: random.Random, n: int, k: int) -> list[int]:
    """``n`` labels of ``k`` classes, as equal in count as ``n`` allows, shuffled."""
    labels = [i % k for i in range(n)]
    rng.shuffle(labels)
    return labels


def _add_row(image: str, a: int, b: int, digits: int, completion: bool) -> dict:
    row = {"prompt": ADD_PROMPT}
    if completion:  # the text demo's direct format: the sum zero-padded to digits + 1
        row["completion"] = arithmetic.completion(a, b, "direct", digits=digits)
    return {**row, "images": [image], "task": "image_add", "meta": {"a": a, "b": b, "answer": a + b}}


def _review_row(image: str, product: str, color: str, completion: str | None) -> dict:
    row = {"prompt": REVIEW_PROMPT}
    if completion is not None:
        row["completion"] = completion
    return {**row, "images": [image], "task": "image_review", "meta": reviews.meta(product, color)}


def _policy_rows(r: random.Random, writer: _Writer, pairs: list[tuple[int, int]], n: int, digits: int,
                 demos: bool) -> list[dict]:
    """``n`` rows of each task, shuffled; image_add cycles through ``pairs`` in a shuffled order (either order of
    each pair), image_review draws products evenly and colours at random."""
    specs = [("add", pairs[i % len(pairs)]) for i in range(n)] + [("review", p) for p in _balanced(r, n, len(PRODUCTS))]
    r.shuffle(specs)
    rows = []
    for i, (kind, spec) in enumerate(specs):
        if kind == "add":
            a, b = spec if r.random() < 0.5 else spec[::-1]
            rows.append(_add_row(writer.save(i, render_sum, a, b, digits), a, b, digits, demos))
        else:
            product, color = PRODUCTS[spec], r.choice(tuple(COLORS))
            text = reviews.write_review(r, product, reviews.DEMO) if demos else None
            rows.append(_review_row(writer.save(i, render_product, product, color), product, color, text))
    return rows


def generate(out: str | Path, seed: int = 0, small: bool = False, sizes: Sizes | None = None) -> dict[str, int]:
    """Render every image and write every file of :data:`FILES` under ``out`` (created if needed); returns the
    row count of each jsonl file. ``sizes`` overrides the default (or ``small``) sizes. Prints nothing."""
    sizes = sizes or (SMALL if small else Sizes())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # One RNG per file for the choices, one generator per image for its rendering (`image_rng`).
    rngs = {name: random.Random(f"{seed}/vision/{name}") for name in ("split", *FILES)}
    files: dict[str, list[dict]] = {}

    for split, n in (("train", sizes.digits_train), ("test", sizes.digits_test)):
        name, writer = f"digits_{split}.jsonl", _Writer(out, seed, "digits")
        files[name] = [{"image": writer.save(i, render_digit, label, stem=f"{split}_"), "label": label,
                        "label_name": str(label)} for i, label in enumerate(_balanced(rngs[name], n, 10))]

    for split, n in (("train", sizes.products_train), ("test", sizes.products_test)):
        name, writer, r = f"products_{split}.jsonl", _Writer(out, seed, "products"), rngs[f"products_{split}.jsonl"]
        rows = []
        for i, label in enumerate(_balanced(r, n, len(PRODUCTS))):
            product, color = PRODUCTS[label], r.choice(tuple(COLORS))
            rows.append({"image": writer.save(i, render_product, product, color, stem=f"{split}_"), "label": label,
                         "label_name": product, "meta": reviews.meta(product, color)})
        files[name] = rows

    held, train_pairs = split_pairs(rngs["split"], sizes.operand_digits, sizes.eval_per_task)
    for name, set_name, pairs, n, demos in (
        ("sft.jsonl", "sft", train_pairs, sizes.sft_per_task, True),
        ("rl_prompts.jsonl", "rl", train_pairs, sizes.rl_per_task, False),
        ("eval_prompts.jsonl", "eval", held, sizes.eval_per_task, False),
    ):
        r = rngs[name]
        pairs = list(pairs)
        r.shuffle(pairs)
        files[name] = _policy_rows(r, _Writer(out, seed, set_name), pairs, n, sizes.operand_digits, demos)

    for name in FILES:
        _write_jsonl(out / name, files[name])
    return {name: len(files[name]) for name in FILES}
