"""The `vit` stage: a nano ViT pre-trained from scratch on the colours of rendered shapes for a few steps, fine-tuned
onto another label set (the shapes), the Wilson interval by hand, bad inputs named by file:line and field, the standard sizes'
parameter counts, and resume after a kill."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.pipeline import run_stage
from rlhf.recipes import vit
from rlhf.stage import read_manifest, write_manifest
from rlhf.tracking import read_metrics

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
SHAPES = ("square", "circle")


def _render(root: Path, split: str, n: int, seed: int) -> None:
    """`shapes_<split>.jsonl` (label: square / circle) and `colours_<split>.jsonl` (label: red / green / blue) over
    the same 64×64 RGB PNGs in `images/`, paths relative to the files: the format of rlhf.world.vision."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    shapes, colours = [], []
    for i in range(n):
        shape, colour = i % 2, (i // 2) % 3
        image = Image.new("RGB", (64, 64), (235, 235, 225))
        size = rng.randint(22, 40)
        x, y = rng.randint(2, 62 - size), rng.randint(2, 62 - size)
        draw = ImageDraw.Draw(image)
        fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in list(COLOURS.values())[colour])
        (draw.rectangle if shape == 0 else draw.ellipse)([x, y, x + size, y + size], fill=fill)
        rel = f"images/{split}_{i:04d}.png"
        image.save(root / rel)
        shapes.append({"image": rel, "label": shape, "label_name": SHAPES[shape]})
        colours.append({"image": rel, "label": colour, "label_name": list(COLOURS)[colour], "meta": {"shape": shape}})
    for name, rows in (("shapes", shapes), ("colours", colours)):
        (root / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vision")
    _render(root, "train", 96, seed=0)
    _render(root, "test", 40, seed=1)
    return root


def _cfg(out: Path, data: Path, task: str = "colours", **overrides):
    base = {"output_dir": str(out), "model.size": "nano", "data.train": str(data / f"{task}_train.jsonl"),
            "data.test": str(data / f"{task}_test.jsonl"), "train.max_steps": 30, "train.batch_size": 16,
            "train.log_every": 1, "optim.lr": 3e-3, "optim.warmup_steps": 3, "tracking.mode": "disabled"}
    return load_config(vit.Config, None, {**base, **overrides})


@pytest.fixture(scope="module")
def pretrained(images, tmp_path_factory):
    """A nano ViT trained from scratch on the colours for 30 steps: (its directory, final metrics, in-memory model)."""
    out = tmp_path_factory.mktemp("vit") / "pretrain"
    kept = {}
    real = vit.save_vit

    def save(model, processor, directory, state_dict=None):
        kept["model"] = model
        real(model, processor, directory, state_dict)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vit, "save_vit", save)
        result = run_stage("vit", _cfg(out, images))
    return out, result["metrics"], kept["model"]


def _pil_images(data: Path, task: str, split: str) -> tuple[list[Image.Image], torch.Tensor]:
    rows = [json.loads(line) for line in (data / f"{task}_{split}.jsonl").read_text().splitlines()]
    return [Image.open(data / r["image"]).convert("RGB") for r in rows], torch.tensor([r["label"] for r in rows])


def test_from_scratch_loss_falls_and_reports_accuracy_with_a_ci(pretrained):
    out, metrics, _ = pretrained
    losses = [row["loss/total"] for row in read_metrics(out) if "train/grad_norm" in row]
    assert len(losses) == 30 and all(map(math.isfinite, losses))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    acc, low, high = metrics["eval/accuracy"], metrics["eval/accuracy_ci_low"], metrics["eval/accuracy_ci_high"]
    assert 0.0 <= low <= acc <= high <= 1.0 and low < high and metrics["eval/examples"] == 40
    assert (low, high) == pytest.approx(vit.wilson_interval(round(acc * 40), 40))
    assert {"eval/accuracy/red", "eval/accuracy/green", "eval/accuracy/blue", "eval/loss"} <= set(metrics)
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["kind"] == "vit"
    assert not (out / "checkpoints").exists() and not list(out.glob(".tmp*"))


