"""What every route shares: one `CollectState` per app (kept on `app.state.collect`), the judgment input model
and the storing of a judgment, which both the form and the API do."""

from __future__ import annotations

import hashlib
import hmac
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlhf.collect.assign import Assigner
from rlhf.collect.pairs import PairFeeder
from rlhf.collect.report import summarize
from rlhf.collect.settings import CollectConfig
from rlhf.collect.storage import ConflictingJudgment, RoundClosed, SlotTaken, Store, UnknownAssignment

if TYPE_CHECKING:
    from rlhf.collect.routes.auth import Caller

TEMPLATES = Path(__file__).parent.parent / "templates"


# Characters that show nothing (or reorder what follows) but change what a text says: C0/C1 controls other than tab,
# line feed and carriage return, soft hyphen, zero-width characters, bidirectional controls, word joiners and
# invisible operators, the BOM, interlinear annotation marks and tag characters. Two responses that look identical
# may differ only in these, and a bidi override can make a wrong answer read as a right one.
INVISIBLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2028\u2029"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000e0000-\U000e007f]"
)


def reveal(text) -> Markup:
    """Jinja filter: the text HTML-escaped, each invisible or bidi control character shown as a marked-up code
    (`<span class="invisible">U+202E</span>`) instead of acting on the text around it."""
    escaped = str(escape(text))
    return Markup(INVISIBLE.sub(lambda m: f'<span class="invisible" title="invisible character">U+{ord(m.group()):04X}</span>',
                                escaped))


def valid_text(value: str) -> str:
    """Refuse strings that are not valid Unicode (a lone UTF-16 surrogate, which JSON's \\udXXX escapes can
    carry): they cannot be stored or even encoded as UTF-8. NUL is refused too: PostgreSQL cannot store or even
    compare it (a query with it as a parameter fails)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


class JudgmentIn(BaseModel):
    """A judgment as the API accepts it; `choice` is relative to the displayed order (left = A). Strict types:
    `"2"`, `2.0` and `true` are not a strength."""

    model_config = ConfigDict(extra="forbid", strict=True)

    assignment_id: str = Field(min_length=1, max_length=64)
    choice: Literal["left", "right", "tie", "both_bad"]
    strength: int | None = Field(None, ge=1, le=3)
    rationale: str = ""

    _valid_text = field_validator("assignment_id", "rationale")(valid_text)


def safe_errors(errors) -> list[dict]:
    """Validation errors as JSON-safe dicts: the rejected input and its context are left out (they may hold NaN
    or a lone surrogate, which cannot be written as JSON), and the location is made printable."""
    out = []
    for err in errors:
        loc = [part if isinstance(part, int) else str(part).encode("utf-8", "replace").decode() for part in err["loc"]]
        out.append({"type": err["type"], "loc": loc, "msg": str(err["msg"]).encode("utf-8", "replace").decode()})
    return out


@dataclass(frozen=True)
class CollectState:
    """One collection project as the routes see it: its config, store, assigner and feeder, and what is derived
    from them once when the app is built."""

    cfg: CollectConfig
    store: Store
    assigner: Assigner
    feeder: PairFeeder | None
    guidelines: str
    version: str
    csrf_secret: bytes
    session_seconds: float
    templates: Environment

    @classmethod
    def build(cls, cfg: CollectConfig, store: Store, assigner: Assigner | None = None,
              feeder: PairFeeder | None = None) -> CollectState:
        return cls(
            cfg=cfg,
            store=store,
            assigner=assigner or Assigner(store, cfg.assignment, seed=cfg.seed),
            feeder=feeder,
            guidelines=cfg.guidelines_text(),
            version=cfg.guidelines.version,
            csrf_secret=store.csrf_secret(),
            session_seconds=cfg.server.session_hours * 3600,
            templates=_environment(),
        )

    @asynccontextmanager
    async def lifespan(self, _app):
        """The app's lifespan: the feeder (if any) runs while the app does."""
        if self.feeder is not None:
            self.feeder.start()
        try:
            yield
        finally:
            if self.feeder is not None:
                self.feeder.stop()

    def csrf_for(self, who: Caller) -> str:
        return hmac.new(self.csrf_secret, b"csrf:" + who.credential.encode(), hashlib.sha256).hexdigest()

    def render(self, name: str, status_code: int = 200, **context) -> HTMLResponse:
        html = self.templates.get_template(name).render(version=self.version, **context)
        return HTMLResponse(html, status_code=status_code)

    def status_when_empty(self) -> str:
        if self.feeder is not None and self.feeder.error:
            return "error"
        if self.feeder is None or self.feeder.exhausted:
            return "done"
        return "waiting"

    def stats(self, rows: list[dict] | None = None) -> dict:
        """The admin summary that the page and the API show (at most 100 bootstrap resamples)."""
        rows = self.store.judgment_rows() if rows is None else rows
        return summarize(rows, self.cfg.assignment.overlap, self.store.pair_counts(),
                         bootstrap=min(self.cfg.export.bootstrap, 100), seed=self.cfg.seed)

    def judgment_target(self, counts: dict[str, int]) -> int | None:
        """The judgments the judging page counts towards: fixed while people judge, not growing as the feeder
        stores pairs. A pair file's size (times the overlap) once its pairs are known, the stored pairs' when no
        more are coming, None for a policy that samples without end."""
        overlap = self.cfg.assignment.overlap
        if self.feeder is None or self.feeder.exhausted:
            return counts["pairs"] * overlap
        total = getattr(self.feeder.source, "total", None)
        return max(total, counts["pairs"]) * overlap if total is not None else None

    def store_judgment(self, who: Caller, item: JudgmentIn) -> tuple[int, bool]:
        max_chars = self.cfg.server.max_rationale_chars
        # A form sends each line break as CRLF while the browser's maxlength counted it as one character: count
        # (and store) breaks as LF so a rationale the page accepted is not refused here.
        rationale = item.rationale.replace("\r\n", "\n")
        if len(rationale) > max_chars:
            raise HTTPException(422, f"rationale longer than {max_chars} characters")
        if "\x00" in rationale:
            raise HTTPException(422, "rationale contains a NUL character")
        try:
            stored = self.store.record_judgment(
                who.annotator.id, item.assignment_id, item.choice, item.strength, rationale, self.version,
                overlap=self.assigner.settings.overlap, lease_seconds=self.assigner.settings.lease_seconds,
            )
        except UnknownAssignment:
            raise HTTPException(404, "unknown assignment") from None
        except (ConflictingJudgment, SlotTaken, RoundClosed) as exc:
            raise HTTPException(409, str(exc)) from None
        if self.feeder is not None:
            self.feeder.wake()
        return stored.id, stored.duplicate


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["reveal"] = reveal
    return env


async def get_state(request: Request) -> CollectState:
    """Dependency: the state of the app serving this request."""
    return request.app.state.collect
