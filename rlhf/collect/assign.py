"""Which pair an annotator judges next.

Rules, in order:
1. An annotator with a shown but unjudged, unexpired assignment gets the same one back (a page reload is stable).
2. With probability `gold_rate`, a gold item this annotator has not seen yet.
3. Otherwise a regular pair this annotator has never been assigned, whose judged + leased slots are below `overlap`
   (`storage.open_regular_pairs`; only unfinished pairs are looked at, so the cost does not grow with the database);
   with `active`, the pair the reward model is least certain about first; then pairs closest to completion (so
   overlap - and with it agreement data - fills early); then the oldest.
The left/right order is drawn per assignment and stored with it, so the judgment records what the annotator saw.

Choosing and leasing happen under the store's write lock in one transaction, so two annotators of one server never
both take a pair's last slot.
"""

from __future__ import annotations

import random
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, func, select

from rlhf.collect.settings import AssignmentSettings
from rlhf.collect.storage import (
    Store, assignments, decode_pair, open_regular_pairs, pairs, servable_round, slots_taken,
)


@dataclass(frozen=True)
class Assignment:
    """A pair as one annotator sees it: `left`/`right` are the responses in display order; `images` how many images
    the prompt shows (served by `/image/<id>`; their paths stay on the server)."""

    id: str
    pair_id: int
    prompt: object  # str or list of {"role", "content"} turns
    left: str
    right: str
    is_gold: bool
    images: int = 0


def _not_seen_by(annotator_id):
    seen = select(assignments.c.id).where(
        (assignments.c.pair_id == pairs.c.id) & (assignments.c.annotator_id == annotator_id)
    )
    return ~seen.exists()


# The statements of `next_for`, built once with bound parameters: building (and cache-keying) these expression trees
# on every request cost ~0.6 ms of CPU, ten times what SQLite then spends running them.
_WHO, _CUTOFF, _OVERLAP = bindparam("annotator_id"), bindparam("cutoff"), bindparam("overlap")
_PENDING = (
    select(assignments.c.id, assignments.c.pair_id, assignments.c.left)
    .where(assignments.c.annotator_id == _WHO)
    .where(assignments.c.completed.is_(False) & (assignments.c.issued_at > _CUTOFF))
    .join(pairs, pairs.c.id == assignments.c.pair_id)
    .where(servable_round())  # a pair of a closed round is no longer shown, even to whoever holds its lease
    .order_by(assignments.c.issued_at)
    .limit(1)
)
_GOLD = select(pairs.c.id).where(pairs.c.gold_label.is_not(None)).where(_not_seen_by(_WHO))


def _regular_query(active: bool):
    order = [slots_taken(_CUTOFF).desc(), pairs.c.id]
    if active:
        # Unscored pairs (null uncertainty) go after scored ones on both backends.
        order = [func.coalesce(pairs.c.uncertainty, -1.0).desc(), *order]
    return (
        select(pairs.c.id)
        .where(_not_seen_by(_WHO))  # first: an index probe that rules out this person's pairs
        .where(open_regular_pairs(_OVERLAP, _CUTOFF))
        .order_by(*order)
        .limit(1)
    )


_REGULAR = {False: _regular_query(False), True: _regular_query(True)}
_VIEW = select(pairs.c.prompt, pairs.c.response_a, pairs.c.response_b, pairs.c.gold_label, pairs.c.images).where(
    pairs.c.id == bindparam("pair_id")
)


class Assigner:
    """Hands out assignments under an `AssignmentSettings` policy."""

    def __init__(self, store: Store, settings: AssignmentSettings, seed: int | None = None):
        self.store = store
        self.settings = settings
        self.rng = random.Random(seed)

    def next_for(self, annotator_id: int) -> Assignment | None:
        """The annotator's next assignment, or None when no pair is available to them right now."""
        now = time.time()
        cutoff = now - self.settings.lease_seconds
        # Not durable: a lease lost to a power cut only frees its slot early (the judgment itself is durable).
        with self.store.write(durable=False) as conn:
            pending = conn.execute(_PENDING, {"annotator_id": annotator_id, "cutoff": cutoff}).first()
            if pending is not None:
                return self._view(conn, pending.id, pending.pair_id, pending.left)
            pair_id = None
            if self.settings.gold_rate > 0 and self.rng.random() < self.settings.gold_rate:
                pair_id = self._gold_pair(conn, annotator_id)
            if pair_id is None:
                pair_id = self._regular_pair(conn, annotator_id, cutoff)
            if pair_id is None:
                return None
            left = self.rng.choice(("a", "b"))
            assignment_id = secrets.token_hex(16)
            conn.execute(assignments.insert(), {"id": assignment_id, "pair_id": pair_id, "annotator_id": annotator_id,
                                                "left": left, "issued_at": now, "completed": False})
            return self._view(conn, assignment_id, pair_id, left)

    def _gold_pair(self, conn: Connection, annotator_id: int) -> int | None:
        candidates = conn.execute(_GOLD, {"annotator_id": annotator_id}).scalars().all()
        return self.rng.choice(candidates) if candidates else None

    def _regular_pair(self, conn: Connection, annotator_id: int, cutoff: float) -> int | None:
        params = {"annotator_id": annotator_id, "cutoff": cutoff, "overlap": self.settings.overlap}
        return conn.execute(_REGULAR[self.settings.active], params).scalar()

    @staticmethod
    def _view(conn: Connection, assignment_id: str, pair_id: int, left: str) -> Assignment:
        row = decode_pair(conn.execute(_VIEW, {"pair_id": pair_id}).mappings().one())
        a, b = row["response_a"], row["response_b"]
        return Assignment(
            id=assignment_id,
            pair_id=pair_id,
            prompt=row["prompt"],
            left=a if left == "a" else b,
            right=b if left == "a" else a,
            is_gold=row["gold_label"] is not None,
            images=len(row["images"]),
        )
