"""A real browser (Debian's Chromium driven by Playwright, headless) against the app on a loopback socket:
sign in, judge by click and by keyboard, see the next pair, and model outputs that try to run script never do.
Screenshots land in $PYTEST_ARTIFACTS/collect (default test-artifacts/collect)."""

import html
import http.server
import os
import shutil
import threading

import pytest

from rlhf.collect.server import create_app
from rlhf.collect.serving import ServerThread
from rlhf.collect.storage import NewPair, Store

from .conftest import artifacts_dir, make_config

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright (python package only)")
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Chromium not installed (apt-get install chromium); CI installs it", allow_module_level=True)

XSS_PAIRS = [
    NewPair("<script>window.__xss = 'prompt'; alert('prompt')</script>",
            "<img src=x onerror=\"window.__xss = 'img'; alert('img')\">",
            "<a href=\"javascript:window.__xss = 'link'; alert('link')\" id=\"evil\">click me</a>", "x", "y"),
    NewPair([{"role": "user", "content": "<svg onload=\"window.__xss = 'svg'\"></svg>"}],
            "</pre><script>window.__xss = 'break-out'</script><pre>",
            "<iframe src=\"javascript:parent.__xss = 'iframe'\"></iframe>", "x", "y"),
]


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def served(tmp_path):
    """Start the app for a list of pairs; yields (url, store, token)."""
    running = []

    def start(pairs):
        cfg = make_config(tmp_path, assignment={"overlap": 1, "gold_rate": 0.0})
        store = Store.open(cfg.database_url())
        store.add_pairs(pairs)
        token = store.add_annotator("browser-user")
        server = ServerThread(create_app(cfg, store))
        url = server.__enter__()
        running.append((server, store))
        return url, store, token

    yield start
    for server, store in running:
        server.__exit__(None, None, None)
        store.close()


def sign_in(page, url: str, token: str) -> None:
    reply = page.goto(url)
    assert reply.status == 401  # no token yet: the sign-in form, with 401
    page.fill("#token", token)
    page.click("#sign-in")
    page.wait_for_selector("#judge-form, #empty")


def test_sign_in_judge_by_click_and_keyboard(browser, served):
    url, store, token = served([NewPair(f"<add> {i}+{i}=", f" {2 * i}", f" {2 * i + 1}", "good", "bad") for i in range(1, 5)])
    page = browser.new_page()
    sign_in(page, url, token)
    shots = artifacts_dir()
    page.screenshot(path=str(shots / "01-signed-in.png"), full_page=True)
    first = page.get_attribute("#judge-form", "data-assignment")

    page.click("#choose-left")
    page.wait_for_selector(f"#judge-form:not([data-assignment='{first}'])")
    assert store.count_judgments() == 1
    assert page.inner_text("#mine") == "1"
    page.screenshot(path=str(shots / "02-after-click.png"), full_page=True)

    second = page.get_attribute("#judge-form", "data-assignment")
    page.wait_for_selector("#judge-form[data-shortcuts='on']")
    page.keyboard.press("3")  # strength 3
    page.fill("#rationale", "B is the right sum")
    page.locator("body").click(position={"x": 5, "y": 5})  # leave the text box so shortcuts apply
    page.keyboard.press("ArrowRight")
    page.wait_for_selector(f"#judge-form[data-shortcuts='on']:not([data-assignment='{second}'])")
    third = page.get_attribute("#judge-form", "data-assignment")
    page.keyboard.press("t")
    page.wait_for_selector(f"#judge-form[data-shortcuts='on']:not([data-assignment='{third}'])")
    page.keyboard.press("x")
    page.wait_for_selector("#empty")
    page.screenshot(path=str(shots / "03-all-done.png"), full_page=True)

    rows = store.judgment_rows()
    assert len(rows) == 4
    assert rows[0]["choice"] == rows[0]["left"]  # clicked A = the response shown on the left
    assert rows[1]["choice"] != rows[1]["left"] and rows[1]["strength"] == 3
    assert rows[1]["rationale"] == "B is the right sum"
    assert [r["choice"] for r in rows[2:]] == ["tie", "both_bad"]
    assert "All done" in page.inner_text("#empty")
    page.close()


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["csp", "escaping-alone"])
def test_model_outputs_never_execute(browser, served, bypass_csp):
    # With bypass_csp the browser ignores the Content-Security-Policy: escaping alone must keep the page safe.
    url, store, token = served(XSS_PAIRS)
    context = browser.new_context(bypass_csp=bypass_csp)
    page = context.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    sign_in(page, url, token)
    shots = artifacts_dir()
    for index in range(len(XSS_PAIRS)):
        page.wait_for_timeout(300)  # give any injected handler (onerror, onload) time to fire
        texts = page.inner_text("main")
        pair = XSS_PAIRS[index]
        prompt_text = pair.prompt if isinstance(pair.prompt, str) else pair.prompt[0]["content"]
        for shown in (prompt_text, pair.response_a, pair.response_b):
            assert shown in texts  # rendered as literal text
        assert page.locator("main img, main iframe, main svg, .response a, .prompt a, .response script").count() == 0
        page.screenshot(path=str(shots / f"xss-{index}-{'nocsp' if bypass_csp else 'csp'}.png"), full_page=True)
        # Clicking the would-be link does nothing: it is text, not an anchor.
        page.click("#response-left pre")
        page.click("#response-right pre")
        assert page.evaluate("window.__xss") is None and page.evaluate("parent.__xss") is None
        assert dialogs == []
        current = page.get_attribute("#judge-form", "data-assignment")
        page.click("#choose-tie")
        page.wait_for_selector(f"#judge-form:not([data-assignment='{current}']), #empty")
    assert store.count_judgments() == len(XSS_PAIRS)
    context.close()


