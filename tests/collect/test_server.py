"""The web app's security and request handling, in-process (fastapi TestClient)."""

import re

import pytest
from fastapi.testclient import TestClient

from rlhf.collect.server import create_app
from rlhf.collect.storage import NewPair, Store

from .conftest import make_config

XSS = [
    "<script>window.__xss = 1</script>",
    '<img src=x onerror="window.__xss = 1">',
    '<a href="javascript:window.__xss = 1">click me</a>',
]


@pytest.fixture
def setup(tmp_path):
    cfg = make_config(tmp_path)
    store = Store.open(cfg.database_url())
    store.add_pairs([NewPair(f"prompt {i}", f"answer A{i}", f"answer B{i}", "x", "y") for i in range(5)])
    tokens = {"ann": store.add_annotator("ann"), "admin": store.add_annotator("boss", admin=True)}
    app = create_app(cfg, store)
    yield app, store, tokens
    store.close()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def signed_in(app, token) -> tuple[TestClient, str]:
    """A browser-like client with the session cookie, and the CSRF token from the judging page."""
    client = TestClient(app)
    reply = client.post("/login", data={"token": token}, follow_redirects=False)
    assert reply.status_code == 303 and "rlhf_token" in reply.cookies
    page = client.get("/")
    csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text).group(1)
    return client, csrf


def test_every_route_requires_a_token(setup):
    app, _, _ = setup
    client = TestClient(app)
    routes = [(r.path, m) for r in app.routes if hasattr(r, "methods") for m in r.methods if m != "HEAD"]
    assert len(routes) >= 8
    for path, method in routes:
        if path == "/login":
            continue  # signing in is how a token is presented; a wrong one is checked below
        for headers in ({}, bearer("not-a-token"), {"Authorization": "Basic abc"}):
            reply = client.request(method, path, headers=headers)
            assert reply.status_code == 401, (method, path, headers)
    assert client.post("/login", data={"token": "wrong"}).status_code == 401
    page = client.get("/")
    assert page.status_code == 401 and 'name="token"' in page.text  # pages answer with the sign-in form
    assert client.get("/static/collect.css").status_code == 200  # only the app's own assets are public


def test_cookie_posts_need_csrf_bearer_posts_do_not(setup):
    app, store, tokens = setup
    client, csrf = signed_in(app, tokens["ann"])
    item = client.get("/api/next").json()["assignment"]
    form = {"assignment_id": item["id"], "choice": "left"}
    assert client.post("/judge", data=form, follow_redirects=False).status_code == 403
    assert client.post("/judge", data={**form, "csrf_token": "0" * 64}, follow_redirects=False).status_code == 403
    assert client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"}).status_code == 403
    assert store.count_judgments() == 0
    assert client.post("/judge", data={**form, "csrf_token": csrf}, follow_redirects=False).status_code == 303
    assert store.count_judgments() == 1
    api = TestClient(app)
    nxt = api.get("/api/next", headers=bearer(tokens["ann"])).json()["assignment"]
    reply = api.post("/api/judgments", json={"assignment_id": nxt["id"], "choice": "tie"}, headers=bearer(tokens["ann"]))
    assert reply.status_code == 201
    assert store.count_judgments() == 2


def test_cross_site_sign_in_refused(setup):
    app, _, tokens = setup
    client = TestClient(app)
    reply = client.post("/login", data={"token": tokens["ann"]}, headers={"Origin": "http://evil.example"})
    assert reply.status_code == 403


def test_admin_only_for_admins(setup):
    app, _, tokens = setup
    client = TestClient(app)
    assert client.get("/admin", headers=bearer(tokens["ann"])).status_code == 403
    assert client.get("/api/stats", headers=bearer(tokens["ann"])).status_code == 403
    page = client.get("/admin", headers=bearer(tokens["admin"]))
    assert page.status_code == 200 and "Krippendorff" in page.text
    assert client.get("/api/stats", headers=bearer(tokens["admin"])).json()["judgments"] == 0


