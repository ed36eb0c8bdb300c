"""Durable storage of annotators, pairs, assignments and judgments (SQLAlchemy Core).

SQLite (the embedded default) runs in WAL mode with `synchronous=FULL`, so a judgment whose commit returned survives
a killed process and a power cut; PostgreSQL works through its URL (`postgresql+psycopg://...`). The schema carries
a version in `schema_info`; a database written by a newer schema is refused instead of being misread, and one written
by an older schema is migrated in place when it is opened (see `MIGRATIONS`).

Invariants the database itself enforces (so they hold across threads, processes and retries):
- one judgment per (pair, annotator) - a pair never gets two judgments from the same person, and a resubmitted
  judgment is stored once;
- one assignment per (pair, annotator), which also fixes the left/right order that annotator saw;
- pair contents are unique (a content hash, over the prompt's image files too), so regenerated duplicates are not
  stored twice.
The overlap (judgments per pair) is a setting, not a constraint: `record_judgment` enforces it for late judgments
(see there) and the assigner never leases more slots than it allows, each check inside its write transaction.

Credentials: an annotator's token (only its hash is stored) authenticates API calls; signing in with it in a browser
creates a *session* (again only its hash is stored) whose id is the cookie. Signing out deletes the session;
`revoke_annotator` marks the annotator revoked and deletes their sessions, so both end access on the next request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

from rlhf.errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
SERVER_LOCK = 0x726C6866636F6C  # the PostgreSQL advisory lock a serving process holds (`Store.claim_server`)
CHOICES = ("a", "b", "tie", "both_bad")  # canonical: relative to the stored response_a / response_b
SIDES = ("left", "right", "tie", "both_bad")  # what an annotator clicks: relative to what they saw

metadata = MetaData()

schema_info = Table(
    "schema_info",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

annotators = Table(
    "annotators",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),  # sha256 of the token; the token is never stored
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),  # set by `rlhf collect revoke-annotator`: the token and all sessions stop working
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(64), primary_key=True),  # sha256 of the session id in the cookie; the id is never stored
    Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

pairs = Table(
    "pairs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("prompt", Text, nullable=False),  # JSON: a string, or a list of {"role", "content"} chat turns
    Column("response_a", Text, nullable=False),
    Column("response_b", Text, nullable=False),
    Column("source_a", String(512), nullable=False),  # the checkpoint that wrote response_a
    Column("source_b", String(512), nullable=False),
    Column("task", String(64)),
    Column("meta", Text),  # JSON metadata the demo world's scorers read; never shown to annotators
    # JSON list of the prompt's image files (absolute paths), null = a text prompt. The judging page shows them
    # through /image/<assignment>, the only way a file is served: the client never names a path.
    Column("images", Text),
    Column("gold_label", Float),  # null = regular pair; 1.0 = A is right, 0.0 = B is right, 0.5 = tie
    Column("uncertainty", Float),  # reward-model uncertainty in [0, 1] (1 = coin flip), for active selection
    Column("content_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    # Judgments stored for this pair, kept in step by `record_judgment` (same transaction). Lets the assigner look
    # only at pairs below the overlap (an index range) instead of recounting every pair ever stored.
    Column("judged", Integer, nullable=False, default=0, server_default="0"),
    Column("round", Integer),  # the `rlhf loop` round the pair was sampled in; null = outside any round
)

rounds = Table(
    # one row per `rlhf loop` round: pairs of a closed round are no longer served, and judgments of them are refused
    "rounds",
    metadata,
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("policy", String(512), nullable=False),  # the checkpoint the round's pairs are sampled from
    Column("opened_at", Float, nullable=False),
    Column("closed_at", Float),
)

assignments = Table(
    "assignments",
    metadata,
    Column("id", String(32), primary_key=True),  # random, so a client cannot guess another annotator's item
    Column("pair_id", Integer, ForeignKey("pairs.id"), nullable=False),
    Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
    Column("left", String(1), nullable=False),  # "a" or "b": which stored response was shown on the left
    Column("issued_at", Float, nullable=False),
    Column("completed", Boolean, nullable=False, default=False),
    UniqueConstraint("pair_id", "annotator_id", name="uq_assignment_pair_annotator"),
)

judgments = Table(
    "judgments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pair_id", Integer, ForeignKey("pairs.id"), nullable=False),
    Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
    Column("assignment_id", String(32), ForeignKey("assignments.id"), nullable=False),
    Column("choice", String(8), nullable=False),  # one of CHOICES
    Column("left", String(1), nullable=False),  # copied from the assignment: the order this judgment was made in
    Column("strength", Integer),  # 1..3 or null
    Column("rationale", Text, nullable=False, default=""),
    Column("guidelines_version", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("round", Integer),  # the `rlhf loop` round open when it was made (its pair's round); null = no round
    UniqueConstraint("pair_id", "annotator_id", name="uq_judgment_pair_annotator"),
)

Index("ix_judgments_pair", judgments.c.pair_id)
Index("ix_assignments_annotator", assignments.c.annotator_id, assignments.c.completed)
Index("ix_pairs_gold", pairs.c.gold_label)
ix_pairs_open = Index("ix_pairs_open", pairs.c.gold_label, pairs.c.judged)
Index("ix_sessions_annotator", sessions.c.annotator_id)


def _migrate_1_to_2(conn: Connection) -> None:
    """Schema 1 -> 2: sessions (a new table), annotators.revoked_at, pairs.judged (backfilled) and its index.

    Existing tokens keep working; cookies set by schema-1 servers held the token itself and are no longer accepted
    (annotators sign in once more)."""
    conn.exec_driver_sql("ALTER TABLE annotators ADD COLUMN revoked_at FLOAT")
    conn.exec_driver_sql("ALTER TABLE pairs ADD COLUMN judged INTEGER DEFAULT 0 NOT NULL")
    conn.exec_driver_sql("UPDATE pairs SET judged = (SELECT count(*) FROM judgments WHERE judgments.pair_id = pairs.id)")
    ix_pairs_open.create(conn)
    sessions.create(conn)  # with its index


def _migrate_2_to_3(conn: Connection) -> None:
    """Schema 2 -> 3: pairs.images (a prompt's image files; null for every pair stored before)."""
    conn.exec_driver_sql("ALTER TABLE pairs ADD COLUMN images TEXT")


def _migrate_3_to_4(conn: Connection) -> None:
    """Schema 3 -> 4: rounds (a new table), pairs.round and judgments.round (null for everything stored before:
    outside any round)."""
    conn.exec_driver_sql("ALTER TABLE pairs ADD COLUMN round INTEGER")
    conn.exec_driver_sql("ALTER TABLE judgments ADD COLUMN round INTEGER")
    rounds.create(conn)


MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4}  # version -> the function that brings it to the next


