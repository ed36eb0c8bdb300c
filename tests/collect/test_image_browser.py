"""A real browser (Debian's Chromium driven by Playwright, headless, launched as tests/collect/test_browser.py does)
on the judging page of an image pair: the prompt's image loads (naturalWidth > 0) under the app's Content-Security-
Policy, beside the two answers, and judging it works as for a text pair. Screenshot in $PYTEST_ARTIFACTS/collect."""

from __future__ import annotations

import os
import shutil

import pytest

from rlhf.collect.server import create_app
from rlhf.collect.serving import ServerThread
from rlhf.collect.storage import NewPair, Store

from .conftest import artifacts_dir, make_config

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright (python package only)")
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Chromium not installed (apt-get install chromium); CI installs it", allow_module_level=True)


def test_the_image_of_an_image_pair_is_visible_on_the_judging_page(tmp_path, vision_world):
    import json

    record = next(json.loads(line) for line in (vision_world / "rl_prompts.jsonl").read_text().splitlines()
                  if json.loads(line)["task"] == "image_review")
    image = str((vision_world / record["images"][0]).resolve())
    cfg = make_config(tmp_path, assignment={"overlap": 1, "gold_rate": 0.0})
    store = Store.open(cfg.database_url())
    store.add_pairs([NewPair(record["prompt"], " the tent is great .", " it broke .", "x", "y", images=[image]),
                     NewPair("<add> 1+2=", " 3", " 4", "x", "y")])
    token = store.add_annotator("browser-user")
    errors, image_replies = [], []
    with playwright_sync.sync_playwright() as p, ServerThread(create_app(cfg, store)) as url:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            # a CSP refusal is a console error; the sign-in page's 401 and the missing favicon are expected ones
            page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
            page.on("response", lambda r: image_replies.append(r.status) if "/image/" in r.url else None)
            page.goto(url)
            page.fill("#token", token)
            page.click("#sign-in")
            page.wait_for_selector("#judge-form")
            if not page.locator("#prompt-image-0").count():  # the text pair came first: judge it, then the image one
                page.click("#choose-left")
                page.wait_for_selector("#prompt-image-0")
            img = page.locator("#prompt-image-0")
            img.evaluate("el => el.decode()")  # resolves once the picture is loaded (rejects if it cannot be)
            natural = img.evaluate("el => [el.complete, el.naturalWidth, el.naturalHeight]")
            from PIL import Image

            assert natural == [True, *Image.open(image).size] and natural[1] > 0
            box, answers = img.bounding_box(), page.locator("#response-left").bounding_box()
            assert box["width"] >= 150 and box["height"] >= 150  # drawn large enough to see (12rem)
            assert box["y"] + box["height"] <= answers["y"]  # in the prompt, right above the two answers
            page.screenshot(path=str(artifacts_dir() / "image-pair.png"), full_page=True)
            page.click("#choose-right")
            page.wait_for_selector("#empty, #judge-form")
        finally:
            browser.close()
    rows = store.judgment_rows()
    assert any(r["images"] == [image] for r in rows)
    assert not errors, errors
    assert image_replies and set(image_replies) == {200}
    store.close()
