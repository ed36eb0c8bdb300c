"""Pairs about an image in the collection app: stored with their image files (a schema-2 database gains the column),
shown on the judging page through /image/<assignment>/<n>, which serves only the file the pair store holds for the
caller's own assignment; the export carries `images` (TRL's vision preference format) that the reward stage reads
back; a vision-language policy samples image pairs and simulated annotators judge them by looking at the image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, select

from rlhf.collect.server import create_app
from rlhf.collect.storage import SCHEMA_VERSION, NewPair, Store, pairs, schema_info
from rlhf.config import validate
from rlhf.errors import UserError

from .conftest import make_config

REVIEW = "<review> <image>"


def image_pair_rows(world: Path, n: int) -> list[dict]:
    """`n` review pairs about the vision world's first rl images (paths relative to the world's directory)."""
    rows = []
    for line in (world / "rl_prompts.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["task"] == "image_review" and len(rows) < n:
            product = record["meta"]["product"]
            rows.append({"prompt": record["prompt"], "response_a": f" the {product} is great .",
                         "response_b": " it broke .", "images": record["images"], "task": record["task"],
                         "meta": record["meta"]})
    return rows


@pytest.fixture
def image_pairs_file(vision_world) -> Path:
    """A pair file beside the world's prompt files (so its relative image paths resolve), removed afterwards."""
    path = vision_world / "collect_pairs_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in image_pair_rows(vision_world, 4)))
    yield path
    path.unlink()


def test_pair_file_images_become_absolute_stored_paths_and_count_in_the_hash(tmp_path, image_pairs_file, vision_world):
    from rlhf.collect.pairs import read_pair_file

    read = read_pair_file(image_pairs_file)
    assert all(p.images == [str((vision_world / r["images"][0]).resolve())] for p, r in
               zip(read, image_pair_rows(vision_world, 4)))
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    same_text = [NewPair(REVIEW, " a .", " b .", "x", "y", images=p.images) for p in read]
    assert store.add_pairs(same_text) == 4  # one text about four images: four pairs
    assert store.add_pairs(same_text) == 0  # stored once
    text = NewPair("<review> tent", " a .", " b .", "x", "y")
    # a text pair hashes as before images existed (a migrated database keeps deduplicating it)
    import hashlib

    old = hashlib.sha256(json.dumps(["<review> tent", " a .", " b .", "x", "y", False], sort_keys=True).encode()).hexdigest()
    assert text.content_hash() == old
    assert store.get_pair(1)["images"] == read[0].images
    store.close()


def test_a_missing_image_in_a_pair_file_names_the_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": REVIEW, "response_a": " a", "response_b": " b", "images": ["gone.png"]}) + "\n")
    from rlhf.collect.pairs import read_pair_file

    with pytest.raises(UserError, match=r"pairs\.jsonl:1: field 'images' item 0: image file not found"):
        read_pair_file(path)


def test_schema_2_database_gains_the_images_column(tmp_path):
    url = f"sqlite:///{tmp_path / 'v2.db'}"
    store = Store.open(url)
    store.add_pairs([NewPair("<add> 1+2=", " 3", " 4", "x", "y")])
    store.close()
    engine = create_engine(url)  # make it a schema-2 database: no images or round column, no rounds, version 2
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE pairs DROP COLUMN images")
        conn.exec_driver_sql("ALTER TABLE pairs DROP COLUMN round")
        conn.exec_driver_sql("ALTER TABLE judgments DROP COLUMN round")
        conn.exec_driver_sql("DROP TABLE rounds")
        conn.execute(schema_info.update().where(schema_info.c.key == "schema_version").values(value="2"))
    engine.dispose()
    store = Store.open(url)
    with store.read() as conn:
        assert "images" in {c["name"] for c in inspect(conn).get_columns("pairs")}
        assert conn.execute(select(schema_info.c.value).where(schema_info.c.key == "schema_version")).scalar() == str(
            SCHEMA_VERSION)
        assert conn.execute(select(pairs.c.images)).scalar() is None
    assert store.get_pair(1)["images"] == []
    store.close()


