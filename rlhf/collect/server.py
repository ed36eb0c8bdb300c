"""The collection web app: server-rendered pages for annotators and the admin, plus a small JSON API.

Security model:
- Every page and API route needs an annotator token: `Authorization: Bearer <token>` or the `rlhf_token` cookie set
  by signing in. Anything else gets 401 (pages answer with the sign-in form, still 401). Only `/static` (the app's
  own CSS/JS, no data) and the sign-in POST itself are open.
- State-changing requests authenticated by cookie must carry the CSRF token (form field `csrf_token` or header
  `X-CSRF-Token`), an HMAC of the annotator's token under a per-database secret. Bearer requests need none: a
  browser never attaches that header on its own.
- Model outputs are data: Jinja autoescaping renders them as text, and a strict Content-Security-Policy (no inline
  script, no foreign origins) backs that up.
- Bodies over `server.max_body_bytes` get 413 before they are read; invalid input gets 4xx and stores nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf.collect.assign import Assigner
from rlhf.collect.pairs import PairFeeder
from rlhf.collect.report import summarize
from rlhf.collect.settings import CollectConfig
from rlhf.collect.storage import Annotator, ConflictingJudgment, Store, UnknownAssignment, hash_token

HERE = Path(__file__).parent
COOKIE = "rlhf_token"
MAX_TOKEN_CHARS = 256
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
     b"frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass(frozen=True)
class Caller:
    annotator: Annotator
    token: str
    via_cookie: bool


class JudgmentIn(BaseModel):
    """A judgment as the API accepts it; `choice` is relative to the displayed order (left = A)."""

    model_config = ConfigDict(extra="forbid")

    assignment_id: str = Field(min_length=1, max_length=64)
    choice: Literal["left", "right", "tie", "both_bad"]
    strength: int | None = Field(None, ge=1, le=3)
    rationale: str = ""


class BodyLimit:
    """ASGI middleware: refuse bodies larger than `max_bytes` (by Content-Length, or while streaming)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await JSONResponse({"detail": "invalid Content-Length"}, 400)(scope, receive, send)
            if int(declared) > self.max_bytes:
                return await JSONResponse({"detail": "request body too large"}, 413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, "request body too large")
            return message

        await self.app(scope, limited_receive, send)


