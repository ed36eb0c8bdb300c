"""A database written by schema 1 (the release before sessions, revocation and the per-pair judgment count) opens
with this code on SQLite and PostgreSQL: migrated in place, data kept, the old tokens still sign in."""

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    inspect,
    select,
)

from rlhf.collect.assign import Assigner
from rlhf.collect.server import COOKIE, create_app
from rlhf.collect.settings import AssignmentSettings
from rlhf.collect.storage import SCHEMA_VERSION, Store, hash_token, pairs, schema_info

from .conftest import make_config

# Schema 1 exactly as rlhf/collect/storage.py defined it (commit ce2b6f5).
v1 = MetaData()
Table("schema_info", v1, Column("key", String(64), primary_key=True), Column("value", String(256), nullable=False))
Table("annotators", v1,
      Column("id", Integer, primary_key=True, autoincrement=True),
      Column("name", String(128), nullable=False, unique=True),
      Column("token_hash", String(64), nullable=False, unique=True),
      Column("is_admin", Boolean, nullable=False, default=False),
      Column("created_at", Float, nullable=False))
v1_pairs = Table("pairs", v1,
                 Column("id", Integer, primary_key=True, autoincrement=True),
                 Column("prompt", Text, nullable=False),
                 Column("response_a", Text, nullable=False),
                 Column("response_b", Text, nullable=False),
                 Column("source_a", String(512), nullable=False),
                 Column("source_b", String(512), nullable=False),
                 Column("task", String(64)),
                 Column("meta", Text),
                 Column("gold_label", Float),
                 Column("uncertainty", Float),
                 Column("content_hash", String(64), nullable=False, unique=True),
                 Column("created_at", Float, nullable=False))
v1_assignments = Table("assignments", v1,
                       Column("id", String(32), primary_key=True),
                       Column("pair_id", Integer, ForeignKey("pairs.id"), nullable=False),
                       Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
                       Column("left", String(1), nullable=False),
                       Column("issued_at", Float, nullable=False),
                       Column("completed", Boolean, nullable=False, default=False),
                       UniqueConstraint("pair_id", "annotator_id", name="uq_assignment_pair_annotator"))
v1_judgments = Table("judgments", v1,
                     Column("id", Integer, primary_key=True, autoincrement=True),
                     Column("pair_id", Integer, ForeignKey("pairs.id"), nullable=False),
                     Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
                     Column("assignment_id", String(32), ForeignKey("assignments.id"), nullable=False),
                     Column("choice", String(8), nullable=False),
                     Column("left", String(1), nullable=False),
                     Column("strength", Integer),
                     Column("rationale", Text, nullable=False, default=""),
                     Column("guidelines_version", String(64), nullable=False),
                     Column("created_at", Float, nullable=False),
                     UniqueConstraint("pair_id", "annotator_id", name="uq_judgment_pair_annotator"))
Index("ix_judgments_pair", v1_judgments.c.pair_id)
Index("ix_assignments_annotator", v1_assignments.c.annotator_id, v1_assignments.c.completed)
Index("ix_pairs_gold", v1_pairs.c.gold_label)


def write_v1_database(url: str) -> dict[str, str]:
    """A schema-1 database with 3 pairs, 2 annotators, 3 judgments (pair 1 twice, pair 2 once); returns tokens."""
    engine = create_engine(url)
    now = time.time()
    tokens = {"ann": "token-of-ann-" + "x" * 20, "boss": "token-of-boss-" + "y" * 20}
    with engine.begin() as conn:
        v1.create_all(conn)
        conn.execute(v1.tables["schema_info"].insert(), [{"key": "schema_version", "value": "1"},
                                                          {"key": "csrf_secret", "value": "ab" * 32}])
        conn.execute(v1.tables["annotators"].insert(), [
            {"name": "ann", "token_hash": hash_token(tokens["ann"]), "is_admin": False, "created_at": now},
            {"name": "boss", "token_hash": hash_token(tokens["boss"]), "is_admin": True, "created_at": now},
        ])
        conn.execute(v1_pairs.insert(), [
            {"prompt": f'"prompt {i}"', "response_a": f"a{i}", "response_b": f"b{i}", "source_a": "x", "source_b": "y",
             "content_hash": f"{i:064d}", "created_at": now} for i in (1, 2, 3)
        ])
        done = [("a1", 1, 1), ("a2", 1, 2), ("a3", 2, 1)]
        conn.execute(v1_assignments.insert(), [
            {"id": aid, "pair_id": p, "annotator_id": who, "left": "a", "issued_at": now, "completed": True}
            for aid, p, who in done
        ] + [{"id": "open", "pair_id": 3, "annotator_id": 1, "left": "b", "issued_at": now, "completed": False}])
        conn.execute(v1_judgments.insert(), [
            {"pair_id": p, "annotator_id": who, "assignment_id": aid, "choice": "a", "left": "a", "strength": None,
             "rationale": "", "guidelines_version": "v1", "created_at": now} for aid, p, who in done
        ])
    engine.dispose()
    return tokens