class UnknownAssignment(Exception):
    """The assignment id does not exist or belongs to another annotator."""


class ConflictingJudgment(Exception):
    """The annotator already judged this pair differently; the first judgment stands."""


class RoundClosed(Exception):
    """The pair belongs to a round that has closed: its policy has been trained further since."""


class SlotTaken(Exception):
    """A judgment on an expired lease whose pair meanwhile reached its overlap with other annotators."""


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class NewPair:
    """A pair to store. `prompt` is a string or a list of chat turns; `images` the prompt's image files (absolute
    paths), None for a text prompt."""

    prompt: Any
    response_a: str
    response_b: str
    source_a: str
    source_b: str
    task: str | None = None
    meta: dict | None = None
    gold_label: float | None = None
    uncertainty: float | None = None
    images: list[str] | None = None
    round: int | None = None

    def unstorable(self) -> str | None:
        """Why this pair cannot be stored and served (a NUL or a lone surrogate somewhere), or None."""
        for name in ("prompt", "response_a", "response_b", "source_a", "source_b", "task", "meta", "images"):
            problem = unstorable_text(getattr(self, name))
            if problem:
                return f"{name} contains {problem}"
        return None

    def content_hash(self) -> str:
        fields = [self.prompt, self.response_a, self.response_b, self.source_a, self.source_b, self.gold_label is not None]
        if self.images:  # "<review> <image>" about two images is two prompts; a text pair hashes as it always did
            fields.append(self.images)
        payload = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class StoredJudgment:
    id: int
    duplicate: bool  # True when this exact judgment had already been stored


# A lone UTF-16 surrogate cannot be encoded as UTF-8 (SQLite's driver, JSON responses and HTML pages all fail on
# it), and PostgreSQL refuses NUL in text. Python strings hold valid surrogate pairs as one code point, so any code
# point in the surrogate range is a lone one.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def unstorable_text(value) -> str | None:
    """What in a string (or the strings of a JSON-like value, keys included) cannot be stored, or None."""
    if isinstance(value, str):
        if "\x00" in value:
            return "a NUL character"
        if _LONE_SURROGATE.search(value):
            return "a lone surrogate (text that is not valid Unicode)"
        return None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple)):
        for item in value:
            problem = unstorable_text(item)
            if problem:
                return problem
    return None


def clean_text(value):
    """A JSON-like value with lone surrogates replaced by U+FFFD: what an older database (or a hand edit) stored
    escaped in a JSON column still renders and exports."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [clean_text(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(k): clean_text(v) for k, v in value.items()}
    return value


def hash_token(token: str) -> str:
    """sha256 of a token or session id (surrogatepass: any string a request can carry hashes, none raises)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def slots_taken(cutoff: float, exclude_assignment: str | None = None):
    """Judgment slots used of the pair in the enclosing query over `pairs`: its judgments plus its live leases
    (assignments shown but not judged, issued after `cutoff`), optionally not counting one assignment.

    The one definition of "taken" that the assigner, the feeder's open-pair count and late submissions share."""
    live = (
        select(func.count())
        .select_from(assignments)
        .where(assignments.c.pair_id == pairs.c.id)
        .where(assignments.c.completed.is_(False) & (assignments.c.issued_at > cutoff))
    )
    if exclude_assignment is not None:
        live = live.where(assignments.c.id != exclude_assignment)
    return pairs.c.judged + live.scalar_subquery()