def test_the_saved_directory_loads_and_gives_the_in_memory_models_logits(pretrained, images):
    from transformers import AutoImageProcessor, ViTForImageClassification, ViTModel

    out, metrics, model = pretrained
    loaded = ViTForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert loaded.config.id2label == {0: "red", 1: "green", 2: "blue"} and loaded.config.image_size == 64
    pil, labels = _pil_images(images, "colours", "test")
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = loaded(pixel_values=pixels).logits
        assert torch.allclose(logits, model.eval()(pixel_values=pixels).logits, atol=1e-5)
        # the recipe's uint8 path (decode once, normalize per batch) is the processor's preprocessing
        own = vit.normalize(vit.load_images(vit.load_records(images / "colours_test.jsonl"), "image", processor,
                                            str(images / "colours_test.jsonl")), processor)
        assert torch.allclose(own, pixels, atol=1e-6)
        # and the final eval the stage reported is this directory's
        assert torch.nn.functional.cross_entropy(logits, labels).item() == pytest.approx(metrics["eval/loss"], abs=1e-5)
        assert (logits.argmax(-1) == labels).float().mean().item() == pytest.approx(metrics["eval/accuracy"])
        # ViTModel reads the trunk (a LLaVA vision tower): its final [CLS] state is what the head classifies
        trunk = ViTModel.from_pretrained(out, add_pooling_layer=False).eval()
        cls = trunk(pixel_values=pixels).last_hidden_state[:, 0]
        assert torch.allclose(loaded.classifier(cls), logits, atol=1e-5)


def test_finetuning_onto_another_label_set_gets_a_new_zero_head_on_the_same_trunk(pretrained, images, tmp_path):
    from transformers import ViTForImageClassification

    out, _, trained = pretrained
    shapes = {0: "square", 1: "circle"}
    settings = vit.VitModelSettings(path=str(out))
    model, processor, new_head = vit.load_vit(settings, shapes, seed=0)
    assert new_head and model.classifier.out_features == 2 and model.config.id2label == shapes
    assert model.config.label2id == {"square": 0, "circle": 1}
    assert not model.classifier.weight.any() and not model.classifier.bias.any(), "ViT §3.2: a zero-initialised head"
    # (the file holds transformers' checkpoint names, the model its own: compare with the pre-trained model)
    before = {k: v for k, v in trained.state_dict().items() if not k.startswith("classifier.")}
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    assert len(trunk) > 20 and trunk.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in trunk.items()), "every trunk weight as pre-trained"
    assert list(processor.image_mean) == [0.5, 0.5, 0.5] and processor.size["height"] == 64

    # the same label set keeps the trained head
    same, _, new = vit.load_vit(settings, {0: "red", 1: "green", 2: "blue"}, seed=0)
    assert not new and torch.equal(same.classifier.weight, trained.classifier.weight)

    # a higher resolution: position embeddings interpolated to the 12×12 grid, the [CLS] one kept
    big, big_processor, _ = vit.load_vit(vit.VitModelSettings(path=str(out), image_size=96), shapes, seed=0)
    pos = big.state_dict()["vit.embeddings.position_embeddings"]
    assert pos.shape == (1, 1 + 12 * 12, 32) and torch.equal(pos[:, 0], before["vit.embeddings.position_embeddings"][:, 0])
    assert big(pixel_values=torch.zeros(1, 3, 96, 96)).logits.shape == (1, 2) and big_processor.size["height"] == 96

    # the stage: a few steps on the shapes, saved with the new head
    result = run_stage("vit", _cfg(tmp_path / "ft", images, "shapes", **{"model.path": str(out), "train.max_steps": 4}))
    tuned = ViTForImageClassification.from_pretrained(tmp_path / "ft")
    assert tuned.config.id2label == shapes and tuned.classifier.weight.shape == (2, 32)
    assert {"eval/accuracy/square", "eval/accuracy/circle"} <= set(result["metrics"])


