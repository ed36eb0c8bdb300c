"""The web app's security and request handling, in-process (fastapi TestClient)."""

import json
import re
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from rlhf.collect import cli
from rlhf.collect.server import COOKIE, SECURITY_HEADERS, create_app
from rlhf.collect.storage import NewPair, Store, assignments, hash_token, sessions
from rlhf.errors import UserError

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
    assert reply.status_code == 303 and COOKIE in reply.cookies
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


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},  # a sandboxed iframe or a data: URL on any site (the login-CSRF of the security review)
    {"Origin": " NULL "},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # a sibling subdomain is another party too
    {"Origin": "null", "Sec-Fetch-Site": "same-origin"},  # both must pass
    {"Origin": "http://testserver.evil.example", "Sec-Fetch-Site": "same-origin"},
    {"Origin": "http://testserver", "Sec-Fetch-Site": "cross-site"},
    {"Origin": "not a url"},
], ids=lambda h: ",".join(f"{k}={v.strip()}" for k, v in h.items()))
def test_cross_site_sign_in_refused(setup, headers):
    app, store, tokens = setup
    client = TestClient(app)
    reply = client.post("/login", data={"token": tokens["ann"]}, headers=headers, follow_redirects=False)
    assert reply.status_code == 403 and "cross-site sign-in refused" in reply.text
    assert COOKIE not in reply.cookies and "set-cookie" not in reply.headers
    with store.read() as conn:
        assert conn.execute(select(sessions.c.id)).first() is None


@pytest.mark.parametrize("headers", [
    {},  # curl, scripts: no browser, no victim
    {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},  # our own sign-in form
    {"Sec-Fetch-Site": "none"},  # typed or bookmarked by the user
    {"Origin": "http://TESTSERVER"},
], ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()) or "no-headers")
def test_same_site_sign_in_accepted(setup, headers):
    app, _, tokens = setup
    client = TestClient(app)
    reply = client.post("/login", data={"token": tokens["ann"]}, headers=headers, follow_redirects=False)
    assert reply.status_code == 303 and COOKIE in reply.cookies


def test_referrer_policy_keeps_our_own_origin():
    # Under `no-referrer` browsers send `Origin: null` for our own sign-in form, which sign-in refuses.
    policy = dict(SECURITY_HEADERS)[b"referrer-policy"]
    assert policy == b"same-origin"


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
    (b"\xff\xfe{", 400),  # not UTF-8 at all
])
def test_malformed_requests_get_4xx_and_store_nothing(setup, body, status):
    app, store, tokens = setup
    client = TestClient(app, headers={**bearer(tokens["ann"]), "Content-Type": "application/json"})
    client.get("/api/next")
    assert client.post("/api/judgments", content=body).status_code == status
    assert store.count_judgments() == 0


# `ID` is replaced by a real assignment id. Each of these was a 500 (NaN and lone surrogates) or was accepted
# (coerced strengths) before.
BAD_VALUES = {
    "strength NaN": '{"assignment_id": "ID", "choice": "left", "strength": NaN}',
    "strength Infinity": '{"assignment_id": "ID", "choice": "left", "strength": Infinity}',
    "strength -Infinity": '{"assignment_id": "ID", "choice": "left", "strength": -Infinity}',
    "choice NaN": '{"assignment_id": "ID", "choice": NaN}',
    "surrogate in rationale": '{"assignment_id": "ID", "choice": "left", "rationale": "ok \\ud800 then"}',
    "low surrogate in rationale": '{"assignment_id": "ID", "choice": "left", "rationale": "\\udfff"}',
    "surrogate assignment_id": '{"assignment_id": "\\ud800", "choice": "left"}',
    "surrogate in an unknown key": '{"assignment_id": "ID", "choice": "left", "\\ud800": 1}',
    "strength string": '{"assignment_id": "ID", "choice": "left", "strength": "2"}',
    "strength true": '{"assignment_id": "ID", "choice": "left", "strength": true}',
    "strength 2.0": '{"assignment_id": "ID", "choice": "left", "strength": 2.0}',
    "strength 2.5": '{"assignment_id": "ID", "choice": "left", "strength": 2.5}',
    "assignment_id number": '{"assignment_id": 5, "choice": "left"}',
    "rationale number": '{"assignment_id": "ID", "choice": "left", "rationale": 5}',
    "choice list": '{"assignment_id": "ID", "choice": ["left"]}',
}


