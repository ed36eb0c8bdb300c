"""The server on a real socket: keep-alive latency (TCP_NODELAY), one session cookie per server and `__Host-` over
TLS, the signed-in name on every page, and one server per PostgreSQL database."""

import re
import socket
import statistics
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from rlhf.collect.server import create_app
from rlhf.collect.serving import ServerThread, bind
from rlhf.collect.storage import NewPair, Store
from rlhf.errors import UserError

from .conftest import make_config


def test_listening_socket_turns_nagle_off():
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY on accepted connections only then
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_keep_alive_requests_do_not_wait_for_delayed_acks(tmp_path):
    cfg = make_config(tmp_path)
    store = Store.open(cfg.database_url())
    token = store.add_annotator("ann")
    try:
        with ServerThread(create_app(cfg, store)) as url, \
                httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
            times = []
            for _ in range(15):
                start = time.perf_counter()
                assert client.get("/guidelines").status_code == 200
                times.append(time.perf_counter() - start)
        # With Nagle on, every request after the first waited ~40 ms for the client's delayed ACK.
        assert statistics.median(times[1:]) < 0.02, times
    finally:
        store.close()


def app_on(tmp_path, name, port):
    cfg = make_config(tmp_path / name, server={"port": port})
    store = Store.open(cfg.database_url())
    store.add_pairs([NewPair(f"{name} {i}", "a", "b", "x", "y") for i in range(3)])
    return create_app(cfg, store), store, store.add_annotator("ann")


def test_two_servers_on_one_host_keep_their_own_cookies(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first, store1, token1 = app_on(tmp_path, "one", 8801)
    second, store2, token2 = app_on(tmp_path, "two", 8802)
    try:
        with ServerThread(first) as url1, ServerThread(second) as url2, \
                httpx.Client(follow_redirects=True) as browser:
            # One cookie jar for both, as in a browser: cookies do not tell ports apart.
            assert browser.post(f"{url1}/login", data={"token": token1}).status_code == 200
            page = browser.get(f"{url1}/")
            csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text).group(1)
            assignment = re.search(r'name="assignment_id" value="([0-9a-f]+)"', page.text).group(1)
            assert browser.post(f"{url2}/login", data={"token": token2}).status_code == 200
            reply = browser.post(f"{url1}/judge", data={"csrf_token": csrf, "assignment_id": assignment,
                                                        "choice": "left"})
            assert reply.status_code == 200 and store1.count_judgments() == 1  # not lost to the other sign-in
            assert browser.get(f"{url2}/").status_code == 200
    finally:
        store1.close()
        store2.close()


def test_cookie_over_tls_is_host_prefixed_and_a_plain_one_is_ignored(tmp_path):
    cfg = make_config(tmp_path)
    store = Store.open(cfg.database_url())
    token = store.add_annotator("ann")
    app = create_app(cfg, store)
    try:
        client = TestClient(app, base_url="https://testserver")
        reply = client.post("/login", data={"token": token}, follow_redirects=False)
        cookie = reply.headers["set-cookie"]
        assert cookie.startswith("__Host-rlhf_session=") and "Secure" in cookie and "Path=/" in cookie
        assert "Domain" not in cookie
        assert client.get("/").status_code == 200
        session = client.cookies["__Host-rlhf_session"]
        # A cookie without the prefix can be planted by any plain-HTTP service on the host: over TLS it is not read.
        tossed = TestClient(app, base_url="https://testserver", cookies={"rlhf_session": session})
        assert tossed.get("/").status_code == 401
    finally:
        store.close()


def test_signed_in_name_is_shown_prominently(tmp_path):
    cfg = make_config(tmp_path)
    store = Store.open(cfg.database_url())
    client = TestClient(create_app(cfg, store), headers={"Authorization": f"Bearer {store.add_annotator('mallory')}"})
    try:
        for path in ("/", "/guidelines"):
            assert re.search(r'Signed in as <strong id="signed-in-as">mallory</strong>', client.get(path).text)
    finally:
        store.close()


def test_second_server_on_one_postgresql_database_is_refused(tmp_path, postgres_url):
    cfg = make_config(tmp_path, database=postgres_url)
    store = Store.open(postgres_url)
    try:
        with ServerThread(create_app(cfg, store)):
            other = Store.open(postgres_url)  # another process would open its own connections
            try:
                with pytest.raises(UserError, match="one PostgreSQL database takes one server"):
                    ServerThread(create_app(cfg, other))
            finally:
                other.close()
        with ServerThread(create_app(cfg, store)):  # given back when the first one stopped
            pass
    finally:
        store.close()