def test_the_worlds_digits_then_products_through_the_stage(vision_world, vit_dir, tmp_path):
    """rlhf.world.vision's files as they are: pre-train on the digits, fine-tune onto the products; and the shared
    32-pixel ViT fixture (a saved ViTImageProcessor too) fine-tuned at 64 pixels from its bare trunk (`ViTModel`)."""
    from transformers import ViTForImageClassification, ViTModel

    digits = _cfg(tmp_path / "digits", vision_world, "digits", **{"train.max_steps": 3})
    metrics = run_stage("vit", digits)["metrics"]
    model = ViTForImageClassification.from_pretrained(tmp_path / "digits")
    assert model.config.id2label == {i: str(i) for i in range(10)} and metrics["eval/examples"] == 20
    products = _cfg(tmp_path / "products", vision_world, "products",
                    **{"model.path": str(tmp_path / "digits"), "train.max_steps": 3})
    run_stage("vit", products)
    names = ViTForImageClassification.from_pretrained(tmp_path / "products").config.id2label
    rows = [json.loads(line) for line in (vision_world / "products_train.jsonl").read_text().splitlines()]
    assert names == {r["label"]: r["label_name"] for r in rows} and len(names) == 4

    trunk_dir = tmp_path / "trunk"
    ViTModel.from_pretrained(vit_dir, add_pooling_layer=False).save_pretrained(trunk_dir)
    model, processor, new_head = vit.load_vit(vit.VitModelSettings(path=str(trunk_dir), image_size=64), names, seed=0)
    assert new_head and model.config.image_size == 64 and model.config.id2label == names
    assert model.vit.embeddings.position_embeddings.shape == (1, 1 + 8 * 8, 32) and processor.size["height"] == 64
    assert run_stage("vit", _cfg(tmp_path / "from_fixture", vision_world, "products",
                                 **{"model.path": str(vit_dir), "model.image_size": 64, "train.max_steps": 2}))


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.95996: centre (0.8 + 0.19207) / 1.38415 = 0.71674, half-width 1.95996 · 0.16001 / 1.38415 = 0.22658
    assert vit.wilson_interval(8, 10) == pytest.approx((0.49016, 0.94331), abs=1e-5)
    # at 0 or n successes the interval stays inside [0, 1] and does not collapse (the normal approximation's does)
    assert vit.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert vit.wilson_interval(10, 10)[1] == 1.0 and vit.wilson_interval(10, 10)[0] == pytest.approx(0.72247, abs=1e-5)
    assert vit.wilson_interval(0, 0) == (0.0, 1.0)
    # at large n it approaches the normal approximation p ± z·sqrt(p(1−p)/n) (z = 2.5758 at 99%), within 1%
    low, high = vit.wilson_interval(500, 1000, level=0.99)
    assert (low + high) / 2 == pytest.approx(0.5) and high - low == pytest.approx(2 * 2.5758 * math.sqrt(0.25 / 1000), rel=0.01)


def _bad_copy(images: Path, tmp_path: Path, line: int, change: dict) -> Path:
    """colours_train.jsonl with row `line` (1-based) updated by `change` (a None value deletes the key)."""
    rows = [json.loads(x) for x in (images / "colours_train.jsonl").read_text().splitlines()]
    rows = [{**r, "image": str(images / r["image"])} for r in rows]  # the copy lives elsewhere
    rows[line - 1] = {k: v for k, v in {**rows[line - 1], **change}.items() if v is not None}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("change, message", [
    ({"image": "missing/nope.png"}, r"field 'image': image file not found: .*nope\.png"),
    ({"image": "NOT_AN_IMAGE"}, r"field 'image': .*not_an_image\.png is not an image file Pillow can read"),
    ({"image": None}, r"missing field 'image'"),
    ({"label": None}, r"missing field 'label'"),
    ({"label": "three"}, r"field 'label' must be an integer class label, got 'three'"),
    ({"label": 1.5}, r"field 'label' must be an integer class label, got 1\.5"),
    ({"label": True}, r"field 'label' must be an integer class label, got True"),
    ({"label": -1}, r"field 'label' is -1: class labels count from 0"),
    ({"label": 0, "label_name": "blue"}, r"field 'label_name' is 'blue' for label 0, which .*:1 names 'red'"),
])
def test_bad_inputs_name_the_file_line_and_field(images, tmp_path, change, message):
    if change.get("image") == "NOT_AN_IMAGE":
        fake = tmp_path / "not_an_image.png"
        fake.write_text("this is text, not a PNG\n")
        change = {"image": str(fake)}
    bad = _bad_copy(images, tmp_path, 3, change)
    cfg = _cfg(tmp_path / "out", images, **{"data.train": str(bad)})
    with pytest.raises(UserError, match=rf"^{bad}:3: {message}") as info:
        run_stage("vit", cfg)
    assert "\n" not in str(info.value)