def test_schema_1_database_is_migrated_in_place(any_url, tmp_path):
    tokens = write_v1_database(any_url)
    store = Store.open(any_url)
    try:
        with store.read() as conn:
            assert conn.execute(select(schema_info.c.value).where(schema_info.c.key == "schema_version")).scalar() == str(
                SCHEMA_VERSION)
            assert dict(conn.execute(select(pairs.c.id, pairs.c.judged)).all()) == {1: 2, 2: 1, 3: 0}  # backfilled
            names = inspect(conn)
            assert "sessions" in names.get_table_names()
            assert "ix_pairs_open" in {ix["name"] for ix in names.get_indexes("pairs")}
        assert store.count_judgments() == 3 and len(store.judgment_rows()) == 3
        assert store.find_annotator(tokens["ann"]).name == "ann"  # old tokens keep working

        cfg = make_config(tmp_path, database=any_url, assignment={"overlap": 2, "gold_rate": 0.0})
        app = create_app(cfg, store)
        client = TestClient(app)
        assert client.post("/login", data={"token": tokens["ann"]}, follow_redirects=False).status_code == 303
        assert COOKIE in client.cookies
        # ann's live schema-1 lease comes back to her (the order she saw is kept) and takes her judgment.
        mine = client.get("/api/next").json()["assignment"]
        assert (mine["id"], mine["left"]) == ("open", "b3")
        csrf = client.get("/").text.split('name="csrf_token" value="')[1].split('"')[0]
        assert client.post("/api/judgments", json={"assignment_id": "open", "choice": "left"},
                           headers={"X-CSRF-Token": csrf}).status_code == 201
        boss = TestClient(app, headers={"Authorization": f"Bearer {tokens['boss']}"})
        seen = []
        while (item := boss.get("/api/next").json()["assignment"]) is not None:
            seen.append(item["prompt"])
            assert boss.post("/api/judgments", json={"assignment_id": item["id"], "choice": "tie"}).status_code == 201
        assert seen == ["prompt 2", "prompt 3"]  # pair 1 is full (and was boss's); oldest first among equals
        assert boss.get("/api/stats").json()["judgments"] == 6
        with store.read() as conn:
            assert dict(conn.execute(select(pairs.c.id, pairs.c.judged)).all()) == {1: 2, 2: 2, 3: 2}
        store.revoke_annotator("ann")
        assert client.get("/api/next").status_code == 401
    finally:
        store.close()
    reopened = Store.open(any_url)  # opening again is a no-op
    assert reopened.count_judgments() == 6
    reopened.close()


def test_failed_migration_leaves_the_database_as_it_was(sqlite_url, monkeypatch):
    write_v1_database(sqlite_url)
    from rlhf.collect import storage

    def broken(conn):
        conn.exec_driver_sql("ALTER TABLE annotators ADD COLUMN revoked_at FLOAT")
        raise RuntimeError("disk full")

    monkeypatch.setitem(storage.MIGRATIONS, 1, broken)
    with pytest.raises(RuntimeError, match="disk full"):
        Store.open(sqlite_url)
    monkeypatch.undo()
    engine = create_engine(sqlite_url)
    with engine.connect() as conn:
        assert "revoked_at" not in {c["name"] for c in inspect(conn).get_columns("annotators")}
    engine.dispose()
    store = Store.open(sqlite_url)  # and the real migration still runs afterwards
    assert store.count_judgments() == 3
    store.close()


def test_assigner_and_migrated_counts_agree(sqlite_url):
    write_v1_database(sqlite_url)
    store = Store.open(sqlite_url)
    assert store.count_open_pairs(overlap=2, lease_seconds=900) == 2  # pair 2: one judgment; pair 3: one live lease
    assert store.count_open_pairs(overlap=1, lease_seconds=900) == 0  # pair 2 is full, pair 3's only slot leased
    assert store.count_open_pairs(overlap=1, lease_seconds=0.000001) == 1  # once ann's lease on pair 3 ran out
    who = store.find_annotator(store.add_annotator("new")).id
    seen = []
    assigner = Assigner(store, AssignmentSettings(overlap=2, gold_rate=0.0), seed=0)
    while (item := assigner.next_for(who)) is not None:
        seen.append(item.pair_id)
        store.record_judgment(who, item.id, "tie", None, "", "v2", overlap=2, lease_seconds=900)
    assert seen == [2, 3]  # closest to completion first
    store.close()
