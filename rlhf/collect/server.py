"""The collection web app: server-rendered pages for annotators and the admin, plus a small JSON API.

Security model:
- Every page and API route needs a credential: `Authorization: Bearer <annotator token>`, or the `rlhf_session`
  cookie that signing in with the token sets. Anything else gets 401 (pages answer with the sign-in form, still
  401). Only `/static` (the app's own CSS/JS, no data) and the sign-in POST itself are open.
- The cookie holds a random session id, never the token; the database stores only hashes of both. Signing out
  deletes the session, and `rlhf collect revoke-annotator` disables the token and deletes the sessions. Nothing is
  cached in the server: every request is checked against the database, so both take effect on the next request.
- Sign-in refuses cross-site requests (login CSRF: a foreign page signing the visitor in as someone else):
  `Sec-Fetch-Site` other than same-origin/none, an `Origin` of another host, and `Origin: null` (sandboxed frames,
  data: URLs) are 403. Clients that send neither header (curl, scripts) may sign in.
- State-changing requests authenticated by cookie must carry the CSRF token (form field `csrf_token` or header
  `X-CSRF-Token`), an HMAC of the session under a per-database secret. Bearer requests need none: a browser never
  attaches that header on its own.
- Model outputs are data: Jinja autoescaping renders them as text, and a strict Content-Security-Policy (no inline
  script, no foreign origins) backs that up. Every response carries the security headers, 413 and 500 included.
- Bodies over `server.max_body_bytes` get 413 before they are read; invalid input (wrong types - no coercion of
  "2" or 2.0 or true to a strength -, NaN, text that is not valid Unicode) gets 4xx and stores nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf.collect.assign import Assigner
from rlhf.collect.pairs import PairFeeder
from rlhf.collect.report import summarize
from rlhf.collect.settings import CollectConfig
from rlhf.collect.storage import Annotator, ConflictingJudgment, SlotTaken, Store, UnknownAssignment, hash_token

HERE = Path(__file__).parent
COOKIE = "rlhf_session"  # a session id
LEGACY_COOKIE = "rlhf_token"  # schema-1 servers kept the token itself here: ignored, and deleted at sign-in/out
MAX_TOKEN_CHARS = 256
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
     b"frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    # Not no-referrer: under it browsers send `Origin: null` even for our own sign-in form, and sign-in refuses
    # null origins. same-origin still sends no referrer to any other site.
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
SAME_SITE_FETCHES = {"same-origin", "none"}  # Sec-Fetch-Site values of a sign-in from our own page or typed by hand


@dataclass(frozen=True)
class Caller:
    annotator: Annotator
    credential: str  # hash of the session id (cookie) or of the token (bearer): what the CSRF token is bound to
    via_cookie: bool


def valid_text(value: str) -> str:
    """Refuse strings that are not valid Unicode (a lone UTF-16 surrogate, which JSON's \\udXXX escapes can
    carry): they cannot be stored or even encoded as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
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


def with_security_headers(response: Response) -> Response:
    """Add the security headers to a response sent outside the middleware (the 500 handler's)."""
    for key, value in SECURITY_HEADERS:
        response.headers.setdefault(key.decode(), value.decode())
    return response


def safe_errors(errors) -> list[dict]:
    """Validation errors as JSON-safe dicts: the rejected input and its context are left out (they may hold NaN
    or a lone surrogate, which cannot be written as JSON), and the location is made printable."""
    out = []
    for err in errors:
        loc = [part if isinstance(part, int) else str(part).encode("utf-8", "replace").decode() for part in err["loc"]]
        out.append({"type": err["type"], "loc": loc, "msg": str(err["msg"]).encode("utf-8", "replace").decode()})
    return out