@pytest.fixture
def image_app(tmp_path, vision_world):
    """An app holding one image pair (its image copied into tmp_path) and one text pair, overlap 1; two annotators."""
    import shutil

    from rlhf.collect.pairs import read_pair_file

    path = tmp_path / "image_pairs.jsonl"  # make_config writes its own pairs.jsonl
    rows = image_pair_rows(vision_world, 1)
    copy = shutil.copy(vision_world / rows[0]["images"][0], tmp_path / "picture.png")
    rows[0]["images"] = [str(copy)]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(
        {"prompt": "<add> 1+2=", "response_a": " 3", "response_b": " 4"}) + "\n")
    cfg = make_config(tmp_path, assignment={"overlap": 1, "gold_rate": 0.0})
    store = Store.open(cfg.database_url())
    store.add_pairs(read_pair_file(path))
    tokens = {name: store.add_annotator(name) for name in ("ann", "bob")}
    yield create_app(cfg, store), store, tokens, Path(rows[0]["images"][0])
    store.close()


def test_the_image_route_serves_only_the_callers_own_assignments_image(image_app):
    app, store, tokens, image = image_app
    ann = TestClient(app, headers={"Authorization": f"Bearer {tokens['ann']}"})
    bob = TestClient(app, headers={"Authorization": f"Bearer {tokens['bob']}"})
    item = ann.get("/api/next").json()["assignment"]
    assert item["prompt"] == REVIEW and item["images"] == [f"/image/{item['id']}/0"]
    reply = ann.get(item["images"][0])
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    assert reply.content == image.read_bytes()
    assert reply.headers["x-content-type-options"] == "nosniff" and "img-src 'self'" in reply.headers[
        "content-security-policy"]
    assert TestClient(app).get(item["images"][0]).status_code == 401  # no credential
    assert bob.get(item["images"][0]).status_code == 404  # another annotator's assignment: as if unknown
    for url in (f"/image/{item['id']}/1", "/image/nope/0", "/image/..%2F..%2Fetc%2Fpasswd/0",
                f"/image/{item['id']}%2F..%2F..%2Fetc%2Fpasswd/0", "/image/../../etc/passwd"):
        assert ann.get(url).status_code in (404, 422), url
    page = ann.get("/")
    assert f'src="/image/{item["id"]}/0"' in page.text and str(image) not in page.text  # no path reaches the page
    # the text pair has no image
    assert ann.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"}).status_code == 201
    text_item = ann.get("/api/next").json()["assignment"]
    assert text_item["images"] == [] and ann.get(f"/image/{text_item['id']}/0").status_code == 404
    assert 'class="prompt-image"' not in ann.get("/").text
    # a file that went away since the pair was stored: 404, not a server error
    image.unlink()
    assert ann.get(item["images"][0]).status_code == 404


def test_export_writes_the_images_column_and_the_reward_stage_reads_it(tmp_path, image_app, vlm_dir):
    from rlhf.collect.export import export
    from rlhf.collect.settings import ExportSettings
    from reward_models.data import check_pair_images, load_preferences
    from reward_models.model import RewardModel

    app, store, tokens, image = image_app
    ann = TestClient(app, headers={"Authorization": f"Bearer {tokens['ann']}"})
    while (item := ann.get("/api/next").json()["assignment"]) is not None:
        assert ann.post("/api/judgments", json={"assignment_id": item["id"], "choice": "right"}).status_code == 201
    counts = export(store, tmp_path / "preferences", ExportSettings(ties="keep"))
    assert counts["rows"] == 2
    from datasets import load_from_disk

    rows = load_from_disk(str(tmp_path / "preferences")).to_list()
    assert {"prompt", "chosen", "rejected", "images"} <= rows[0].keys()
    assert sorted(r["images"] for r in rows) == [[], [str(image)]]
    pairs = load_preferences(str(tmp_path / "preferences"))
    with_image = [p for p in pairs if p.images]
    from PIL import Image

    assert len(with_image) == 1 and with_image[0].images[0].size == Image.open(image).size
    check_pair_images(with_image, RewardModel.from_backbone(str(vlm_dir)).image_inputs, str(vlm_dir))
    with pytest.raises(UserError, match=r"field 'images' is missing"):  # the text row, for an image model
        check_pair_images(pairs, RewardModel.from_backbone(str(vlm_dir)).image_inputs, str(vlm_dir))


