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
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _config(app, log_level: str) -> uvicorn.Config:
    # One worker process: assignment is serialized in-process (see rlhf.collect.assign).
    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5)


def serve_forever(app, host: str, port: int, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    sock = bind(host, port)
    uvicorn.Server(_config(app, log_level)).run(sockets=[sock])


class ServerThread:
    """`with ServerThread(app) as url:` serves `app` on 127.0.0.1 on a free port for the duration of the block."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = bind(host, port)
        self.server = uvicorn.Server(_config(app, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        bound_host, bound_port = self.sock.getsockname()[:2]
        self.url = f"http://{bound_host}:{bound_port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the collection server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