def test_duplicate_submission_stored_once(setup):
    app, store, tokens = setup
    client = TestClient(app, headers=bearer(tokens["ann"]))
    item = client.get("/api/next").json()["assignment"]
    body = {"assignment_id": item["id"], "choice": "right", "strength": 3, "rationale": "clearer"}
    first = client.post("/api/judgments", json=body)
    second = client.post("/api/judgments", json=body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json() == {"judgment_id": first.json()["judgment_id"], "duplicate": True}
    assert client.post("/api/judgments", json={**body, "choice": "left"}).status_code == 409
    assert store.count_judgments() == 1


@pytest.mark.parametrize("body, status", [
    (b"{not json", 422),
    (b'{"assignment_id": "x", "choice": "maybe"}', 422),
    (b'{"assignment_id": "x", "choice": "left", "strength": 9}', 422),
    (b'{"assignment_id": "x", "choice": "left", "admin": true}', 422),
    (b'{"assignment_id": "nope", "choice": "left"}', 404),
    (b'["left"]', 422),
])
def test_malformed_requests_get_4xx_and_store_nothing(setup, body, status):
    app, store, tokens = setup
    client = TestClient(app, headers={**bearer(tokens["ann"]), "Content-Type": "application/json"})
    client.get("/api/next")
    assert client.post("/api/judgments", content=body).status_code == status
    assert store.count_judgments() == 0


def test_oversized_and_overlong_requests_refused(setup):
    app, store, tokens = setup
    client = TestClient(app, headers=bearer(tokens["ann"]))
    item = client.get("/api/next").json()["assignment"]
    huge = {"assignment_id": item["id"], "choice": "left", "rationale": "x" * 200_000}
    assert client.post("/api/judgments", json=huge).status_code == 413

    def chunks():  # no Content-Length: the limit must hold while streaming too
        for _ in range(100):
            yield b" " * 1024

    assert client.post("/api/judgments", content=chunks(), headers={"Content-Type": "application/json"}).status_code == 413
    long = {"assignment_id": item["id"], "choice": "left", "rationale": "y" * 3000}  # under the body cap, over 2000 chars
    assert client.post("/api/judgments", json=long).status_code == 422
    nul = {"assignment_id": item["id"], "choice": "left", "rationale": "a\x00b"}
    assert client.post("/api/judgments", json=nul).status_code == 422
    assert store.count_judgments() == 0


def test_model_output_is_escaped_and_csp_set(tmp_path):
    cfg = make_config(tmp_path)
    store = Store.open(cfg.database_url())
    store.add_pairs([NewPair([{"role": "user", "content": XSS[0]}, {"role": "assistant", "content": "ok"},
                              {"role": "user", "content": "and?"}], XSS[1], XSS[2], "x", "y")])
    token = store.add_annotator("ann")
    client = TestClient(create_app(cfg, store), headers=bearer(token))
    page = client.get("/")
    assert page.status_code == 200
    for payload in XSS:
        assert payload not in page.text  # never raw markup
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in page.text
    assert "&lt;img src=x onerror=" in page.text
    assert 'turn-assistant' in page.text and 'turn-user' in page.text  # chat prompts rendered as turns
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"


def test_guidelines_version_shown_and_stored(tmp_path):
    guide = tmp_path / "guide.txt"
    guide.write_text("Prefer correct sums. <b>not bold</b>")
    cfg = make_config(tmp_path, guidelines={"file": str(guide), "version": "2024-06-a"})
    store = Store.open(cfg.database_url())
    store.add_pairs([NewPair("p", "a", "b", "x", "y")])
    client = TestClient(create_app(cfg, store), headers=bearer(store.add_annotator("ann")))
    page = client.get("/guidelines")
    assert "2024-06-a" in page.text and "&lt;b&gt;not bold&lt;/b&gt;" in page.text
    item = client.get("/api/next").json()
    assert item["guidelines_version"] == "2024-06-a"
    client.post("/api/judgments", json={"assignment_id": item["assignment"]["id"], "choice": "left"})
    assert store.judgment_rows()[0]["guidelines_version"] == "2024-06-a"


def test_next_reports_done_when_nothing_left(setup):
    app, store, tokens = setup
    client = TestClient(app, headers=bearer(tokens["ann"]))
    for _ in range(5):
        item = client.get("/api/next").json()["assignment"]
        assert client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "both_bad"}).status_code == 201
    assert client.get("/api/next").json() == {"assignment": None, "status": "done"}
    page = client.get("/")
    assert "All done" in page.text and "5" in page.text
