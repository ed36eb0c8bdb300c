"""`rlhf loop` rounds in a real browser: a serving app with pairs.follow_rounds shows pairs of the open round's
checkpoint, and when the loop opens the next round (a new checkpoint) the same server, not restarted, refuses the
judgment of a pair still on screen from the closed round and then shows pairs sampled from the new checkpoint.
Screenshots land in $PYTEST_ARTIFACTS/collect (default test-artifacts/collect)."""

import os
import shutil

import pytest

from rlhf.collect.pairs import build_feeder
from rlhf.collect.server import create_app
from rlhf.collect.serving import ServerThread
from rlhf.collect.storage import Store

from .conftest import REPO, artifacts_dir, make_config

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright (python package only)")
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Chromium not installed (apt-get install chromium); CI installs it", allow_module_level=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two untrained nano demo-world policies: round 1's and round 2's."""
    from rlhf.policy import PolicyModel, load_tokenizer
    from rlhf.world import build_tiny_lm

    root = tmp_path_factory.mktemp("rounds")
    paths = []
    for seed in (0, 1):
        tok = load_tokenizer(str(REPO / "data" / "demo" / "tokenizer"))
        PolicyModel(build_tiny_lm(tok, "nano", seed=seed), tok).save(root / f"round{seed + 1}")
        paths.append(str(root / f"round{seed + 1}"))
    return paths


def test_a_new_round_serves_the_new_checkpoint_and_refuses_the_closed_rounds_pair(tmp_path, checkpoints):
    first, second = checkpoints
    cfg = make_config(tmp_path, pairs={
        "follow_rounds": True, "prompts": str(REPO / "data" / "demo" / "rl_prompts.jsonl"), "task": "review",
        "ready_ahead": 2, "generation": {"max_new_tokens": 10, "prompts_per_batch": 2},
    }, assignment={"overlap": 1, "gold_rate": 0.0})
    store = Store.open(cfg.database_url())
    store.open_round(1, first)  # what `rlhf loop` does before round 1 collects
    token = store.add_annotator("browser-user")
    feeder = build_feeder(cfg, store)
    feeder.poll_s = 0.2
    shots = artifacts_dir()
    with playwright_sync.sync_playwright() as p, ServerThread(create_app(cfg, store, feeder=feeder)) as url:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page()
        page.goto(url)
        page.fill("#token", token)
        page.click("#sign-in")
        page.wait_for_selector("#judge-form", timeout=60_000)
        shown = store.get_pair(_pair_of(store, page.get_attribute("#judge-form", "data-assignment")))
        assert (shown["round"], shown["source_a"], shown["source_b"]) == (1, first, first)
        page.click("#choose-left")  # a judgment of round 1, stored
        page.wait_for_selector("#judge-form", timeout=60_000)
        on_screen = page.get_attribute("#judge-form", "data-assignment")
        assert store.get_pair(_pair_of(store, on_screen))["round"] == 1
        page.screenshot(path=str(shots / "rounds-01-round-1.png"), full_page=True)

        store.open_round(2, second)  # the loop trained the policy: round 2 opens, round 1 closes
        page.click("#choose-right")  # the round-1 pair still on screen
        page.wait_for_selector("text=round 1 has closed")
        page.screenshot(path=str(shots / "rounds-02-closed-round-refused.png"), full_page=True)
        assert store.count_round_judgments(1) == 1

        page.goto(url)
        page.wait_for_selector("#judge-form", timeout=60_000)
        now = store.get_pair(_pair_of(store, page.get_attribute("#judge-form", "data-assignment")))
        assert (now["round"], now["source_a"], now["source_b"]) == (2, second, second)
        page.click("#choose-left")
        page.wait_for_selector("#judge-form, #empty", timeout=60_000)
        page.screenshot(path=str(shots / "rounds-03-round-2.png"), full_page=True)
        assert store.count_round_judgments(2) == 1
        browser.close()
    store.close()


def _pair_of(store: Store, assignment_id: str) -> int:
    from sqlalchemy import select

    from rlhf.collect.storage import assignments

    with store.read() as conn:
        return conn.execute(select(assignments.c.pair_id).where(assignments.c.id == assignment_id)).scalar_one()