@pytest.mark.parametrize("body", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_bad_values_get_422_with_json_and_store_nothing(setup, body):
    app, store, tokens = setup
    client = TestClient(app, headers={**bearer(tokens["ann"]), "Content-Type": "application/json"},
                        raise_server_exceptions=False)
    item = client.get("/api/next").json()["assignment"]
    reply = client.post("/api/judgments", content=body.replace("ID", item["id"]).encode())
    assert reply.status_code == 422, reply.text
    detail = json.loads(reply.content.decode("utf-8"))["detail"]  # valid UTF-8 JSON, no NaN, no surrogate
    assert detail and all({"type", "loc", "msg"} <= set(e) and "input" not in e for e in detail)
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert store.count_judgments() == 0
    # The same assignment still takes a well-formed judgment (strict ints: 2 is a strength).
    good = {"assignment_id": item["id"], "choice": "left", "strength": 2, "rationale": "fine ✓"}
    assert client.post("/api/judgments", json=good).status_code == 201
    assert store.judgment_rows()[0]["strength"] == 2


def test_form_input_errors_are_422_pages(setup):
    app, store, tokens = setup
    client, csrf = signed_in(app, tokens["ann"])
    item = client.get("/api/next").json()["assignment"]
    for form in ({"assignment_id": item["id"], "choice": "maybe"}, {"choice": "left"},
                 {"assignment_id": item["id"], "choice": "left", "strength": "2.0"}):
        reply = client.post("/judge", data={**form, "csrf_token": csrf}, follow_redirects=False)
        assert reply.status_code == 422 and "Error 422" in reply.text, form
        assert reply.headers["content-security-policy"].startswith("default-src 'none'")
    # Invalid UTF-8 in a form decodes to U+FFFD (no surrogate reaches the database): an unknown assignment.
    raw = f"assignment_id=%ED%A0%80&choice=left&csrf_token={csrf}".encode()
    reply = client.post("/judge", content=raw, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 404
    assert store.count_judgments() == 0


def test_non_ascii_csrf_header_is_403_not_500(setup):
    app, store, tokens = setup
    client, _ = signed_in(app, tokens["ann"])
    item = client.get("/api/next").json()["assignment"]
    reply = client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"},
                        headers={"X-CSRF-Token": ("é" * 64).encode("latin-1")})  # a latin-1 header decodes to é
    assert reply.status_code == 403
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


def assert_security_headers(reply):
    for key, value in SECURITY_HEADERS:
        assert reply.headers.get(key.decode()) == value.decode(), (reply.status_code, key)


def test_security_headers_on_413_400_and_500(setup, monkeypatch):
    app, store, tokens = setup
    client = TestClient(app, headers=bearer(tokens["ann"]), raise_server_exceptions=False)
    item = client.get("/api/next").json()["assignment"]
    huge = client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left", "rationale": "x" * 70_000})
    assert huge.status_code == 413
    assert_security_headers(huge)
    streamed = client.post("/api/judgments", content=iter([b" " * 1024] * 100), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert_security_headers(streamed)
    bad_length = client.post("/api/judgments", content=b"{}", headers={"Content-Length": "x1"})
    assert bad_length.status_code == 400
    assert_security_headers(bad_length)

    def broken(*_args, **_kwargs):
        raise RuntimeError("database on fire")

    monkeypatch.setattr(store, "pair_counts", broken)
    monkeypatch.setattr(store, "record_judgment", broken)
    for reply in (client.get("/"), client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"})):
        assert reply.status_code == 500
        assert_security_headers(reply)
        assert "database on fire" not in reply.text  # no internals in the answer
    assert client.get("/").headers["content-type"].startswith("text/plain")
    assert client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"}).json() == {
        "detail": "internal server error"}


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


# -- sessions, sign-out, revocation -------------------------------------------------------------------------------


def test_cookie_is_a_session_not_the_token(setup):
    app, store, tokens = setup
    client, _ = signed_in(app, tokens["ann"])
    session = client.cookies[COOKIE]
    assert tokens["ann"] not in session and session != hash_token(tokens["ann"])
    with store.read() as conn:
        stored = conn.execute(select(sessions.c.id, sessions.c.expires_at)).all()
    assert [row.id for row in stored] == [hash_token(session)]  # only the hash is stored
    assert stored[0].expires_at == pytest.approx(time.time() + 168 * 3600, abs=60)
    # The token itself in the cookie (what schema-1 servers set) signs nobody in, and signing in deletes it.
    old_style = TestClient(app, cookies={COOKIE: tokens["ann"], "rlhf_token": tokens["ann"]})
    assert old_style.get("/api/next").status_code == 401
    reply = old_style.post("/login", data={"token": tokens["ann"]}, follow_redirects=False)
    assert 'rlhf_token=""; expires' in reply.headers["set-cookie"]  # deleted (Max-Age=0)


def test_sign_out_ends_the_session(setup):
    app, store, tokens = setup
    client, csrf = signed_in(app, tokens["ann"])
    session = client.cookies[COOKIE]
    other, _ = signed_in(app, tokens["ann"])  # a second browser of the same person
    assert client.post("/logout", data={"csrf_token": "0" * 64}, follow_redirects=False).status_code == 403
    reply = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert reply.status_code == 303 and COOKIE in reply.headers["set-cookie"] and "Max-Age=0" in reply.headers["set-cookie"]
    replay = TestClient(app, cookies={COOKIE: session})  # the old cookie, kept by an attacker or a stale tab
    assert replay.get("/api/next").status_code == 401
    page = replay.get("/")
    assert page.status_code == 401 and 'name="token"' in page.text
    assert other.get("/api/next").status_code == 200  # only that session ended
    assert TestClient(app).get("/api/next", headers=bearer(tokens["ann"])).status_code == 200  # the token still works


def test_expired_session_is_refused(setup):
    app, store, tokens = setup
    client, _ = signed_in(app, tokens["ann"])
    with store.write() as conn:
        conn.execute(update(sessions).values(expires_at=time.time() - 1))
    assert client.get("/api/next").status_code == 401
    signed_in(app, tokens["ann"])  # signing in again works, and clears the expired session
    with store.read() as conn:
        assert len(conn.execute(select(sessions.c.id)).all()) == 1


def test_revoke_takes_effect_at_once_on_a_running_app(tmp_path, capsys):
    cfg = make_config(tmp_path)
    config = tmp_path / "collect.yaml"
    config.write_text(json.dumps({"output_dir": cfg.output_dir, "pairs": {"file": cfg.pairs.file},
                                  "assignment": {"overlap": 1, "gold_rate": 0.0}}))
    store = Store.open(cfg.database_url())
    store.add_pairs([NewPair(f"prompt {i}", f"A{i}", f"B{i}", "x", "y") for i in range(3)])
    tokens = {"ann": store.add_annotator("ann"), "other": store.add_annotator("other")}
    app = create_app(make_config(tmp_path, assignment={"overlap": 1, "gold_rate": 0.0}), store)
    browser, csrf = signed_in(app, tokens["ann"])
    api = TestClient(app, headers=bearer(tokens["ann"]))
    first = api.get("/api/next").json()["assignment"]
    assert api.post("/api/judgments", json={"assignment_id": first["id"], "choice": "left"}).status_code == 201
    leased = api.get("/api/next").json()["assignment"]  # shown, not judged: holds the slot of that pair
    assert browser.get("/api/next").status_code == 200

    # Another process (the CLI) revokes; the running app has seen both credentials and must refuse them now.
    assert cli.main(["revoke-annotator", "--config", str(config), "--name", "ann"]) == 0
    assert "1 session(s) ended" in capsys.readouterr().out
    assert api.get("/api/next").status_code == 401
    assert api.post("/api/judgments", json={"assignment_id": leased["id"], "choice": "left"}).status_code == 401
    assert browser.get("/api/next").status_code == 401
    assert browser.post("/judge", data={"assignment_id": leased["id"], "choice": "left", "csrf_token": csrf},
                        follow_redirects=False).status_code == 401
    assert TestClient(app).post("/login", data={"token": tokens["ann"]}).status_code == 401  # no new session either
    assert store.count_judgments() == 1  # their judgments stay
    with store.read() as conn:
        assert conn.execute(select(assignments.c.id).where(assignments.c.id == leased["id"])).first() is None
    # The lease was released: with overlap 1 the other annotator gets all three pairs... minus the judged one.
    other = TestClient(app, headers=bearer(tokens["other"]))
    seen = set()
    while (item := other.get("/api/next").json()["assignment"]) is not None:
        seen.add(item["prompt"])
        other.post("/api/judgments", json={"assignment_id": item["id"], "choice": "tie"})
    assert leased["prompt"] in seen and first["prompt"] not in seen and len(seen) == 2

    assert cli.main(["revoke-annotator", "--config", str(config), "--name", "ann"]) == 0  # idempotent
    assert "already revoked" in capsys.readouterr().out
    with pytest.raises(UserError, match="no annotator named"):
        cli.main(["revoke-annotator", "--config", str(config), "--name", "nobody"])
    with pytest.raises(UserError, match="already exists"):
        store.add_annotator("ann")  # a revoked name is not reused: their judgments keep their author
    store.close()


def test_late_judgment_after_slot_went_elsewhere_is_409(tmp_path):
    cfg = make_config(tmp_path, assignment={"overlap": 2, "gold_rate": 0.0, "lease_seconds": 60})
    store = Store.open(cfg.database_url())
    store.add_pairs([NewPair("only pair", "A", "B", "x", "y")])
    tokens = [store.add_annotator(f"p{i}") for i in range(3)]
    app = create_app(cfg, store)
    late, *others = (TestClient(app, headers=bearer(t)) for t in tokens)
    stale = late.get("/api/next").json()["assignment"]
    with store.write() as conn:  # p0 went for coffee: the lease ran out
        conn.execute(update(assignments).values(issued_at=time.time() - 120))
    for client in others:
        item = client.get("/api/next").json()["assignment"]
        assert client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"}).status_code == 201
    reply = late.post("/api/judgments", json={"assignment_id": stale["id"], "choice": "right"})
    assert reply.status_code == 409
    assert "lease ran out" in reply.json()["detail"] and "not stored" in reply.json()["detail"]
    assert store.count_judgments() == 2  # overlap 2 ends with 2 judgments, not 3
    assert late.get("/api/next").json()["assignment"] is None
