"""Running the app under uvicorn: in the foreground (`rlhf collect serve`) or on a background thread (simulation,
the pipeline stage and tests), always on a real TCP socket."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from rlhf.errors import UserError


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket; port 0 picks a free port. Binding here (not in uvicorn) reports the real port."""
    # IPPROTO_TCP named explicitly: asyncio turns Nagle off (TCP_NODELAY) only on connections whose socket says
    # it is TCP, and a socket made with proto 0 does not. With Nagle on, a response written in two parts waits for
    # the client's delayed ACK: ~40 ms on every keep-alive request after the first. The listener's own
    # TCP_NODELAY is inherited by accepted connections on Linux, for servers that do not use asyncio's transports.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _config(app, log_level: str) -> uvicorn.Config:
    # One worker process: assignment is serialized in-process (see rlhf.collect.assign). Forwarded headers are the
    # app's business (server.trusted_proxies): uvicorn's own handling would hide which peer sent them.
    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                          proxy_headers=False)


def claim(app):
    """Claim the collection app's database for this server (`Store.claim_server`); returns the release."""
    state = getattr(app.state, "collect", None)
    return state.store.claim_server() if state is not None else (lambda: None)


def serve_forever(app, host: str, port: int, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    release = claim(app)
    try:
        sock = bind(host, port)
        uvicorn.Server(_config(app, log_level)).run(sockets=[sock])
    finally:
        release()


class ServerThread:
    """`with ServerThread(app) as url:` serves `app` on 127.0.0.1 on a free port for the duration of the block."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.release = claim(app)
        try:
            self.sock = bind(host, port)
        except BaseException:
            self.release()
            raise
        self.server = uvicorn.Server(_config(app, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        bound_host, bound_port = self.sock.getsockname()[:2]
        self.url = f"http://{bound_host}:{bound_port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.release()
                raise RuntimeError("the collection server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.release()
