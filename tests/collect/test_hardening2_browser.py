"""In a real browser (Debian's Chromium via Playwright): a typed rationale survives a failed submission, skip and
undo work from the keyboard, and a line-broken rationale at the length limit is accepted."""

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


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def served(tmp_path):
    cfg = make_config(tmp_path, assignment={"overlap": 1, "gold_rate": 0.0})
    store = Store.open(cfg.database_url())
    store.add_pairs([NewPair(f"prompt {i}", f" {i}", f" {i + 1}", "x", "y") for i in range(4)])
    token = store.add_annotator("browser-user")
    server = ServerThread(create_app(cfg, store))
    url = server.__enter__()
    yield url, store, token
    server.__exit__(None, None, None)
    store.close()


def sign_in(page, url, token):
    page.goto(url)
    page.fill("#token", token)
    page.click("#sign-in")
    page.wait_for_selector("#judge-form[data-shortcuts='on']")


def test_rationale_survives_a_failed_submission(browser, served):
    url, store, token = served
    page = browser.new_page()
    sign_in(page, url, token)
    assignment = page.get_attribute("#judge-form", "data-assignment")
    page.fill("#rationale", "A adds up; B is off by one")
    page.eval_on_selector("#judge-form input[name=csrf_token]", "e => e.value = 'stale'")  # e.g. signed in anew
    page.click("#choose-left")
    page.wait_for_selector("p.error")
    assert store.count_judgments() == 0
    page.click("text=Back to judging")
    page.wait_for_selector(f"#judge-form[data-assignment='{assignment}']")
    assert page.input_value("#rationale") == "A adds up; B is off by one"
    page.screenshot(path=str(artifacts_dir() / "hardening2-rationale-kept.png"), full_page=True)
    page.close()


def test_skip_and_undo_from_the_keyboard(browser, served):
    url, store, token = served
    page = browser.new_page()
    sign_in(page, url, token)
    first = page.get_attribute("#judge-form", "data-assignment")
    page.keyboard.press("s")
    page.wait_for_selector(f"#judge-form[data-shortcuts='on']:not([data-assignment='{first}'])")
    second = page.get_attribute("#judge-form", "data-assignment")
    page.keyboard.press("a")
    page.wait_for_selector(f"#judge-form[data-shortcuts='on']:not([data-assignment='{second}'])")
    assert store.count_judgments() == 1
    page.keyboard.press("u")
    page.wait_for_selector(f"#judge-form[data-shortcuts='on'][data-assignment='{second}']")
    assert store.count_judgments() == 0
    page.close()


def test_line_broken_rationale_at_the_limit_is_accepted(browser, served):
    url, store, token = served
    page = browser.new_page()
    sign_in(page, url, token)
    first = page.get_attribute("#judge-form", "data-assignment")
    text = "\n".join(["x"] * 1000) + "x"  # 2,000 characters as the browser counts them
    page.fill("#rationale", text)
    assert page.eval_on_selector("#rationale", "e => e.value.length") == 2000
    page.click("#choose-left")
    page.wait_for_selector(f"#judge-form:not([data-assignment='{first}'])")
    assert [r["rationale"] for r in store.judgment_rows()] == [text]
    page.close()
