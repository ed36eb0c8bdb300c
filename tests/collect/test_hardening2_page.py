"""What a person needs on the pages: the keys shown, skip and undo, a progress target that does not grow, invisible
and bidi characters made visible; on the admin page the stored pair count, counts next to rates, rationales."""

import re

from fastapi.testclient import TestClient

from rlhf.collect.pairs import FilePairSource, PairFeeder
from rlhf.collect.server import create_app
from rlhf.collect.storage import NewPair, Store

from .conftest import make_config, write_pairs


def setup(tmp_path, pairs=None, feeder=None, store=None, **sections):
    cfg = make_config(tmp_path, **sections)
    store = store or Store.open(cfg.database_url())
    if pairs is None:
        pairs = [NewPair(f"prompt {i}", f"A{i}", f"B{i}", "x", "y") for i in range(4)]
    store.add_pairs(pairs)
    app = create_app(cfg, store, feeder=feeder)
    return app, store


def signed_in(app, token):
    client = TestClient(app)
    assert client.post("/login", data={"token": token}, follow_redirects=False).status_code == 303
    return client


def form_fields(html):
    return {
        "csrf_token": re.search(r'name="csrf_token" value="([0-9a-f]+)"', html).group(1),
        "assignment_id": re.search(r'name="assignment_id" value="([0-9a-f]+)"', html).group(1),
    }


def shown_prompt(html):
    return re.search(r'<pre class="text">(prompt \d)</pre>', html).group(1)


def test_keys_are_shown_on_the_page(tmp_path):
    app, store = setup(tmp_path)
    page = signed_in(app, store.add_annotator("ann")).get("/").text
    for key in ("1", "2", "3", "A", "B", "T", "X", "S", "&larr;", "&rarr;"):
        assert f">{key}</kbd>" in page, key
    store.close()


def test_skip_passes_on_a_pair_for_good(tmp_path):
    app, store = setup(tmp_path, assignment={"overlap": 1, "gold_rate": 0.0})
    client = signed_in(app, store.add_annotator("ann"))
    page = client.get("/").text
    skipped = shown_prompt(page)
    reply = client.post("/skip", data=form_fields(page), follow_redirects=False)
    assert reply.status_code == 303
    seen = [shown_prompt(client.get("/").text)]
    assert seen[0] != skipped
    # The skipped pair's slot is free at once: another annotator gets it first (closest to completion, oldest).
    other = TestClient(app, headers={"Authorization": f"Bearer {store.add_annotator('bob')}"})
    assert other.get("/api/next").json()["assignment"]["prompt"] == skipped
    assert store.count_judgments() == 0
    store.close()


def test_undo_takes_back_the_last_judgment_and_shows_that_pair_again(tmp_path):
    app, store = setup(tmp_path, assignment={"overlap": 1, "gold_rate": 0.0})
    client = signed_in(app, store.add_annotator("ann"))
    page = client.get("/").text
    assert 'id="undo"' not in page  # nothing to undo yet
    judged = shown_prompt(page)
    client.post("/judge", data={**form_fields(page), "choice": "left"})
    after = client.get("/").text
    assert 'id="undo"' in after and shown_prompt(after) != judged and store.count_judgments() == 1
    first_choice = store.judgment_rows()[0]["choice"]
    reply = client.post("/undo", data={"csrf_token": form_fields(after)["csrf_token"]}, follow_redirects=False)
    assert reply.status_code == 303 and store.count_judgments() == 0
    again = client.get("/").text
    assert shown_prompt(again) == judged
    client.post("/judge", data={**form_fields(again), "choice": "right"})  # a new answer, not a 409
    rows = store.judgment_rows()
    assert len(rows) == 1 and rows[0]["choice"] == {"a": "b", "b": "a"}[first_choice]  # same order, other side
    with store.read() as conn:
        assert conn.exec_driver_sql("SELECT max(judged) FROM pairs").scalar() == 1
    store.close()


def test_undo_with_nothing_to_undo_is_a_409_page(tmp_path):
    app, store = setup(tmp_path)
    client = signed_in(app, store.add_annotator("ann"))
    page = client.get("/").text
    reply = client.post("/undo", data={"csrf_token": form_fields(page)["csrf_token"]})
    assert reply.status_code == 409 and "nothing to undo" in reply.text
    store.close()


def test_progress_target_does_not_grow_as_pairs_are_generated(tmp_path):
    cfg = make_config(tmp_path)
    store = Store.open(cfg.database_url())
    feeder = PairFeeder(store, FilePairSource(write_pairs(tmp_path / "twelve.jsonl", 12), batch_size=3),
                        ready_ahead=3, overlap=2, lease_seconds=60)
    feeder.fill_once()
    app = create_app(cfg, store, feeder=feeder)
    client = TestClient(app, headers={"Authorization": f"Bearer {store.add_annotator('ann')}"})
    targets = []
    for _ in range(3):
        targets.append(re.search(r"of (\d+) judgments", client.get("/").text).group(1))
        store.add_pairs(feeder.source.next_batch())  # the feeder stores more meanwhile
    assert store.pair_counts()["pairs"] == 12
    assert targets == ["24", "24", "24"]  # 12 pairs x overlap 2 from the start
    store.close()


def test_invisible_and_bidi_characters_are_made_visible(tmp_path):
    sneaky = "the answer is 12\u202e34\u202c\u200b"
    app, store = setup(tmp_path, pairs=[NewPair("prompt 0\u2066", sneaky, "the answer is 1234", "x", "y")])
    page = TestClient(app, headers={"Authorization": f"Bearer {store.add_annotator('ann')}"}).get("/").text
    for char in ("\u202e", "\u202c", "\u200b", "\u2066"):
        assert char not in page
        assert f'<span class="invisible" title="invisible character">U+{ord(char):04X}</span>' in page
    store.close()


def test_admin_page_shows_stored_pairs_counts_next_to_rates_and_rationales(tmp_path):
    cfg = make_config(tmp_path)
    store = Store.open(cfg.database_url())
    store.add_pairs([NewPair(f"prompt {i}", f"A{i}", f"B{i}", "x", "y") for i in range(61)])

    class Exhausted:
        def next_batch(self):
            return []

    feeder = PairFeeder(store, Exhausted(), ready_ahead=1, overlap=2, lease_seconds=60)
    feeder.fill_once()  # a restarted server: the source has nothing new, 61 pairs are stored
    app = create_app(cfg, store, feeder=feeder)
    for name in ("p", "q"):
        client = TestClient(app, headers={"Authorization": f"Bearer {store.add_annotator(name)}"})
        for _ in range(3):
            item = client.get("/api/next").json()["assignment"]
            client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left",
                                                "rationale": f"{name} says\nA is right"})
    boss = TestClient(app, headers={"Authorization": f"Bearer {store.add_annotator('boss', admin=True)}"})
    page = boss.get("/admin").text
    generation = re.search(r"<th>Pair generation</th><td>(.*?)</td>", page).group(1)
    assert "61 pairs stored" in generation
    assert re.search(r'id="alpha">[^<]*<span class="muted">n=3 pairs', page)
    row = re.search(r"<tr><td>p</td>(.*?)</tr>", page).group(1)
    assert "n=3" in row  # the left-win rate of p's 3 decisive judgments
    assert re.search(r'<pre class="text">q says\nA is right</pre>', page)
    assert boss.get("/api/stats").json()["annotators"]["p"]["decisive_judgments"] == 3
    store.close()
