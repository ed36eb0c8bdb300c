"""Text a database or driver cannot store (a lone surrogate, NUL), and rows that cannot be decoded: refused or
cleaned per pair, never stopping generation, serving or export."""

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from rlhf.collect.export import export
from rlhf.collect.pairs import FilePairSource, PairFeeder
from rlhf.collect.server import create_app
from rlhf.collect.settings import ExportSettings
from rlhf.collect.storage import NewPair, Store
from rlhf.errors import UserError

from .conftest import make_config, write_pairs


def bad_pairs() -> list[dict]:
    base = {"response_a": " 1", "response_b": " 2", "source_a": "x", "source_b": "y"}
    return [
        {**base, "prompt": "lone surrogate in a response", "response_a": "ok \ud800 then"},
        {**base, "prompt": "NUL in the prompt \x00"},
        {**base, "prompt": "NUL in hidden metadata", "meta": {"answer": "4\x002"}},
        {**base, "prompt": [{"role": "user", "content": "surrogate in a chat turn \udfff"}]},
    ]


def test_unstorable_pairs_are_left_out_and_the_rest_stored(tmp_path, any_url, caplog):
    path = write_pairs(tmp_path / "pairs.jsonl", 27, extra=bad_pairs())
    assert "\\ud800" in path.read_text()  # the file carries them as JSON escapes, as a pair source would
    store = Store.open(any_url)
    try:
        feeder = PairFeeder(store, FilePairSource(path), ready_ahead=1000, overlap=2, lease_seconds=60)
        assert feeder.fill_once() == 27  # the 4 bad ones are left out, the batch is not lost
        assert feeder.error is None and store.pair_counts()["pairs"] == 27
        assert sum("pair not stored" in r.getMessage() for r in caplog.records) == 4
        cfg = make_config(tmp_path, database=any_url)
        client = TestClient(create_app(cfg, store), headers={"Authorization": f"Bearer {store.add_annotator('a')}"})
        item = client.get("/api/next").json()["assignment"]
        assert client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"}).status_code == 201
    finally:
        store.close()


def test_nul_assignment_id_is_refused_not_a_500(tmp_path, any_url):
    store = Store.open(any_url)
    try:
        store.add_pairs([NewPair("p", "a", "b", "x", "y")])
        cfg = make_config(tmp_path, database=any_url)
        client = TestClient(create_app(cfg, store), headers={"Authorization": f"Bearer {store.add_annotator('a')}"})
        client.get("/api/next")
        reply = client.post("/api/judgments", json={"assignment_id": "ab\x00cd", "choice": "left"})
        assert reply.status_code == 422
        form = client.post("/judge", data={"assignment_id": "ab\x00cd", "choice": "left"})
        assert form.status_code == 422
        assert store.count_judgments() == 0
    finally:
        store.close()


def test_undecodable_rows_do_not_block_serving_or_export(tmp_path):
    cfg = make_config(tmp_path, assignment={"overlap": 2, "gold_rate": 0.0})
    store = Store.open(cfg.database_url())
    try:
        store.add_pairs([NewPair(f"prompt {i}", f"A{i}", f"B{i}", "x", "y", meta={"i": i}) for i in range(4)])
        with store.write() as conn:  # what another tool, a hand edit or an older release may leave behind
            conn.execute(text("UPDATE pairs SET response_a = CAST(X'41FF80' AS TEXT) WHERE id = 1"))
            conn.execute(text("UPDATE pairs SET prompt = '{not json' WHERE id = 2"))
            conn.execute(text("UPDATE pairs SET meta = :m WHERE id = 3"), {"m": '{"k": "\\ud800"}'})
            conn.execute(text("UPDATE pairs SET prompt = :p WHERE id = 4"), {"p": '"escaped \\udc80 surrogate"'})
        app = create_app(cfg, store)
        for name in ("p", "q"):
            client = TestClient(app, headers={"Authorization": f"Bearer {store.add_annotator(name)}"})
            for _ in range(4):
                assert client.get("/").status_code == 200
                item = client.get("/api/next").json()["assignment"]
                assert item is not None
                reply = client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"})
                assert reply.status_code == 201
        assert store.count_judgments() == 8
        summary = export(store, tmp_path / "out", ExportSettings(ties="keep"))
        assert summary["rows"] == 4
        from datasets import load_from_disk

        rows = {r["pair_id"]: r for r in load_from_disk(str(tmp_path / "out"))}
        assert rows[2]["prompt"] == "{not json"  # served and exported as the text it is
        assert "\ufffd" in rows[4]["prompt"]
        json.dumps(rows[3]["meta"]).encode("utf-8")
    finally:
        store.close()


def test_annotator_name_that_cannot_be_stored_is_a_user_error(sqlite_url):
    store = Store.open(sqlite_url)
    try:
        for name in ("ann\udcff", "ann\x00"):
            with pytest.raises(UserError, match="contains"):
                store.add_annotator(name)
    finally:
        store.close()