def test_image_policy_pairs_simulated_judges_export_and_a_reward_model(tmp_path, vlm_dir, vision_world):
    from rlhf.collect import stage
    from rlhf.stage import StageContext
    from reward_models.data import load_preferences

    class Tracker:
        def log(self, metrics, step):
            pass

        def summary(self, metrics):
            pass

    prompts = str(vision_world / "rl_prompts.jsonl")
    cfg = validate(stage.Config, {
        "output_dir": str(tmp_path / "collect"), "seed": 0,
        "pairs": {"policy": str(vlm_dir), "prompts": prompts, "task": "image_review", "samples_per_prompt": 3,
                  "ready_ahead": 8, "generation": {"max_new_tokens": 6, "prompts_per_batch": 4}},
        "assignment": {"overlap": 1, "gold_rate": 0.0},
        "simulate": {"annotators": 2, "judgments": 12, "timeout_s": 120},
        "export": {"ties": "keep", "bootstrap": 10},
    }, "test")
    ctx = StageContext(name="collect", kind="collect", dir=tmp_path / "collect", tracker=Tracker())
    ctx.dir.mkdir()
    from rlhf.collect.simulate import prompt_lookup

    records = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    lookup = prompt_lookup(cfg)  # one entry per image: the same text about different images is told apart
    assert len(lookup) == len(records) and sorted(map(str, lookup.values())) == sorted(
        str((r["task"], r["meta"])) for r in records)
    assert stage.run(cfg, ctx)["collect/judgments"] == 12
    pairs = load_preferences(str(ctx.dir / "preferences"))
    assert len(pairs) == 12 and all(len(p.images) == 1 for p in pairs)
    assert len({p.image_key for p in pairs}) > 1  # pairs of several images
    # the simulated judges used each image's own facts: the gold scorer agrees with most of their choices
    from rlhf.world import gold_score

    agree = [gold_score(p.extra["task"], p.prompt, p.chosen, p.extra["meta"])
             >= gold_score(p.extra["task"], p.prompt, p.rejected, p.extra["meta"]) for p in pairs if not p.tie]
    assert sum(agree) >= 0.6 * len(agree)
    from rlhf.config import load_config
    from rlhf.pipeline import recipe, run_stage

    metrics = run_stage("reward", load_config(recipe("reward").Config, None, {
        "output_dir": str(tmp_path / "rm"), "model.path": str(vlm_dir), "model.max_length": 64,
        "data.train": str(ctx.dir / "preferences"), "data.eval_fraction": 0.25, "train.max_steps": 2,
        "train.batch_size": 4, "stats.num_samples": 8, "tracking.mode": "disabled"}))["metrics"]
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0


def test_image_prompts_need_an_image_policy(tmp_path, policy_dir, vision_world):
    from rlhf.collect.pairs import build_source

    cfg = make_config(tmp_path, pairs={"policy": str(policy_dir), "prompts": str(vision_world / "rl_prompts.jsonl")})
    with pytest.raises(UserError, match=r"rl_prompts\.jsonl:1: field 'images': the model .* is text-only"):
        build_source(cfg)


def test_an_image_reward_model_scores_the_uncertainty_of_image_pairs(tmp_path, image_pairs_file, vlm_dir):
    from rlhf.collect.pairs import FilePairSource, PairFeeder, load_reward_scorer
    from reward_models.model import RewardModel

    RewardModel.from_backbone(str(vlm_dir)).save(tmp_path / "rm")  # an untrained head reads the images all the same
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    feeder = PairFeeder(store, FilePairSource(image_pairs_file), ready_ahead=100, overlap=1, lease_seconds=60,
                        scorer=load_reward_scorer(str(tmp_path / "rm")))
    assert feeder.fill_once() == 4
    uncertainties = [store.get_pair(i)["uncertainty"] for i in range(1, 5)]
    assert all(u is not None and 0.0 <= u <= 1.0 for u in uncertainties)
    text = NewPair("<review> tent", " a .", " b .", "x", "y")
    with pytest.raises(UserError, match="image reward model: every pair needs its prompt's image"):
        feeder._score([text])
    store.close()