def open_regular_pairs(overlap: int, cutoff: float):
    """WHERE clause: regular (non-gold) pairs with a free judgment slot. `judged < overlap` comes first so the
    database walks the `ix_pairs_open` range of unfinished pairs, not every pair ever stored."""
    return (pairs.c.gold_label.is_(None) & (pairs.c.judged < overlap) & (slots_taken(cutoff) < overlap)
            & servable_round())


def servable_round():
    """WHERE clause: the pair is outside any round, or of the open one (a closed round's pairs are not served)."""
    return pairs.c.round.is_(None) | pairs.c.round.in_(select(rounds.c.number).where(rounds.c.closed_at.is_(None)))


# The credential lookups every request makes (no cache: revocation and sign-out take effect on the next request).
TOKEN_LOOKUP = select(annotators.c.id, annotators.c.name, annotators.c.is_admin).where(
    (annotators.c.token_hash == bindparam("token_hash")) & annotators.c.revoked_at.is_(None)
)
SESSION_LOOKUP = (
    select(annotators.c.id, annotators.c.name, annotators.c.is_admin)
    .join(sessions, sessions.c.annotator_id == annotators.c.id)
    .where(sessions.c.id == bindparam("session_hash"))
    .where(sessions.c.expires_at > bindparam("now"))
    .where(annotators.c.revoked_at.is_(None))
)


# The statements of `record_judgment` and `count_open_pairs`, built once (see rlhf.collect.assign on why).
_ASSIGNMENT = (
    select(assignments.c.pair_id, assignments.c.left, assignments.c.issued_at, pairs.c.gold_label, pairs.c.round,
           rounds.c.closed_at.label("round_closed_at"))
    .join(pairs, pairs.c.id == assignments.c.pair_id)
    .outerjoin(rounds, rounds.c.number == pairs.c.round)
    .where((assignments.c.id == bindparam("assignment_id")) & (assignments.c.annotator_id == bindparam("annotator_id")))
)
_EXISTING = select(judgments.c.id, judgments.c.choice).where(
    (judgments.c.pair_id == bindparam("pair_id")) & (judgments.c.annotator_id == bindparam("annotator_id"))
)
_LATE_SLOTS = select(slots_taken(bindparam("cutoff"), exclude_assignment=bindparam("assignment_id"))).where(
    pairs.c.id == bindparam("pair_id")
)
_ASSIGNMENT_IMAGES = select(pairs.c.images).join(assignments, assignments.c.pair_id == pairs.c.id).where(
    (assignments.c.id == bindparam("assignment_id")) & (assignments.c.annotator_id == bindparam("annotator_id"))
)
_OPEN_ROUND = select(func.max(rounds.c.number)).where(rounds.c.closed_at.is_(None))
_COMPLETE = assignments.update().where(assignments.c.id == bindparam("assignment_id")).values(completed=True)
_COUNT_JUDGMENT = pairs.update().where(pairs.c.id == bindparam("pair_id")).values(judged=pairs.c.judged + 1)
_COUNT_OPEN = select(func.count()).select_from(pairs).where(
    open_regular_pairs(bindparam("overlap"), bindparam("cutoff"))
)


class _RawQuery:
    """A SELECT compiled once for the engine's driver, run on a raw pooled DBAPI connection with no transaction
    around it. For the lookups made on every request: SQLAlchemy's per-execution work plus BEGIN/COMMIT cost
    ~10x the query itself (~0.3 ms against ~0.03 ms on SQLite), and under 20 concurrent clients that showed."""

    def __init__(self, engine: Engine, statement):
        compiled = statement.compile(dialect=engine.dialect)
        self.sql = compiled.string
        self.order = compiled.positiontup if compiled.positional else None

    def first(self, engine: Engine, **values):
        params = tuple(values[name] for name in self.order) if self.order is not None else values
        connection = engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(self.sql, params)
                return cursor.fetchone()
            finally:
                cursor.close()
        finally:
            connection.close()  # back to the pool, which rolls back whatever the driver began


def shown_choice(choice: str, left: str) -> str:
    """A stored choice in the words of the page its annotator saw (the response shown on the left is A there)."""
    if choice in ("a", "b"):
        return "A is better" if choice == left else "B is better"
    return {"tie": "a tie", "both_bad": "both bad"}.get(choice, choice)


def choice_from_side(side: str, left: str) -> str:
    """Translate what the annotator clicked ("left"/"right"/...) into the canonical choice ("a"/"b"/...)."""
    if side == "left":
        return left
    if side == "right":
        return "b" if left == "a" else "a"
    return side