class SecurityHeaders:
    """ASGI middleware adding the CSP and related headers to every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def prompt_turns(prompt) -> list[tuple[str, str]]:
    """A stored prompt as (role, text) turns: chat prompts keep their roles, a plain string is one 'prompt' turn."""
    if isinstance(prompt, list):
        return [(str(m.get("role", "?")), str(m.get("content", ""))) for m in prompt if isinstance(m, dict)]
    return [("prompt", str(prompt))]


def create_app(cfg: CollectConfig, store: Store, assigner: Assigner | None = None,
               feeder: PairFeeder | None = None) -> FastAPI:
    """The app for one collection project. The feeder (if any) is started and stopped with the app."""
    assigner = assigner or Assigner(store, cfg.assignment, seed=cfg.seed)
    guidelines = cfg.guidelines_text()
    version = cfg.guidelines.version
    csrf_secret = store.csrf_secret()
    known: dict[str, Annotator] = {}  # token hash -> annotator; tokens are never revoked, so this cache stays true
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True, default_for_string=True)
    )

    def lifespan(_app):
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def run():
            if feeder is not None:
                feeder.start()
            try:
                yield
            finally:
                if feeder is not None:
                    feeder.stop()

        return run()

    app = FastAPI(title="rlhf collect", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def csrf_for(token: str) -> str:
        return hmac.new(csrf_secret, b"csrf:" + hash_token(token).encode(), hashlib.sha256).hexdigest()

    def render(name: str, status_code: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(templates.get_template(name).render(version=version, **context), status_code=status_code)

    def wants_html(request: Request) -> bool:
        return not request.url.path.startswith("/api/")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if not wants_html(request):
            return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)
        if exc.status_code == 401:
            response = render("login.html", 401, error=exc.detail if request.method == "POST" else None)
        else:
            response = render("error.html", exc.status_code, status=exc.status_code, detail=exc.detail)
        response.headers.update(headers)
        return response

    async def caller(request: Request) -> Caller:
        """Authenticate the request, and check CSRF on cookie-authenticated state changes."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                raise HTTPException(401, "use Authorization: Bearer <token>")
            via_cookie = False
        else:
            token, via_cookie = request.cookies.get(COOKIE, ""), True
        token = token.strip()
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise HTTPException(401, "sign in with your annotator token")
        annotator = known.get(hash_token(token))
        if annotator is None:
            annotator = store.find_annotator(token)
            if annotator is None:
                raise HTTPException(401, "unknown token")
            known[hash_token(token)] = annotator
        if via_cookie and request.method in STATE_CHANGING:
            sent = request.headers.get("x-csrf-token")
            if sent is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")
            ):
                sent = (await request.form()).get("csrf_token")
            if not isinstance(sent, str) or not hmac.compare_digest(sent, csrf_for(token)):
                raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")
        return Caller(annotator, token, via_cookie)

    def admin(who: Caller = Depends(caller)) -> Caller:
        if not who.annotator.is_admin:
            raise HTTPException(403, "admin token required")
        return who

    def status_when_empty() -> str:
        if feeder is not None and feeder.error:
            return "error"
        if feeder is None or feeder.exhausted:
            return "done"
        return "waiting"

    def store_judgment(who: Caller, item: JudgmentIn) -> tuple[int, bool]:
        if len(item.rationale) > cfg.server.max_rationale_chars:
            raise HTTPException(422, f"rationale longer than {cfg.server.max_rationale_chars} characters")
        if "\x00" in item.rationale:
            raise HTTPException(422, "rationale contains a NUL character")
        try:
            stored = store.record_judgment(
                who.annotator.id, item.assignment_id, item.choice, item.strength, item.rationale, version
            )
        except UnknownAssignment:
            raise HTTPException(404, "unknown assignment") from None
        except ConflictingJudgment as exc:
            raise HTTPException(409, str(exc)) from None
        if feeder is not None:
            feeder.wake()
        return stored.id, stored.duplicate

    # -- pages -----------------------------------------------------------------------------------------------------

    @app.post("/login")
    async def login(request: Request, token: str = Form("", max_length=MAX_TOKEN_CHARS)):
        origin = request.headers.get("origin")
        if origin not in (None, "null") and origin.split("://", 1)[-1] != request.headers.get("host"):
            raise HTTPException(403, "cross-site sign-in refused")
        if not token.strip() or store.find_annotator(token.strip()) is None:
            raise HTTPException(401, "unknown token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", max_age=30 * 24 * 3600)
        return response

    @app.post("/logout")
    def logout(who: Caller = Depends(caller)):
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/", response_class=HTMLResponse)
    def judge_page(who: Caller = Depends(caller)):
        item = assigner.next_for(who.annotator.id)
        counts = store.pair_counts()
        return render(
            "judge.html",
            item=item,
            turns=prompt_turns(item.prompt) if item else [],
            me=who.annotator,
            csrf=csrf_for(who.token),
            mine=store.count_judgments(who.annotator.id),
            overall=counts["regular_judgments"],
            target=counts["pairs"] * cfg.assignment.overlap,
            empty_status=None if item else status_when_empty(),
            feeder_error=feeder.error if feeder else None,
            max_rationale=cfg.server.max_rationale_chars,
        )

    @app.post("/judge")
    def judge_form(
        who: Caller = Depends(caller),
        assignment_id: str = Form(..., max_length=64),
        choice: Literal["left", "right", "tie", "both_bad"] = Form(...),
        strength: str = Form(""),
        rationale: str = Form(""),
    ):
        if strength not in ("", "1", "2", "3"):
            raise HTTPException(422, "strength must be 1, 2 or 3")
        item = JudgmentIn(assignment_id=assignment_id, choice=choice, strength=int(strength) if strength else None,
                          rationale=rationale)
        store_judgment(who, item)
        return RedirectResponse("/", status_code=303)

    @app.get("/guidelines", response_class=HTMLResponse)
    def guidelines_page(who: Caller = Depends(caller)):
        return render("guidelines.html", me=who.annotator, csrf=csrf_for(who.token), guidelines=guidelines)

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(who: Caller = Depends(admin)):
        stats = summarize(store.judgment_rows(), cfg.assignment.overlap, store.pair_counts(),
                          bootstrap=min(cfg.export.bootstrap, 100), seed=cfg.seed)
        return render("admin.html", me=who.annotator, csrf=csrf_for(who.token), stats=stats,
                      feeder=feeder, overlap=cfg.assignment.overlap)

    # -- JSON API --------------------------------------------------------------------------------------------------

    @app.get("/api/next")
    def api_next(who: Caller = Depends(caller)):
        item = assigner.next_for(who.annotator.id)
        if item is None:
            return {"assignment": None, "status": status_when_empty()}
        return {
            "assignment": {"id": item.id, "prompt": item.prompt, "left": item.left, "right": item.right},
            "guidelines_version": version,
            "status": "ok",
        }

    @app.post("/api/judgments")
    def api_judgment(item: JudgmentIn, who: Caller = Depends(caller)):
        judgment_id, duplicate = store_judgment(who, item)
        return JSONResponse({"judgment_id": judgment_id, "duplicate": duplicate}, status_code=200 if duplicate else 201)

    @app.get("/api/stats")
    def api_stats(who: Caller = Depends(admin)):
        return summarize(store.judgment_rows(), cfg.assignment.overlap, store.pair_counts(),
                         bootstrap=min(cfg.export.bootstrap, 100), seed=cfg.seed)

    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit, max_bytes=cfg.server.max_body_bytes)
    return app
