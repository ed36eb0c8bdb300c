"""The vision world: deterministic renders, file schemas, held-out operand pairs, gold scorers, image-only facts,
the CLI and the `world` stage."""

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from rlhf.world import TASKS, gold_score, gold_task_records, reviews, vision
from rlhf.world.vision import FILES, IMAGE_SIZE, Sizes, generate

ROOT = Path(__file__).resolve().parents[2]
# only the held-out eval set at its default size: the same rows and images as the default generation's (every
# file has its own RNG and every image its own generator), rendered in a fraction of a second
EVAL_ONLY = Sizes(digits_train=0, digits_test=0, products_train=0, products_test=0, sft_per_task=0, rl_per_task=0)


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _images(directory):
    return sorted(p.relative_to(directory) for p in (Path(directory) / "images").rglob("*.png"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_small")
    return out, generate(out, seed=0, small=True)


@pytest.fixture(scope="module")
def eval_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_eval")
    generate(out, seed=0, sizes=EVAL_ONLY)
    return _read(out / "eval_prompts.jsonl")


# ------------------------------------------------------------------------------------------------- rendering


def test_renders_are_deterministic_and_seeded():
    def png(seed, render, *args):
        image = render(vision.image_rng(seed, "t", 3), *args)
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
        return image.tobytes()

    for render, args in ((vision.render_digit, (7,)), (vision.render_sum, (4, 7)), (vision.render_sum, (47, 38, 2)),
                         (vision.render_product, ("mug", "red"))):
        assert png(0, render, *args) == png(0, render, *args)
        assert png(0, render, *args) != png(1, render, *args)


def test_every_glyph_and_icon_renders_distinctly():
    # one generator for every render: the same canvas, layout and noise, so only the ink can differ
    rng = lambda: vision.image_rng(0, "same", 0)  # noqa: E731
    digits = {vision.render_digit(rng(), d).tobytes() for d in range(10)}
    icons = {vision.render_product(rng(), p, "blue").tobytes() for p in vision.PRODUCTS}
    assert len(digits) == 10 and len(icons) == len(vision.PRODUCTS)
    assert set(vision.PRODUCTS) <= set(reviews.PRODUCTS) and set(vision.COLORS) <= set(reviews.COLORS)
    with pytest.raises(ValueError):
        vision.render_sum(rng(), 10, 3)  # does not fit in one digit
    with pytest.raises(ValueError):
        vision.render_product(rng(), "mug", "white")


def test_ink_stands_out_of_the_noise():
    # the darkest 0.5% of a digit image (20 pixels; even a small "1" has 60 of ink) is far below the median
    # (background, blurred by noise of ~8 levels)
    for i in range(20):
        pixels = np.asarray(vision.render_digit(vision.image_rng(0, "ink", i), i % 10), dtype=float).mean(axis=2)
        low, high = np.percentile(pixels, [0.5, 50])
        assert high - low > 50


# ------------------------------------------------------------------------------------------------------ files


def test_generate_writes_every_file_with_relative_existing_images(small):
    out, counts = small
    assert counts == {name: len(_read(out / name)) for name in FILES}
    assert counts == {"digits_train.jsonl": 60, "digits_test.jsonl": 20, "products_train.jsonl": 40,
                      "products_test.jsonl": 20, "sft.jsonl": 60, "rl_prompts.jsonl": 32, "eval_prompts.jsonl": 40}
    named = []
    for name in FILES:
        for row in _read(out / name):
            paths = row["images"] if "images" in row else [row["image"]]
            for p in paths:
                assert not Path(p).is_absolute() and p.startswith("images/")
                assert (out / p).is_file()
                named.append(p)
    assert len(named) == len(set(named)) == len(_images(out)), "every image is used once"
    with Image.open(out / named[0]) as image:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"


def test_classification_rows(small):
    out, _ = small
    digits = _read(out / "digits_train.jsonl")
    assert list(digits[0]) == ["image", "label", "label_name"]
    assert sorted(Counter(r["label"] for r in digits).values()) == [6] * 10
    assert all(r["label_name"] == str(r["label"]) for r in digits)
    products = _read(out / "products_train.jsonl")
    assert list(products[0]) == ["image", "label", "label_name", "meta"]
    for r in products:
        assert vision.PRODUCTS[r["label"]] == r["label_name"] == r["meta"]["product"]
        assert r["meta"]["color"] in vision.COLORS
    assert sorted(Counter(r["label"] for r in products).values()) == [10] * 4


def test_policy_rows(small):
    out, _ = small
    for name, keys in (("sft.jsonl", ["prompt", "completion", "images", "task", "meta"]),
                       ("rl_prompts.jsonl", ["prompt", "images", "task", "meta"]),
                       ("eval_prompts.jsonl", ["prompt", "images", "task", "meta"])):
        rows = _read(out / name)
        assert Counter(r["task"] for r in rows) == {"image_add": len(rows) // 2, "image_review": len(rows) // 2}
        for r in rows:
            assert list(r) == keys and len(r["images"]) == 1
            if r["task"] == "image_add":
                assert r["prompt"] == "<add> <image>=" and r["meta"] == {"a": r["meta"]["a"], "b": r["meta"]["b"],
                                                                          "answer": r["meta"]["a"] + r["meta"]["b"]}
            else:
                assert r["prompt"] == "<review> <image>" and r["meta"]["product"] in vision.PRODUCTS
    sft = _read(out / "sft.jsonl")
    for r in sft:  # demonstrations: correct sums in the text demo's direct format, DEMO-style reviews
        assert r["completion"].startswith(" ")
        if r["task"] == "image_add":
            assert r["completion"] == f" {r['meta']['answer']:02d}"
    assert [r["task"] for r in sft] != sorted(r["task"] for r in sft), "the two tasks are mixed"


def test_eval_operand_pairs_are_held_out(small):
    out, _ = small
    pair = lambda m: (min(m["a"], m["b"]), max(m["a"], m["b"]))  # noqa: E731
    seen = {pair(r["meta"]) for name in ("sft.jsonl", "rl_prompts.jsonl") for r in _read(out / name)
            if r["task"] == "image_add"}
    held = {pair(r["meta"]) for r in _read(out / "eval_prompts.jsonl") if r["task"] == "image_add"}
    assert held and not held & seen
    assert len(held) == 15  # one pair of each sum 2..16, the sums with two or more pairs
    eval_held, train = vision.split_pairs(random.Random(0), 1, 100)
    assert len(eval_held) == 15 and {a + b for a, b in train} == set(range(19)), "every sum stays in training"
    eval_held, train = vision.split_pairs(random.Random(0), 2, 100)  # two-digit operands: 100 sums held out
    assert len(eval_held) == 100 and not {(min(p), max(p)) for p in train} & set(eval_held)


def test_generation_is_deterministic(small, tmp_path):
    out, _ = small
    generate(tmp_path, seed=0, small=True)
    for name in [*FILES, *_images(out)]:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name
    other = tmp_path / "seed1"
    generate(other, seed=1, small=True)
    assert (out / "sft.jsonl").read_bytes() != (other / "sft.jsonl").read_bytes()
    assert (out / "images/digits/train_000000.png").read_bytes() != (other / "images/digits/train_000000.png").read_bytes()


# -------------------------------------------------------------------------------------------------- scoring


def test_gold_scorers_by_hand():
    add = {"a": 4, "b": 7, "answer": 11}
    assert gold_score("image_add", "<add> <image>=", " 11", add) == 1.0
    assert gold_score("image_add", "<add> <image>=", " 12", add) == 0.0
    assert gold_score("image_add", "<add> <image>=", " 011", add) == 1.0  # the text demo's padding is no error
    assert gold_score("image_add", "<add> <image>=", "", add) == 0.0
    assert gold_score("image_add", "<add> <image>=", " 11", None) == 0.0  # the facts are only in the image
    mug = {"product": "mug", "color": "red"}
    good = " the mug is excellent . i love the handle . the rim is great ."
    assert gold_score("image_review", "<review> <image>", good, mug) == pytest.approx(reviews.gold_score("mug", good))
    assert gold_score("image_review", "<review> <image>", good, mug) > 0.9
    assert gold_score("image_review", "<review> <image>", good, {"product": "tent"}) < 0
    assert -1.0 <= gold_score("image_review", "<review> <image>", good, None) <= 1.0
    assert {"image_add", "image_review"} <= set(TASKS)
    assert len(gold_task_records([{"task": "image_add"}, {"task": "image_review"}, {"task": "poem"}])) == 2


def _mean(values):
    return sum(values) / len(values)


def test_a_text_only_policy_cannot_beat_chance(eval_rows):
    """Every prompt of a task is the same text, so a text-only policy's best is one constant completion."""
    score = lambda r, c: gold_score(r["task"], r["prompt"], c, r["meta"])  # noqa: E731
    add = [r for r in eval_rows if r["task"] == "image_add"]
    assert len({r["prompt"] for r in add}) == 1 and len(add) == 100
    best_add = max(_mean([score(r, f" {s:02d}") for r in add]) for s in range(19))
    top_frequency = Counter(r["meta"]["answer"] for r in add).most_common(1)[0][1] / len(add)
    assert best_add == pytest.approx(top_frequency) and best_add <= 0.1

    review = [r for r in eval_rows if r["task"] == "image_review"]
    assert len({r["prompt"] for r in review}) == 1 and len(review) == 100
    # per product: 20 demonstrations and one top review (the product and two parts, three positive sentences)
    rng = random.Random(0)
    own = {p: [reviews.write_review(rng, p, reviews.DEMO) for _ in range(20)]
           + [f" the {p} is excellent . i love the {reviews.PARTS[p][1]} . the {reviews.PARTS[p][2]} is great ."]
           for p in vision.PRODUCTS}
    # no noun at all: on topic for every product, the best a policy blind to the product can do (~0.56)
    generic = [" it works perfectly . i would buy it again .", " it works well . i would buy it again . it works perfectly .",
               " it works perfectly ."]
    best_constant = max(_mean([score(r, c) for r in review]) for c in [*generic, *(c for cs in own.values() for c in cs)])
    oracle = _mean([max(score(r, c) for c in own[r["meta"]["product"]]) for r in review])  # sees the product: ~0.98
    assert best_constant < oracle - 0.3


# ---------------------------------------------------------------------------------------------- CLI, stage


def test_cli(tmp_path, capsys, small):
    from rlhf.cli import main

    assert main(["world", "--vision", "--out", str(tmp_path), "--small"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{name}: {n} rows" for name, n in small[1].items()]
    assert (tmp_path / "eval_prompts.jsonl").read_bytes() == (small[0] / "eval_prompts.jsonl").read_bytes()


def test_world_stage_in_a_pipeline(tmp_path, small):
    from rlhf.config import load_config
    from rlhf.errors import UserError
    from rlhf.pipeline import recipe, run_pipeline

    pipeline = {"name": "vision", "output_dir": str(tmp_path / "runs"), "seed": 0, "tracking": {"mode": "disabled"},
                "stages": [{"name": "world", "kind": "world", "config": str(ROOT / "configs/world/vision.yaml"),
                            "overrides": {"small": True}}]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    first = run_pipeline(path, [])
    out = tmp_path / "runs" / "world"
    assert first["world"]["status"] == "ran"
    assert first["world"]["metrics"] == {f"data/{Path(n).stem}_rows": c for n, c in small[1].items()}
    assert (out / "sft.jsonl").read_bytes() == (small[0] / "sft.jsonl").read_bytes()
    assert run_pipeline(path, [])["world"]["status"] == "skipped"
    with pytest.raises(UserError, match="committed under data/demo"):
        load_config(recipe("world").Config, None, {"vision": False})
