"""The exception handlers: HTML error pages (401 = the sign-in form) for pages, JSON bodies under `/api/`."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf.collect.middleware import with_security_headers
from rlhf.collect.routes.state import safe_errors


def wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/")


async def http_error(request: Request, exc: StarletteHTTPException):
    headers = dict(exc.headers or {})
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if not wants_html(request):
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)
    render = request.app.state.collect.render
    if exc.status_code == 401:
        response = render("login.html", 401, error=exc.detail if request.method == "POST" else None)
    else:
        response = render("error.html", exc.status_code, status=exc.status_code, detail=exc.detail)
    response.headers.update(headers)
    return response


async def validation_error(request: Request, exc: RequestValidationError):
    errors = safe_errors(exc.errors())
    if not wants_html(request):
        return JSONResponse({"detail": errors}, 422)
    detail = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'request'}: {e['msg']}" for e in errors)
    return request.app.state.collect.render("error.html", 422, status=422, detail=f"invalid request - {detail}")


async def server_error(request: Request, exc: Exception):
    # Runs in Starlette's outermost middleware, outside SecurityHeaders: the headers are added here. The
    # exception is logged by the server (Starlette re-raises it after this response is sent).
    if wants_html(request):
        return with_security_headers(PlainTextResponse("Internal Server Error", 500))
    return with_security_headers(JSONResponse({"detail": "internal server error"}, 500))


HANDLERS = {StarletteHTTPException: http_error, RequestValidationError: validation_error, Exception: server_error}