class SecurityHeaders:
    """ASGI middleware adding the CSP and related headers to every response. Installed outermost (after
    `BodyLimit`), so the limit's 400/413 answers carry them too; the 500 handler adds them itself."""

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
    session_seconds = cfg.server.session_hours * 3600
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

    def csrf_for(who: Caller) -> str:
        return hmac.new(csrf_secret, b"csrf:" + who.credential.encode(), hashlib.sha256).hexdigest()

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

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = safe_errors(exc.errors())
        if not wants_html(request):
            return JSONResponse({"detail": errors}, 422)
        detail = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'request'}: {e['msg']}" for e in errors)
        return render("error.html", 422, status=422, detail=f"invalid request - {detail}")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        # Runs in Starlette's outermost middleware, outside SecurityHeaders: the headers are added here. The
        # exception is logged by the server (Starlette re-raises it after this response is sent).
        if wants_html(request):
            return with_security_headers(PlainTextResponse("Internal Server Error", 500))
        return with_security_headers(JSONResponse({"detail": "internal server error"}, 500))

    async def caller(request: Request) -> Caller:
        """Authenticate the request, and check CSRF on cookie-authenticated state changes."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                raise HTTPException(401, "use Authorization: Bearer <token>")
            token = token.strip()
            if not token or len(token) > MAX_TOKEN_CHARS:
                raise HTTPException(401, "sign in with your annotator token")
            annotator = store.find_annotator(token)  # read every time: a revoked token fails at once
            if annotator is None:
                raise HTTPException(401, "unknown or revoked token")
            return Caller(annotator, "token:" + hash_token(token), via_cookie=False)
        session = request.cookies.get(COOKIE, "").strip()
        if not session or len(session) > MAX_TOKEN_CHARS:
            raise HTTPException(401, "sign in with your annotator token")
        annotator = store.session_annotator(session)
        if annotator is None:
            raise HTTPException(401, "your session ended (signed out, expired or revoked); sign in again")
        who = Caller(annotator, "session:" + hash_token(session), via_cookie=True)
        if request.method in STATE_CHANGING:
            sent = request.headers.get("x-csrf-token")
            if sent is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")
            ):
                sent = (await request.form()).get("csrf_token")
            # Compared as bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a 403).
            if not isinstance(sent, str) or not hmac.compare_digest(
                sent.encode("utf-8", "surrogatepass"), csrf_for(who).encode()
            ):
                raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")
        return who

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
                who.annotator.id, item.assignment_id, item.choice, item.strength, item.rationale, version,
                overlap=assigner.settings.overlap, lease_seconds=assigner.settings.lease_seconds,
            )
        except UnknownAssignment:
            raise HTTPException(404, "unknown assignment") from None
        except (ConflictingJudgment, SlotTaken) as exc:
            raise HTTPException(409, str(exc)) from None
        if feeder is not None:
            feeder.wake()
        return stored.id, stored.duplicate

    # -- pages -----------------------------------------------------------------------------------------------------

    @app.post("/login")
    async def login(request: Request, token: str = Form("", max_length=MAX_TOKEN_CHARS)):
        if not same_site_sign_in(request):
            raise HTTPException(403, "cross-site sign-in refused: sign in from this app's own page")
        annotator = store.find_annotator(token.strip()) if token.strip() else None
        if annotator is None:
            raise HTTPException(401, "unknown or revoked token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, store.create_session(annotator.id, session_seconds), httponly=True,
                            samesite="strict", secure=request.url.scheme == "https", max_age=int(session_seconds))
        response.delete_cookie(LEGACY_COOKIE)
        return response

    @app.post("/logout")
    def logout(request: Request, who: Caller = Depends(caller)):
        if who.via_cookie:
            store.end_session(request.cookies.get(COOKIE, "").strip())
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        response.delete_cookie(LEGACY_COOKIE)
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
            csrf=csrf_for(who),
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
        try:
            item = JudgmentIn(assignment_id=assignment_id, choice=choice, strength=int(strength) if strength else None,
                              rationale=rationale)
        except ValidationError as exc:
            raise HTTPException(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                               for e in safe_errors(exc.errors()))) from None
        store_judgment(who, item)
        return RedirectResponse("/", status_code=303)

    @app.get("/guidelines", response_class=HTMLResponse)
    def guidelines_page(who: Caller = Depends(caller)):
        return render("guidelines.html", me=who.annotator, csrf=csrf_for(who), guidelines=guidelines)

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(who: Caller = Depends(admin)):
        stats = summarize(store.judgment_rows(), cfg.assignment.overlap, store.pair_counts(),
                          bootstrap=min(cfg.export.bootstrap, 100), seed=cfg.seed)
        return render("admin.html", me=who.annotator, csrf=csrf_for(who), stats=stats,
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

    app.add_middleware(BodyLimit, max_bytes=cfg.server.max_body_bytes)
    app.add_middleware(SecurityHeaders)  # added last = outermost: it also sees BodyLimit's own answers
    return app


def same_site_sign_in(request: Request) -> bool:
    """Whether a sign-in POST comes from this app's own page (or from a client that is no browser).

    Refused: `Sec-Fetch-Site` other than same-origin/none (browsers send it on every request; a sibling subdomain
    is `same-site` and refused as well), `Origin: null` (a sandboxed iframe, a data: URL, some redirects: the
    browser hides the origin, so it cannot be ours), and an `Origin` whose host is not the Host this request was
    sent to. Without either header (curl, scripts, very old browsers) the sign-in is allowed: current browsers send
    `Origin` with every POST, and a non-browser client has no victim's cookie jar to plant a session in."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in SAME_SITE_FETCHES:
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin.strip().lower() == "null":
        return False
    try:
        netloc = urlsplit(origin.strip()).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == (request.headers.get("host") or "").lower()
