"""Request handling: sign-in behind a Host-rewriting proxy, rationale length with CRLF line breaks, the 409 message
in the words of the page, and chat roles that must not become CSS classes."""

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from rlhf.collect.server import create_app
from rlhf.collect.storage import NewPair, Store, assignments

from .conftest import make_config

PROXIED = {  # what nginx's `proxy_pass http://127.0.0.1:8765` sends for https://collect.example.org
    "Host": "127.0.0.1:8765",
    "Origin": "https://collect.example.org",
    "Sec-Fetch-Site": "same-origin",
    "X-Forwarded-Host": "collect.example.org",
    "X-Forwarded-Proto": "https",
}


def make(tmp_path, pairs=None, **sections):
    cfg = make_config(tmp_path, **sections)
    store = Store.open(cfg.database_url())
    store.add_pairs(pairs or [NewPair(f"prompt {i}", f"A{i}", f"B{i}", "x", "y") for i in range(3)])
    return cfg, store


def test_sign_in_behind_a_trusted_proxy_that_rewrites_host(tmp_path):
    cfg, store = make(tmp_path, server={"trusted_proxies": ["testclient"]})  # TestClient's peer address
    token = store.add_annotator("ann")
    client = TestClient(create_app(cfg, store))
    reply = client.post("/login", data={"token": token}, headers=PROXIED, follow_redirects=False)
    assert reply.status_code == 303
    cookie = reply.headers["set-cookie"]
    assert cookie.startswith("__Host-") and "Secure" in cookie  # the browser's scheme, from the proxy
    store.close()


def test_forwarded_headers_of_an_untrusted_peer_are_ignored(tmp_path):
    cfg, store = make(tmp_path, server={"trusted_proxies": ["10.0.0.1"]})
    token = store.add_annotator("ann")
    reply = TestClient(create_app(cfg, store)).post("/login", data={"token": token}, headers=PROXIED,
                                                    follow_redirects=False)
    assert reply.status_code == 403
    store.close()


def signed_in(app, token):
    client = TestClient(app)
    assert client.post("/login", data={"token": token}, follow_redirects=False).status_code == 303
    page = client.get("/")
    return client, page, re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text).group(1)


def test_rationale_at_the_limit_with_crlf_breaks_is_accepted(tmp_path):
    cfg, store = make(tmp_path)
    client, page, csrf = signed_in(create_app(cfg, store), store.add_annotator("ann"))
    assignment = re.search(r'name="assignment_id" value="([0-9a-f]+)"', page.text).group(1)
    # 1,000 lines: the browser's maxlength counts 2,000 characters (a break is one), the form sends CRLF.
    rationale = "\r\n".join(["x"] * 1000) + "x"
    assert len(rationale.replace("\r\n", "\n")) == 2000
    reply = client.post("/judge", data={"csrf_token": csrf, "assignment_id": assignment, "choice": "left",
                                        "rationale": rationale}, follow_redirects=False)
    assert reply.status_code == 303
    assert store.judgment_rows()[0]["rationale"] == rationale.replace("\r\n", "\n")
    over = client.get("/")
    second = re.search(r'name="assignment_id" value="([0-9a-f]+)"', over.text).group(1)
    reply = client.post("/judge", data={"csrf_token": csrf, "assignment_id": second, "choice": "left",
                                        "rationale": rationale + "y"})
    assert reply.status_code == 422
    store.close()


@pytest.mark.parametrize("left", ["a", "b"])
def test_conflict_message_names_the_letter_on_screen(tmp_path, left):
    cfg, store = make(tmp_path)
    client = TestClient(create_app(cfg, store), headers={"Authorization": f"Bearer {store.add_annotator('ann')}"})
    item = client.get("/api/next").json()["assignment"]
    with store.write() as conn:
        conn.execute(update(assignments).where(assignments.c.id == item["id"]).values(left=left))
    assert client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "right"}).status_code == 201
    reply = client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"})
    assert reply.status_code == 409
    detail = reply.json()["detail"]
    assert "B is better" in detail and "'a'" not in detail and "'b'" not in detail  # they clicked B, whatever is stored
    store.close()


def test_chat_roles_cannot_add_css_classes(tmp_path):
    turns = [{"role": "user error progress", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    cfg, store = make(tmp_path, pairs=[NewPair(turns, "a", "b", "x", "y")])
    client = TestClient(create_app(cfg, store), headers={"Authorization": f"Bearer {store.add_annotator('ann')}"})
    page = client.get("/").text
    classes = re.findall(r'<div class="(turn[^"]*)"', page)
    assert classes == ["turn turn-other", "turn turn-assistant"]
    assert "user error progress" in page  # the role is still shown, as text
    store.close()
