"""The collection web app: server-rendered pages for annotators and the admin, plus a small JSON API.

Security model:
- Every page and API route needs a credential: `Authorization: Bearer <annotator token>`, or the session cookie
  that signing in with the token sets (`rlhf_session`, with the port when not 8765, `__Host-` prefixed over TLS:
  see `routes.auth.cookie_name`). Anything else gets 401 (pages answer with the sign-in form, still
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
  script, no foreign origins) backs that up; invisible and bidi control characters are shown as codes. Every
  response carries the security headers, 413 and 500 included.
- A prompt's image is served by `/image/<assignment>/<n>` (credential required like every page): the client names
  one of its own assignments, never a path, and gets the file the pair store holds for that pair (an absolute path
  the pair source wrote), by an image extension, or 404. So no request reaches any other file, and the page's
  `img-src 'self'` policy needs no data: URLs (an embedded data URI would have needed the CSP loosened, and would
  put every image into the HTML of each page load).
- Bodies over `server.max_body_bytes` get 413 before they are read; invalid input (wrong types - no coercion of
  "2" or 2.0 or true to a strength -, NaN, text that is not valid Unicode or holds NUL) gets 4xx and stores nothing.

The routes live in `rlhf.collect.routes` (sign-in, pages, JSON API, error handlers) and share one `CollectState`
on `app.state.collect`; the body limit and the security headers are ASGI middleware (`rlhf.collect.middleware`).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from rlhf.collect.assign import Assigner
from rlhf.collect.middleware import SECURITY_HEADERS, BodyLimit, SecurityHeaders, TrustedProxy, with_security_headers
from rlhf.collect.pairs import PairFeeder
from rlhf.collect.routes import api, auth, errors, pages
from rlhf.collect.routes.auth import (
    COOKIE, LEGACY_COOKIE, MAX_TOKEN_CHARS, SAME_SITE_FETCHES, STATE_CHANGING, Caller, same_site_sign_in,
)
from rlhf.collect.routes.pages import prompt_turns
from rlhf.collect.routes.state import CollectState, JudgmentIn, safe_errors, valid_text
from rlhf.collect.settings import CollectConfig
from rlhf.collect.storage import Store

# The app's public names, importable from here as well as from the modules that define them.
__all__ = [
    "COOKIE", "LEGACY_COOKIE", "MAX_TOKEN_CHARS", "SAME_SITE_FETCHES", "SECURITY_HEADERS", "STATE_CHANGING",
    "BodyLimit", "Caller", "CollectState", "JudgmentIn", "SecurityHeaders", "create_app", "prompt_turns",
    "safe_errors", "same_site_sign_in", "valid_text", "with_security_headers",
]

HERE = Path(__file__).parent


def create_app(cfg: CollectConfig, store: Store, assigner: Assigner | None = None,
               feeder: PairFeeder | None = None) -> FastAPI:
    """The app for one collection project. The feeder (if any) is started and stopped with the app."""
    state = CollectState.build(cfg, store, assigner, feeder)
    app = FastAPI(title="rlhf collect", docs_url=None, redoc_url=None, openapi_url=None, lifespan=state.lifespan,
                  exception_handlers=errors.HANDLERS)
    app.state.collect = state
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    # The routers' routes go straight into the app's list: since FastAPI 0.137 include_router leaves one opaque
    # wrapper per router in app.routes instead, and the route list is what the every-route-needs-a-token test walks.
    for router in (auth.router, pages.router, api.router):
        app.router.routes.extend(router.routes)
    app.add_middleware(BodyLimit, max_bytes=cfg.server.max_body_bytes)
    app.add_middleware(TrustedProxy, proxies=cfg.server.trusted_proxies)
    app.add_middleware(SecurityHeaders)  # added last = outermost: it also sees BodyLimit's own answers
    return app
