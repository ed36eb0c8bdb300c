"""Who is calling: the bearer-token / session-cookie dependencies (with the CSRF check), and sign-in/out."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse

from rlhf.collect.routes.state import CollectState, get_state
from rlhf.collect.storage import Annotator, hash_token

COOKIE = "rlhf_session"  # a session id; the default name (server.cookie_name: other ports add theirs)
LEGACY_COOKIE = "rlhf_token"  # schema-1 servers kept the token itself here: ignored, and deleted at sign-in/out
MAX_TOKEN_CHARS = 256
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
SAME_SITE_FETCHES = {"same-origin", "none"}  # Sec-Fetch-Site values of a sign-in from our own page or typed by hand

router = APIRouter()


@dataclass(frozen=True)
class Caller:
    annotator: Annotator
    credential: str  # hash of the session id (cookie) or of the token (bearer): what the CSRF token is bound to
    via_cookie: bool


async def caller(request: Request, state: CollectState = Depends(get_state)) -> Caller:
    """Authenticate the request, and check CSRF on cookie-authenticated state changes."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            raise HTTPException(401, "use Authorization: Bearer <token>")
        token = token.strip()
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise HTTPException(401, "sign in with your annotator token")
        annotator = state.store.find_annotator(token)  # read every time: a revoked token fails at once
        if annotator is None:
            raise HTTPException(401, "unknown or revoked token")
        return Caller(annotator, "token:" + hash_token(token), via_cookie=False)
    session = request.cookies.get(cookie_name(request, state), "").strip()
    if not session or len(session) > MAX_TOKEN_CHARS:
        raise HTTPException(401, "sign in with your annotator token")
    annotator = state.store.session_annotator(session)
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
            sent.encode("utf-8", "surrogatepass"), state.csrf_for(who).encode()
        ):
            raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")
    return who


def admin(who: Caller = Depends(caller)) -> Caller:
    if not who.annotator.is_admin:
        raise HTTPException(403, "admin token required")
    return who


@router.post("/login")
async def login(request: Request, token: str = Form("", max_length=MAX_TOKEN_CHARS),
                state: CollectState = Depends(get_state)):
    if not same_site_sign_in(request):
        raise HTTPException(403, "cross-site sign-in refused: sign in from this app's own page")
    annotator = state.store.find_annotator(token.strip()) if token.strip() else None
    if annotator is None:
        raise HTTPException(401, "unknown or revoked token")
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(cookie_name(request, state), state.store.create_session(annotator.id, state.session_seconds),
                        httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/",
                        max_age=int(state.session_seconds))
    response.delete_cookie(LEGACY_COOKIE)
    return response


@router.post("/logout")
def logout(request: Request, who: Caller = Depends(caller), state: CollectState = Depends(get_state)):
    name = cookie_name(request, state)
    if who.via_cookie:
        state.store.end_session(request.cookies.get(name, "").strip())
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(name, secure=request.url.scheme == "https")
    response.delete_cookie(LEGACY_COOKIE)
    return response


def cookie_name(request: Request, state: CollectState) -> str:
    """The session cookie of this server. Over TLS it carries the `__Host-` prefix: browsers accept such a cookie
    only from a secure origin, for this host alone and for path /, so a plain-HTTP service on another port of the
    same host (or a sibling subdomain) cannot plant one and sign the visitor in as someone else. Over plain HTTP
    nothing stops that; the page shows the signed-in name in its header for the visitor to check."""
    name = state.cfg.server.session_cookie()
    return "__Host-" + name if request.url.scheme == "https" else name


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
