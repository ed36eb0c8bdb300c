"""Storage and assignment on SQLite and on a real PostgreSQL server."""

import random
import threading
import time

import pytest
from sqlalchemy import event, func, select, text, update

from rlhf.collect.assign import Assigner
from rlhf.collect.settings import AssignmentSettings
from rlhf.collect.storage import (
    SCHEMA_VERSION,
    ConflictingJudgment,
    NewPair,
    SlotTaken,
    Store,
    UnknownAssignment,
    assignments,
    judgments,
    pairs,
    schema_info,
)
from rlhf.errors import UserError


def pairs_of(n: int, gold: bool = False) -> list[NewPair]:
    return [NewPair(f"prompt {i}", f"a{i}", f"b{i}", "x", "y", gold_label=1.0 if gold else None) for i in range(n)]


@pytest.fixture
def store(any_url):
    s = Store.open(any_url)
    yield s
    s.close()


def test_sqlite_runs_in_wal_with_full_sync(sqlite_url):
    store = Store.open(sqlite_url)
    with store.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_schema_version_is_checked(any_url):
    store = Store.open(any_url)
    with store.write() as conn:
        conn.execute(update(schema_info).where(schema_info.c.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    store.close()
    with pytest.raises(UserError, match="schema version"):
        Store.open(any_url)


def test_tokens_are_hashed_and_names_unique(store):
    token = store.add_annotator("ann")
    assert store.find_annotator(token).name == "ann"
    assert store.find_annotator(token + "x") is None
    with store.read() as conn:
        assert token not in str(conn.execute(text("SELECT token_hash FROM annotators")).all())
    with pytest.raises(UserError, match="already exists"):
        store.add_annotator("ann")


def test_pairs_are_deduplicated_by_content(store):
    assert store.add_pairs(pairs_of(3)) == 3
    assert store.add_pairs(pairs_of(4)) == 1
    assert store.pair_counts()["pairs"] == 4


def test_overlap_distinct_annotators_and_left_order(store):
    store.add_pairs(pairs_of(3))
    ids = [store.find_annotator(store.add_annotator(f"p{i}")).id for i in range(3)]
    assigner = Assigner(store, AssignmentSettings(overlap=2, gold_rate=0.0), seed=0)
    seen = {}
    for who in ids:
        while (item := assigner.next_for(who)) is not None:
            stored = store.record_judgment(who, item.id, "left", None, "", "v1")
            assert not stored.duplicate
            seen.setdefault(item.pair_id, []).append(who)
    # 3 pairs x overlap 2 = 6 judgments, each pair by two different people.
    assert sorted(len(v) for v in seen.values()) == [2, 2, 2]
    assert all(len(set(v)) == 2 for v in seen.values())
    rows = store.judgment_rows()
    assert len(rows) == 6
    # "left" was clicked every time, so the stored canonical choice equals the side shown on the left.
    assert all(r["choice"] == r["left"] for r in rows)
    assert {r["left"] for r in rows} == {"a", "b"}  # the order is drawn per assignment, not fixed


def test_reload_returns_same_assignment_until_judged(store):
    store.add_pairs(pairs_of(2))
    who = store.find_annotator(store.add_annotator("p")).id
    assigner = Assigner(store, AssignmentSettings(overlap=1, gold_rate=0.0), seed=0)
    first = assigner.next_for(who)
    assert assigner.next_for(who).id == first.id
    store.record_judgment(who, first.id, "tie", None, "", "v1")
    assert assigner.next_for(who).pair_id != first.pair_id


def test_expired_lease_frees_the_slot(store):
    store.add_pairs(pairs_of(1))
    p1, p2 = (store.find_annotator(store.add_annotator(n)).id for n in ("p1", "p2"))
    assigner = Assigner(store, AssignmentSettings(overlap=1, gold_rate=0.0, lease_seconds=60), seed=0)
    assert assigner.next_for(p1) is not None
    assert assigner.next_for(p2) is None  # the only slot is leased to p1
    with store.write() as conn:
        conn.execute(update(assignments).values(issued_at=time.time() - 120))
    assert assigner.next_for(p2) is not None


def test_gold_items_mixed_at_rate_and_shown_once(store):
    store.add_pairs(pairs_of(200))
    store.add_pairs([NewPair(f"gold {i}", "right", "wrong", "gold", "gold", gold_label=1.0) for i in range(30)])
    who = store.find_annotator(store.add_annotator("p")).id
    assigner = Assigner(store, AssignmentSettings(overlap=1, gold_rate=0.25), seed=3)
    golds = []
    for _ in range(100):
        item = assigner.next_for(who)
        golds.append(item.is_gold)
        store.record_judgment(who, item.id, "left", None, "", "v1")
    assert 12 <= sum(golds) <= 30  # 25% of 100, binomial 95% range ~[17, 33], capped by the 30 gold items
    with store.read() as conn:
        gold_pairs = conn.execute(text("SELECT pair_id FROM assignments a JOIN pairs p ON p.id = a.pair_id "
                                       "WHERE p.gold_label IS NOT NULL")).scalars().all()
    assert len(gold_pairs) == len(set(gold_pairs))


def test_active_selection_serves_least_certain_first(store):
    store.add_pairs([
        NewPair("sure", "a", "b", "x", "y", uncertainty=0.1),
        NewPair("coin flip", "a", "b", "x", "y", uncertainty=0.95),
        NewPair("unsure", "a", "b", "x", "y", uncertainty=0.6),
    ])
    who = store.find_annotator(store.add_annotator("p")).id
    order = []
    assigner = Assigner(store, AssignmentSettings(overlap=1, gold_rate=0.0, active=True), seed=0)
    while (item := assigner.next_for(who)) is not None:
        order.append(item.prompt)
        store.record_judgment(who, item.id, "left", None, "", "v1")
    assert order == ["coin flip", "unsure", "sure"]
    other = store.find_annotator(store.add_annotator("q")).id
    store.add_pairs([NewPair("old", "a", "b", "x", "y", uncertainty=0.1), NewPair("new", "a", "b", "x", "y", uncertainty=0.9)])
    passive = Assigner(store, AssignmentSettings(overlap=1, gold_rate=0.0, active=False), seed=0)
    assert passive.next_for(other).prompt == "old"  # without active selection: oldest first


def test_judgments_idempotent_conflicts_and_ownership(store):
    store.add_pairs(pairs_of(1))
    p1, p2 = (store.find_annotator(store.add_annotator(n)).id for n in ("p1", "p2"))
    item = Assigner(store, AssignmentSettings(overlap=2, gold_rate=0.0), seed=0).next_for(p1)
    first = store.record_judgment(p1, item.id, "right", 2, "because", "v1")
    again = store.record_judgment(p1, item.id, "right", 2, "because", "v1")
    assert again.duplicate and again.id == first.id
    with pytest.raises(ConflictingJudgment):
        store.record_judgment(p1, item.id, "left", None, "", "v1")
    with pytest.raises(UnknownAssignment):
        store.record_judgment(p2, item.id, "left", None, "", "v1")  # not p2's assignment
    assert store.count_judgments() == 1


def test_sql_injection_strings_are_stored_literally(store):
    nasty = "'); DROP TABLE judgments; --"
    store.add_pairs([NewPair(nasty, "a' OR '1'='1", 'b"; DELETE FROM pairs; --', "x", "y")])
    who = store.find_annotator(store.add_annotator("Robert'); DROP TABLE annotators;--")).id
    item = Assigner(store, AssignmentSettings(overlap=1, gold_rate=0.0), seed=0).next_for(who)
    store.record_judgment(who, item.id, "tie", None, nasty, "v1")
    row = store.judgment_rows()[0]
    assert row["prompt"] == nasty and row["rationale"] == nasty
    assert row["annotator"] == "Robert'); DROP TABLE annotators;--"
    assert {row["response_a"], row["response_b"]} == {"a' OR '1'='1", 'b"; DELETE FROM pairs; --'}


def test_concurrent_submissions_store_each_judgment_once(store):
    store.add_pairs(pairs_of(10))
    people = [store.find_annotator(store.add_annotator(f"p{i}")).id for i in range(5)]
    assigner = Assigner(store, AssignmentSettings(overlap=2, gold_rate=0.0), seed=0)
    errors = []

    def work(who):
        try:
            while (item := assigner.next_for(who)) is not None:
                for _ in range(2):  # every judgment sent twice, like a double click
                    store.record_judgment(who, item.id, "left", None, "", "v1")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with store.read() as conn:
        rows = conn.execute(select(judgments.c.pair_id, judgments.c.annotator_id)).all()
    assert len(rows) == 20 == len(set(rows))


# -- overlap and late judgments (expired leases) ------------------------------------------------------------------


def expire_leases(store, *assignment_ids):
    with store.write() as conn:
        conn.execute(update(assignments).where(assignments.c.id.in_(assignment_ids)).values(issued_at=time.time() - 120))


def people(store, n):
    return [store.find_annotator(store.add_annotator(f"p{i}")).id for i in range(n)]


SLOTS = {"overlap": 2, "lease_seconds": 60}


def test_late_judgment_refused_once_others_filled_the_overlap(store):
    store.add_pairs(pairs_of(1))
    p0, p1, p2 = people(store, 3)
    assigner = Assigner(store, AssignmentSettings(overlap=2, gold_rate=0.0, lease_seconds=60), seed=0)
    stale = assigner.next_for(p0)
    expire_leases(store, stale.id)
    for who in (p1, p2):  # the expired lease freed its slot: two others take both
        item = assigner.next_for(who)
        store.record_judgment(who, item.id, "left", None, "", "v1", **SLOTS)
    with pytest.raises(SlotTaken, match="lease ran out"):
        store.record_judgment(p0, stale.id, "right", None, "", "v1", **SLOTS)
    assert store.count_judgments() == 2  # the review's run ended with 3 on an overlap of 2
    with store.read() as conn:
        assert conn.execute(select(pairs.c.judged)).scalar_one() == 2


def test_late_judgment_counted_while_a_slot_is_free(store):
    store.add_pairs(pairs_of(1))
    p0, p1, p2 = people(store, 3)
    assigner = Assigner(store, AssignmentSettings(overlap=2, gold_rate=0.0, lease_seconds=60), seed=0)
    stale = assigner.next_for(p0)
    expire_leases(store, stale.id)
    item = assigner.next_for(p1)
    store.record_judgment(p1, item.id, "left", None, "", "v1", **SLOTS)
    late = store.record_judgment(p0, stale.id, "right", None, "", "v1", **SLOTS)  # one slot was still free
    assert not late.duplicate and store.count_judgments() == 2
    assert store.record_judgment(p0, stale.id, "right", None, "", "v1", **SLOTS).duplicate  # retry: idempotent
    assert assigner.next_for(p2) is None  # and the pair is full now


def test_late_judgment_refused_when_the_free_slot_is_leased_live(store):
    store.add_pairs(pairs_of(1))
    p0, p1, p2 = people(store, 3)
    assigner = Assigner(store, AssignmentSettings(overlap=2, gold_rate=0.0, lease_seconds=60), seed=0)
    stale = assigner.next_for(p0)
    expire_leases(store, stale.id)
    first = assigner.next_for(p1)
    store.record_judgment(p1, first.id, "left", None, "", "v1", **SLOTS)
    live = assigner.next_for(p2)  # holds the last slot, and keeps it
    with pytest.raises(SlotTaken):
        store.record_judgment(p0, stale.id, "left", None, "", "v1", **SLOTS)
    store.record_judgment(p2, live.id, "tie", None, "", "v1", **SLOTS)
    assert store.count_judgments() == 2


def test_late_judgment_on_a_gold_item_is_kept(store):
    store.add_pairs(pairs_of(1, gold=True))
    p0, p1, p2 = people(store, 3)
    assigner = Assigner(store, AssignmentSettings(overlap=1, gold_rate=1.0, lease_seconds=60), seed=0)
    stale = assigner.next_for(p0)
    assert stale.is_gold
    expire_leases(store, stale.id)
    for who in (p1, p2):
        item = assigner.next_for(who)
        store.record_judgment(who, item.id, "left", None, "", "v1", overlap=1, lease_seconds=60)
    store.record_judgment(p0, stale.id, "left", None, "", "v1", overlap=1, lease_seconds=60)  # gold: no overlap
    assert store.count_judgments() == 3


@pytest.mark.parametrize("overlap", [1, 2, 3])
def test_overlap_never_exceeded_with_random_expiries(store, overlap):
    store.add_pairs(pairs_of(6))
    who = people(store, 7)
    assigner = Assigner(store, AssignmentSettings(overlap=overlap, gold_rate=0.0, lease_seconds=60), seed=overlap)
    rng = random.Random(overlap)
    held = []  # (annotator, assignment id) shown but not judged yet
    for _ in range(120):
        person = rng.choice(who)
        roll = rng.random()
        if roll < 0.4 and held:  # someone (maybe late) submits
            annotator, assignment_id = held.pop(rng.randrange(len(held)))
            try:
                store.record_judgment(annotator, assignment_id, "left", None, "", "v1", overlap=overlap, lease_seconds=60)
            except SlotTaken:
                pass
        elif roll < 0.55 and held:  # a lease runs out
            expire_leases(store, rng.choice(held)[1])
        elif (item := assigner.next_for(person)) is not None and (person, item.id) not in held:
            held.append((person, item.id))
    with store.read() as conn:
        per_pair = conn.execute(select(judgments.c.pair_id, func.count()).group_by(judgments.c.pair_id)).all()
        judged = dict(conn.execute(select(pairs.c.id, pairs.c.judged)).all())
    assert per_pair and max(n for _, n in per_pair) <= overlap
    assert all(judged[pair_id] == n for pair_id, n in per_pair)  # the denormalized count stays exact
    assert sum(judged.values()) == store.count_judgments()


def test_record_judgment_needs_overlap_and_lease_together(store):
    with pytest.raises(ValueError, match="together"):
        store.record_judgment(1, "x", "left", None, "", "v1", overlap=2)


# -- cost per judgment does not grow with the database -----------------------------------------------------------


def sqlite_steps(store):
    """A counter of SQLite VM instructions (in units of 100) run on the store's connections from now on."""
    counter = [0]

    def count():
        counter[0] += 1
        return 0

    @event.listens_for(store.engine, "connect")
    def _install(dbapi_connection, _record):
        dbapi_connection.set_progress_handler(count, 100)

    store.engine.dispose()  # reconnect, so every pooled connection has the handler
    return counter


def test_assignment_work_does_not_grow_with_finished_pairs(tmp_path):
    """Assigning and recording 20 judgments costs the same database work after 200 or after 2,000 finished
    pairs: only unfinished pairs are looked at (it grew linearly with them, so a collection was quadratic)."""
    work = {}
    for finished in (200, 2000):
        store = Store.open(f"sqlite:///{tmp_path / f'{finished}.db'}")
        store.add_pairs(pairs_of(finished + 40))
        who = people(store, 2)
        with store.write() as conn:  # mark the first `finished` pairs as judged to the overlap
            conn.execute(update(pairs).where(pairs.c.id <= finished).values(judged=2))
        assigner = Assigner(store, AssignmentSettings(overlap=2, gold_rate=0.0), seed=0)
        steps = sqlite_steps(store)
        for i in range(20):
            item = assigner.next_for(who[i % 2])
            store.record_judgment(who[i % 2], item.id, "left", None, "", "v1", overlap=2, lease_seconds=900)
        store.count_open_pairs(2, 900)
        work[finished] = steps[0]
        store.close()
    assert work[2000] < 1.3 * work[200], work
