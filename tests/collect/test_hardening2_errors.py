"""When pair generation fails, annotators see a plain message; the details (which can quote SQL parameters and
hidden metadata such as a gold item's answer) go to the server log only."""

import logging

from fastapi.testclient import TestClient

from rlhf.collect.pairs import PairFeeder
from rlhf.collect.server import create_app
from rlhf.collect.storage import NewPair, Store

from .conftest import make_config

SECRET = "INSERT INTO pairs (prompt, meta) VALUES ('<add> 2+2=', '{\"answer\": 4}') -- gold answer key"


class FailingSource:
    def next_batch(self):
        raise RuntimeError(SECRET)


def test_generation_error_details_stay_in_the_log(tmp_path, caplog):
    cfg = make_config(tmp_path)
    store = Store.open(cfg.database_url())
    try:
        feeder = PairFeeder(store, FailingSource(), ready_ahead=4, overlap=2, lease_seconds=60, poll_s=0.01)
        with caplog.at_level(logging.ERROR):
            feeder._loop()  # one pass: the source fails and the loop stops
        assert feeder.error and SECRET in caplog.text
        store.add_pairs([NewPair("p", "a", "b", "x", "y")])
        tokens = {"ann": store.add_annotator("ann"), "boss": store.add_annotator("boss", admin=True)}
        app = create_app(cfg, store, feeder=feeder)
        ann = TestClient(app, headers={"Authorization": f"Bearer {tokens['ann']}"})
        first = ann.get("/")
        item = ann.get("/api/next").json()["assignment"]
        ann.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"})
        empty = ann.get("/")  # nothing left: the page explains why
        assert empty.status_code == 200 and 'id="empty"' in empty.text and "admin" in empty.text
        boss = TestClient(app, headers={"Authorization": f"Bearer {tokens['boss']}"})
        admin_page = boss.get("/admin").text
        assert "server log" in admin_page
        for page in (first.text, empty.text, admin_page, ann.get("/api/next").text):
            assert "INSERT" not in page and "answer" not in page and "RuntimeError:" not in page
    finally:
        store.close()