@pytest.fixture
def attacker_site():
    """Serve one HTML page from another site (http://localhost:PORT; the app is on 127.0.0.1): yields set_page -> url."""
    page = {"html": ""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = page["html"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def set_page(markup: str) -> str:
        page["html"] = markup
        return f"http://localhost:{server.server_address[1]}/"

    yield set_page
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("frame", ["sandboxed-iframe", "cross-site-form"])
def test_foreign_page_cannot_sign_the_visitor_in(browser, served, attacker_site, frame):
    # Login CSRF from the security review: a page on another site posts the attacker's token to /login. From a
    # sandboxed iframe the browser sends `Origin: null` (accepted before); a plain form sends the foreign origin.
    url, store, _victim_token = served([NewPair("p", "a", "b", "x", "y")])
    attacker_token = store.add_annotator("attacker")
    form = (f"<form method='post' action='{url}/login' target='_top'>"
            f"<input name='token' value='{attacker_token}'></form><script>document.forms[0].submit()</script>")
    if frame == "sandboxed-iframe":
        markup = (f"<iframe sandbox='allow-forms allow-scripts allow-top-navigation' "
                  f"srcdoc=\"{html.escape(form)}\"></iframe>")
    else:
        markup = form
    context = browser.new_context()
    page = context.new_page()
    answers = []
    page.on("response", lambda r: answers.append((r.url, r.status)) if r.url.endswith("/login") else None)
    page.goto(attacker_site(markup))
    page.wait_for_url(f"{url}/login", timeout=15000)
    page.wait_for_selector("p.error")
    assert answers == [(f"{url}/login", 403)]
    assert "cross-site sign-in refused" in page.inner_text("main")
    assert context.cookies(url) == []  # no session planted
    assert page.goto(url).status == 401  # the visitor is not signed in as anyone
    context.close()


def test_sign_out_ends_the_session_in_the_browser(browser, served):
    url, store, token = served([NewPair("p", "a", "b", "x", "y")])
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, url, token)
    cookies = context.cookies(url)
    assert [c["name"] for c in cookies] == ["rlhf_session"] and token not in cookies[0]["value"]
    with page.expect_navigation():
        page.click("button:has-text('Sign out')")
    assert page.locator("#token").count() == 1  # back at the sign-in form
    assert context.cookies(url) == []
    replay = browser.new_context()  # someone who copied the cookie before the sign-out
    replay.add_cookies(cookies)
    assert replay.new_page().goto(url).status == 401
    replay.close()
    context.close()