def _decode_lenient(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _sqlite_engine(url: str) -> Engine:
    db_path = make_url(url).database
    if db_path and db_path != ":memory:":
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    # Pooled connections, one thread at a time each: closing the last connection of a WAL database checkpoints and
    # deletes the WAL (several fsyncs), so connections are kept open rather than opened per transaction.
    engine = create_engine(url, pool_size=8, max_overflow=24, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, record):
        # Take transaction control from the sqlite3 module so writers can BEGIN IMMEDIATE (below).
        dbapi_connection.isolation_level = None
        # A TEXT value that is not UTF-8 (written by another tool) would fail every query that reads its row, and
        # with it every annotator the row is assigned to: read it with U+FFFD in place of the bad bytes instead.
        dbapi_connection.text_factory = _decode_lenient
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # fsync the WAL on every commit: acknowledged = durable
        record.info["synchronous"] = "FULL"
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A deferred transaction that reads and then writes can fail with SQLITE_BUSY without waiting when another
        # process wrote in between; taking the write lock up front makes writers queue on busy_timeout instead.
        options = conn.get_execution_options()
        if options.get("sqlite_immediate", False):
            # Judgments fsync the WAL at commit (FULL). Writes that may be lost on a power cut (assignment leases,
            # which just expire) skip that fsync (NORMAL); the next FULL commit syncs their WAL frames too. Reads
            # commit nothing, so they leave the setting alone; it is only sent when it changes.
            level = "FULL" if options.get("durable", True) else "NORMAL"
            if conn.connection.info.get("synchronous") != level:
                conn.exec_driver_sql("PRAGMA synchronous=" + level)
                conn.connection.info["synchronous"] = level
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


class Store:
    """The database of one collection project. Thread-safe; writes from this process are serialized."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._write_lock = threading.Lock()
        self._token_lookup = _RawQuery(engine, TOKEN_LOOKUP)
        self._session_lookup = _RawQuery(engine, SESSION_LOOKUP)

    @classmethod
    def open(cls, url: str) -> "Store":
        """Connect, create the schema on an empty database, and refuse a database of another schema version."""
        try:
            engine = (
                _sqlite_engine(url)
                if url.startswith("sqlite")
                else create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
            )
        except (ArgumentError, ValueError) as exc:
            raise UserError(f"invalid database URL {url!r}: {exc}") from None
        except ImportError as exc:
            raise UserError(f"database driver for {url.split(':', 1)[0]!r} is not installed: {exc}") from None
        store = cls(engine)
        try:
            store._ensure_schema()
        except OperationalError as exc:
            raise UserError(f"cannot open database {make_url(url).render_as_string()}: {exc.orig}") from None
        return store

    def close(self) -> None:
        self.engine.dispose()

    def claim_server(self, wait_s: float = 3.0):
        """Take the database for one serving process; returns the function that gives it back.

        Assignment is serialized within one process (the write lock) and, on SQLite, across processes (BEGIN
        IMMEDIATE), but not across processes on PostgreSQL, whose servers would also each lease by their own clock:
        two servers there over-fill pairs past the overlap. So on PostgreSQL a serving process holds a session-level
        advisory lock, and a second one is refused. `wait_s` covers a killed server whose connection the database
        has not closed yet."""
        if self.engine.dialect.name != "postgresql":
            return lambda: None
        conn = self.engine.connect()
        deadline = time.monotonic() + wait_s
        while not conn.execute(select(func.pg_try_advisory_lock(SERVER_LOCK))).scalar():
            conn.rollback()
            if time.monotonic() > deadline:
                conn.close()
                raise UserError(
                    "another collection server is serving this database; one PostgreSQL database takes one server "
                    "(stop the other one, or give this one its own database)"
                )
            time.sleep(0.2)
        conn.commit()

        def release() -> None:
            conn.invalidate()  # closing the database session drops its advisory lock
            conn.close()

        return release

    def _ensure_schema(self) -> None:
        """Create the schema on an empty database; migrate an older one in place (one transaction, so a failed
        migration leaves the database as it was); refuse a newer one."""
        with self.write() as conn:
            if not inspect(conn).has_table("schema_info"):
                metadata.create_all(conn)
                conn.execute(schema_info.insert(), [
                    {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                    {"key": "csrf_secret", "value": secrets.token_hex(32)},
                ])
                return
            # FOR UPDATE (PostgreSQL): a second process opening the database at the same time waits for the
            # migration to commit and then sees the new version (SQLite's BEGIN IMMEDIATE serializes already).
            version = conn.execute(
                select(schema_info.c.value).where(schema_info.c.key == "schema_version").with_for_update()
            ).scalar()
            current = int(version) if version is not None and version.isdigit() else None
            if current is not None and current < SCHEMA_VERSION:
                while current < SCHEMA_VERSION:
                    MIGRATIONS[current](conn)
                    current += 1
                conn.execute(schema_info.update().where(schema_info.c.key == "schema_version")
                             .values(value=str(SCHEMA_VERSION)))
                return
        if current != SCHEMA_VERSION:
            raise UserError(
                f"database schema version {version} is not the version this rlhf understands ({SCHEMA_VERSION}); "
                "use the rlhf release that created it or start a new database"
            )

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[Connection]:
        """A write transaction: committed when the block exits normally, rolled back on an exception.

        `durable=False` (SQLite only) skips the fsync at commit: for data a power cut may lose without harm.
        A process crash (SIGKILL) loses nothing either way, since the WAL is written before commit returns.
        """
        with self._write_lock, self.engine.connect() as conn:
            conn = conn.execution_options(sqlite_immediate=True, durable=durable)
            with conn.begin():
                yield conn

    # -- annotators --------------------------------------------------------------------------------------------

    def add_annotator(self, name: str, admin: bool = False) -> str:
        """Create an annotator and return their token (shown once; only its hash is stored)."""
        name = name.strip()
        if not name or len(name) > 128:
            raise UserError("annotator name must be 1-128 characters")
        if unstorable_text(name):
            raise UserError(f"annotator name {name!r} contains {unstorable_text(name)}")
        token = secrets.token_urlsafe(24)
        try:
            with self.write() as conn:
                conn.execute(annotators.insert().values(
                    name=name, token_hash=hash_token(token), is_admin=admin, created_at=time.time()
                ))
        except IntegrityError:
            raise UserError(f"an annotator named {name!r} already exists") from None
        return token

    def find_annotator(self, token: str) -> Annotator | None:
        """The annotator whose token this is, or None (unknown or revoked). Read on every request: no cache, so a
        revocation takes effect at once."""
        row = self._token_lookup.first(self.engine, token_hash=hash_token(token))
        return Annotator(row[0], row[1], bool(row[2])) if row else None

    def revoke_annotator(self, name: str) -> dict[str, int]:
        """Revoke an annotator: their token stops working and their sessions end, on running servers too (every
        request reads the database). Their judgments stay; their unjudged leases are dropped so the slots free up
        at once. Returns counts of what ended. Raises `UserError` for an unknown name."""
        now = time.time()
        with self.write() as conn:
            row = conn.execute(
                select(annotators.c.id, annotators.c.revoked_at).where(annotators.c.name == name.strip())
            ).first()
            if row is None:
                raise UserError(f"no annotator named {name!r}")
            if row.revoked_at is None:
                conn.execute(annotators.update().where(annotators.c.id == row.id).values(revoked_at=now))
            ended = conn.execute(sessions.delete().where(sessions.c.annotator_id == row.id)).rowcount
            leases = conn.execute(assignments.delete().where(
                (assignments.c.annotator_id == row.id) & assignments.c.completed.is_(False)
            )).rowcount
        return {"already_revoked": int(row.revoked_at is not None), "sessions": ended, "leases": leases}

    # -- sessions ------------------------------------------------------------------------------------------------

    def create_session(self, annotator_id: int, lifetime_s: float) -> str:
        """A new browser session for an annotator; returns its id (for the cookie; only the hash is stored).
        Expired sessions of everyone are deleted on the way."""
        session_id = secrets.token_urlsafe(32)
        now = time.time()
        # Not durable: a session lost to a power cut only means signing in again.
        with self.write(durable=False) as conn:
            conn.execute(sessions.delete().where(sessions.c.expires_at <= now))
            conn.execute(sessions.insert().values(
                id=hash_token(session_id), annotator_id=annotator_id, created_at=now, expires_at=now + lifetime_s
            ))
        return session_id

    def session_annotator(self, session_id: str) -> Annotator | None:
        """The annotator of a live session, or None (unknown, ended, expired, or the annotator was revoked)."""
        row = self._session_lookup.first(self.engine, session_hash=hash_token(session_id), now=time.time())
        return Annotator(row[0], row[1], bool(row[2])) if row else None

    def end_session(self, session_id: str) -> bool:
        """Sign out: delete the session. Returns whether it existed."""
        with self.write(durable=False) as conn:
            return conn.execute(sessions.delete().where(sessions.c.id == hash_token(session_id))).rowcount > 0

    def annotator_names(self) -> dict[int, str]:
        with self.read() as conn:
            return {r.id: r.name for r in conn.execute(select(annotators.c.id, annotators.c.name))}

    def csrf_secret(self) -> bytes:
        with self.read() as conn:
            return conn.execute(select(schema_info.c.value).where(schema_info.c.key == "csrf_secret")).scalar_one().encode()

    # -- pairs ---------------------------------------------------------------------------------------------------

    def add_pairs(self, new_pairs: list[NewPair]) -> int:
        """Store pairs whose content is not stored yet; returns how many were added. A pair with text no database
        can store (`NewPair.unstorable`) is left out with a warning in the log; the others are stored."""
        storable = []
        for p in new_pairs:
            problem = p.unstorable()
            if problem:
                log.warning("pair not stored: its %s (prompt starts %r)", problem, str(p.prompt)[:60])
            else:
                storable.append(p)
        if not storable:
            return 0
        now = time.time()
        by_hash = {p.content_hash(): p for p in storable}
        with self.write() as conn:
            existing = set(conn.execute(select(pairs.c.content_hash).where(pairs.c.content_hash.in_(list(by_hash)))).scalars())
            rows = [
                {
                    "prompt": json.dumps(p.prompt),
                    "response_a": p.response_a,
                    "response_b": p.response_b,
                    "source_a": p.source_a,
                    "source_b": p.source_b,
                    "task": p.task,
                    "meta": json.dumps(p.meta) if p.meta is not None else None,
                    "images": json.dumps(p.images) if p.images else None,
                    "gold_label": p.gold_label,
                    "uncertainty": p.uncertainty,
                    "content_hash": h,
                    "created_at": now,
                    "round": p.round,
                }
                for h, p in by_hash.items()
                if h not in existing
            ]
            if rows:
                conn.execute(pairs.insert(), rows)
        return len(rows)

    def count_gold(self) -> int:
        with self.read() as conn:
            return conn.execute(select(func.count()).select_from(pairs).where(pairs.c.gold_label.is_not(None))).scalar_one()

    def count_open_pairs(self, overlap: int, lease_seconds: float) -> int:
        """Regular pairs that still have a judgment slot free (judged + live leases < overlap)."""
        cutoff = time.time() - lease_seconds
        with self.read() as conn:
            return conn.execute(_COUNT_OPEN, {"overlap": overlap, "cutoff": cutoff}).scalar_one()

    def assignment_image(self, annotator_id: int, assignment_id: str, index: int = 0) -> str | None:
        """The image file of the pair behind one of this annotator's assignments (its `index`-th image), or None
        when the assignment is not theirs or its prompt has no such image: what `/image/<assignment>` may serve."""
        with self.read() as conn:
            stored = conn.execute(_ASSIGNMENT_IMAGES, {"assignment_id": assignment_id,
                                                       "annotator_id": annotator_id}).scalar()
        images = _json_or(stored, None) if stored is not None else None
        if not isinstance(images, list) or not 0 <= index < len(images) or not isinstance(images[index], str):
            return None
        return images[index]

    def get_pair(self, pair_id: int) -> dict:
        with self.read() as conn:
            row = conn.execute(select(pairs).where(pairs.c.id == pair_id)).mappings().one()
        return decode_pair(row)

    # -- judgments -----------------------------------------------------------------------------------------------

    def record_judgment(
        self,
        annotator_id: int,
        assignment_id: str,
        side: str,
        strength: int | None,
        rationale: str,
        guidelines_version: str,
        *,
        overlap: int | None = None,
        lease_seconds: float | None = None,
    ) -> StoredJudgment:
        """Store a judgment for an assignment; returns once it is committed (durable).

        Idempotent: resubmitting the same judgment returns the stored one with `duplicate=True`; a different answer
        for an already judged pair raises `ConflictingJudgment`. Raises `UnknownAssignment` for an id that is not
        this annotator's.

        With `overlap` and `lease_seconds` (the server always passes them) a regular pair never ends with more than
        `overlap` judgments. A live lease always has its slot (the assigner leased it inside the overlap); a late
        judgment, on an expired lease, is counted when the pair's judgments plus other live leases still leave a
        slot free, and refused with `SlotTaken` when someone else took the slot meanwhile.
        """
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}")
        if (overlap is None) != (lease_seconds is None):
            raise ValueError("pass overlap and lease_seconds together")
        try:
            with self.write() as conn:
                asg = conn.execute(_ASSIGNMENT, {"assignment_id": assignment_id, "annotator_id": annotator_id}).first()
                if asg is None:
                    raise UnknownAssignment(assignment_id)
                choice = choice_from_side(side, asg.left)
                existing = self._existing_judgment(conn, asg.pair_id, annotator_id)
                if existing is not None:
                    return self._as_duplicate(existing, choice, asg.left)
                if asg.round_closed_at is not None:
                    raise RoundClosed(
                        f"round {asg.round} has closed (the policy that wrote this pair has been trained further), so "
                        "this judgment was not stored; go on with the next pair, which comes from the new policy"
                    )
                cutoff = time.time() - lease_seconds if lease_seconds is not None else None
                if cutoff is not None and asg.gold_label is None and asg.issued_at <= cutoff:
                    # A late judgment: its lease no longer held a slot. (A live lease always has its slot - the
                    # assigner leased it inside the overlap - so only late ones need the count.)
                    others = conn.execute(
                        _LATE_SLOTS, {"cutoff": cutoff, "assignment_id": assignment_id, "pair_id": asg.pair_id}
                    ).scalar_one()
                    if others >= overlap:
                        raise SlotTaken(
                            f"this pair's lease ran out ({lease_seconds:g} s) and its {overlap} judgment slot(s) went to "
                            "other annotators meanwhile, so this judgment was not stored; go on with the next pair"
                        )
                result = conn.execute(judgments.insert(), {
                    "pair_id": asg.pair_id,
                    "annotator_id": annotator_id,
                    "assignment_id": assignment_id,
                    "choice": choice,
                    "left": asg.left,
                    "strength": strength,
                    "rationale": rationale,
                    "guidelines_version": guidelines_version,
                    "created_at": time.time(),
                    "round": asg.round if asg.round is not None else conn.execute(_OPEN_ROUND).scalar(),
                })
                conn.execute(_COMPLETE, {"assignment_id": assignment_id})
                conn.execute(_COUNT_JUDGMENT, {"pair_id": asg.pair_id})
                return StoredJudgment(result.inserted_primary_key[0], duplicate=False)
        except IntegrityError:
            # Another process stored this annotator's judgment of the pair between our check and insert.
            with self.read() as conn:
                pair_id, left = conn.execute(
                    select(assignments.c.pair_id, assignments.c.left).where(assignments.c.id == assignment_id)
                ).one()
                existing = self._existing_judgment(conn, pair_id, annotator_id)
            return self._as_duplicate(existing, choice, left)

    @staticmethod
    def _existing_judgment(conn: Connection, pair_id: int, annotator_id: int):
        return conn.execute(_EXISTING, {"pair_id": pair_id, "annotator_id": annotator_id}).first()

    @staticmethod
    def _as_duplicate(existing, choice: str, left: str) -> StoredJudgment:
        if existing.choice != choice:
            raise ConflictingJudgment(
                f"you already judged this pair ({shown_choice(existing.choice, left)}); the first judgment stands"
            )
        return StoredJudgment(existing.id, duplicate=True)

    def skip(self, annotator_id: int, assignment_id: str) -> bool:
        """Pass on a shown pair: its lease ends now, so the slot is free for others at once, and the assignment
        stays, so the pair is not offered to this annotator again. Returns whether there was such a lease."""
        with self.write(durable=False) as conn:
            return conn.execute(assignments.update().where(
                (assignments.c.id == assignment_id) & (assignments.c.annotator_id == annotator_id)
                & assignments.c.completed.is_(False)
            ).values(issued_at=0.0)).rowcount > 0

    def undo_last(self, annotator_id: int, lease_seconds: float) -> int | None:
        """Take back the annotator's latest judgment, if made within `lease_seconds`: it is deleted and its
        assignment leased to them again from now, so the same pair (in the same order) is what they see next.
        Their other live leases are dropped (the page had shown them the next pair, not judged); the slot count of
        the pair stays within the overlap, as the new lease takes the slot the judgment held. Returns the pair id,
        or None when there is nothing to undo."""
        now = time.time()
        with self.write() as conn:
            last = conn.execute(
                select(judgments.c.id, judgments.c.pair_id, judgments.c.assignment_id, judgments.c.created_at)
                .where(judgments.c.annotator_id == annotator_id).order_by(judgments.c.id.desc()).limit(1)
            ).first()
            if last is None or last.created_at <= now - lease_seconds:
                return None
            conn.execute(assignments.delete().where(
                (assignments.c.annotator_id == annotator_id) & assignments.c.completed.is_(False)
                & (assignments.c.issued_at > now - lease_seconds)
            ))
            conn.execute(judgments.delete().where(judgments.c.id == last.id))
            conn.execute(assignments.update().where(assignments.c.id == last.assignment_id)
                         .values(completed=False, issued_at=now))
            conn.execute(pairs.update().where(pairs.c.id == last.pair_id).values(judged=pairs.c.judged - 1))
            return last.pair_id

    def count_judgments(self, annotator_id: int | None = None) -> int:
        query = select(func.count()).select_from(judgments)
        if annotator_id is not None:
            query = query.where(judgments.c.annotator_id == annotator_id)
        with self.read() as conn:
            return conn.execute(query).scalar_one()

    def judgment_rows(self) -> list[dict]:
        """Every judgment joined with its pair and annotator name, oldest first."""
        query = (
            select(
                judgments.c.id,
                judgments.c.pair_id,
                judgments.c.choice,
                judgments.c.left,
                judgments.c.strength,
                judgments.c.rationale,
                judgments.c.guidelines_version,
                judgments.c.created_at,
                annotators.c.name.label("annotator"),
                pairs.c.prompt,
                pairs.c.response_a,
                pairs.c.response_b,
                pairs.c.source_a,
                pairs.c.source_b,
                pairs.c.task,
                pairs.c.meta,
                pairs.c.images,
                pairs.c.gold_label,
                pairs.c.round,
            )
            .join(pairs, pairs.c.id == judgments.c.pair_id)
            .join(annotators, annotators.c.id == judgments.c.annotator_id)
            .order_by(judgments.c.id)
        )
        with self.read() as conn:
            return [decode_pair(r) for r in conn.execute(query).mappings()]

    def release_leases(self, name_prefix: str) -> int:
        """End the open leases of annotators named `name_prefix`<run id>-<index> (simulated annotators of a run that
        was killed: nobody will judge what they were shown), so their pairs are served again at once. Returns how
        many leases ended."""
        pattern = re.compile(re.escape(name_prefix) + r"[0-9a-f]{6}-\d+")  # sim-<run id>-<index>, nobody else
        with self.write(durable=False) as conn:
            ids = [row.id for row in conn.execute(select(annotators.c.id, annotators.c.name))
                   if pattern.fullmatch(row.name)]
            return conn.execute(assignments.update().where(
                assignments.c.completed.is_(False) & assignments.c.annotator_id.in_(ids) & (assignments.c.issued_at > 0)
            ).values(issued_at=0.0)).rowcount

    # -- rounds (`rlhf loop`) -------------------------------------------------------------------------------------

    def open_round(self, number: int, policy: str) -> None:
        """Make round `number` (pairs sampled from `policy`) the open one, closing every other open round: their
        pairs stop being served and judgments of them are refused. Reopening the open round is a no-op (a resumed
        loop); a closed round stays closed."""
        now = time.time()
        with self.write() as conn:
            policy = str(Path(policy).resolve()) if Path(policy).exists() else policy  # a server elsewhere loads it
            row = conn.execute(select(rounds).where(rounds.c.number == number)).mappings().first()
            if row is not None and row["closed_at"] is not None:
                raise UserError(f"round {number} of this database has closed; a closed round is never reopened")
            if row is not None and row["policy"] != policy:
                raise UserError(f"round {number} of this database samples {row['policy']}, not {policy}")
            conn.execute(rounds.update().where(rounds.c.closed_at.is_(None) & (rounds.c.number != number))
                         .values(closed_at=now))
            if row is None:
                conn.execute(rounds.insert(), {"number": number, "policy": policy, "opened_at": now})

    def close_round(self, number: int) -> None:
        """Close round `number` (no-op when it is closed already)."""
        with self.write() as conn:
            conn.execute(rounds.update().where((rounds.c.number == number) & rounds.c.closed_at.is_(None))
                         .values(closed_at=time.time()))

    def current_round(self) -> tuple[int, str] | None:
        """(number, policy) of the open round, or None."""
        with self.read() as conn:
            row = conn.execute(select(rounds.c.number, rounds.c.policy).where(rounds.c.closed_at.is_(None))
                               .order_by(rounds.c.number.desc())).first()
        return (row.number, row.policy) if row is not None else None

    def count_round_judgments(self, number: int) -> int:
        """Judgments made in round `number` (of its pairs, and of gold items judged while it was open)."""
        with self.read() as conn:
            return conn.execute(select(func.count()).select_from(judgments).where(judgments.c.round == number)).scalar_one()

    def drop_rounds_from(self, number: int) -> int:
        """Delete rounds `number` and later with their pairs, assignments and judgments (a loop rerunning round
        `number` with another policy or config); returns the judgments deleted."""
        with self.write() as conn:
            gone = select(pairs.c.id).where(pairs.c.round >= number)
            deleted = conn.execute(judgments.delete().where(
                judgments.c.pair_id.in_(gone) | (judgments.c.round >= number))).rowcount
            conn.execute(assignments.delete().where(assignments.c.pair_id.in_(gone)))
            conn.execute(pairs.delete().where(pairs.c.round >= number))
            conn.execute(rounds.delete().where(rounds.c.number >= number))
        return deleted

    def round_closed(self, number: int) -> bool:
        """Whether round `number` exists and has closed."""
        with self.read() as conn:
            closed = conn.execute(select(rounds.c.closed_at).where(rounds.c.number == number)).first()
        return closed is not None and closed[0] is not None

    def pair_counts(self) -> dict[str, int]:
        """Pair totals for the progress display."""
        with self.read() as conn:
            total = conn.execute(select(func.count()).select_from(pairs).where(pairs.c.gold_label.is_(None))).scalar_one()
            gold = conn.execute(select(func.count()).select_from(pairs).where(pairs.c.gold_label.is_not(None))).scalar_one()
            judged = conn.execute(
                select(func.count()).select_from(judgments).join(pairs, pairs.c.id == judgments.c.pair_id)
                .where(pairs.c.gold_label.is_(None))
            ).scalar_one()
        return {"pairs": total, "gold_pairs": gold, "regular_judgments": judged}


def decode_pair(row) -> dict:
    """A row mapping with the JSON columns decoded. A prompt that is not JSON is served as the plain text it is,
    unreadable metadata as none, and lone surrogates as U+FFFD: one bad row must not stop serving or export."""
    out = dict(row)
    if "prompt" in out:
        out["prompt"] = clean_text(_json_or(out["prompt"], out["prompt"]))
    if out.get("meta") is not None:
        out["meta"] = clean_text(_json_or(out["meta"], None))
    if "images" in out:
        images = _json_or(out["images"], None) if out["images"] is not None else None
        out["images"] = [i for i in images if isinstance(i, str)] if isinstance(images, list) else []
    return out


def _json_or(text: str, fallback):
    try:
        return json.loads(text)
    except ValueError:
        log.warning("a stored JSON value is not JSON: %r", text[:60])
        return fallback
