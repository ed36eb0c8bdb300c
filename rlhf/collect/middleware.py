"""ASGI middleware of the collection app: the body-size limit, the security headers on every response, and the
forwarded Host/scheme of a trusted reverse proxy."""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response

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


class TrustedProxy:
    """ASGI middleware: for a request whose TCP peer is one of `proxies`, take the host and scheme the browser used
    from `X-Forwarded-Host` / `X-Forwarded-Proto` (the last value: the one the nearest proxy set). Behind a proxy
    that rewrites Host, the sign-in's Origin check and the secure cookie then see what the browser saw. Other
    peers' forwarded headers are ignored: anyone could send them."""

    def __init__(self, app, proxies: list[str]):
        self.app = app
        self.proxies = set(proxies)

    async def __call__(self, scope, receive, send):
        client = scope.get("client")
        if scope["type"] == "http" and self.proxies and client and client[0] in self.proxies:
            headers = dict(scope["headers"])
            host = _last(headers.get(b"x-forwarded-host"))
            proto = _last(headers.get(b"x-forwarded-proto"))
            scope = dict(scope)
            if host:
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", host)]
            if proto in (b"http", b"https"):
                scope["scheme"] = proto.decode()
        return await self.app(scope, receive, send)


def _last(value: bytes | None) -> bytes | None:
    return value.rsplit(b",", 1)[-1].strip().lower() if value else None