def test_a_test_label_outside_the_training_classes_is_refused(images, tmp_path):
    rows = [json.loads(x) for x in (images / "colours_test.jsonl").read_text().splitlines()]
    rows[4]["label"] = 3
    bad = tmp_path / "test.jsonl"
    bad.write_text("".join(json.dumps({**r, "image": str(images / r["image"])}) + "\n" for r in rows))
    with pytest.raises(UserError, match=rf"^{bad}:5: field 'label' is 3, outside 0\.\.2 \(3 classes: the largest label in "):
        run_stage("vit", _cfg(tmp_path / "out", images, **{"data.test": str(bad)}))
    with pytest.raises(UserError, match=r"model.image_size 60 is not a multiple of model.patch_size 8"):
        run_stage("vit", _cfg(tmp_path / "out2", images, **{"model.image_size": 60}))


def test_resume_after_a_kill_reaches_the_same_result(images, tmp_path, monkeypatch):
    overrides = {"train.max_steps": 6, "train.save_every": 2, "augment.random_shift": 4, "augment.hflip": True}
    reference = run_stage("vit", _cfg(tmp_path / "reference", images, **overrides))["metrics"]
    cfg = _cfg(tmp_path / "killed", images, **overrides)
    real, calls = vit.classification_loss, []

    def loss(*args):
        calls.append(1)
        if len(calls) == 5:  # in optimizer step 5, after the step-4 checkpoint
            raise KeyboardInterrupt
        return real(*args)

    with monkeypatch.context() as patch:
        patch.setattr(vit, "classification_loss", loss)
        with pytest.raises(KeyboardInterrupt):
            run_stage("vit", cfg)
    out = Path(cfg.output_dir)
    write_manifest(out, {**read_manifest(out), "status": "running"})  # what SIGKILL leaves
    resumed = run_stage("vit", cfg)["metrics"]
    assert resumed == pytest.approx(reference, rel=1e-6)
    assert [r["step"] for r in read_metrics(out) if "train/grad_norm" in r] == [1, 2, 3, 4, 5, 6]


def _forward_one_image(size: str) -> int:
    """Build `size` at its standard resolution with an ImageNet head (1000 classes), run one image through it; its
    parameter count (the paper's Table 1 counts 86M / 307M / 632M; timm's ViT-L/16 with this head: 304.3M)."""
    from transformers import ViTForImageClassification

    config = vit.vit_config(size, {i: str(i) for i in range(1000)})
    with torch.device("cpu"):
        model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(1, 3, config.image_size, config.image_size)).logits
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    return sum(p.numel() for p in model.parameters())


def test_vit_base_builds_at_224_with_86m_parameters():
    assert vit.VIT_SIZES["base"]["image_size"] == 224 and vit.VIT_SIZES["base"]["patch_size"] == 16
    assert _forward_one_image("base") == pytest.approx(86e6, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("size, params", [("large", 307e6), ("huge", 632e6)])
def test_vit_large_and_huge_build_with_their_parameter_counts(size, params):
    assert _forward_one_image(size) == pytest.approx(params, rel=0.01)
