"""Running an app with uvicorn: `make_server` (what `specdec serve` and the background server share) and
`BackgroundServer`, a server on a thread of this process on a free port of 127.0.0.1 (tests, `bench serve`).

On SIGTERM, Ctrl-C or stop(), the engine loop aborts every request at once (streams end with finish_reason "abort"
and [DONE], plain requests get 503) and refuses new ones, so uvicorn's graceful shutdown finds no open request and
the process exits within a step or two."""

from __future__ import annotations

import socket
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

GRACEFUL_SHUTDOWN_S = 5  # a request still open this long after shutdown began is cancelled


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.config.app.state.server.loop.shutdown()
        super().handle_exit(sig, frame)


def make_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """uvicorn over an app of create_app; one log line per request comes from the app (access log off)."""
    return _Server(uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning",
                                  timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="on"))


class BackgroundServer:
    """`with BackgroundServer(app) as s:` serves app at s.base_url until the block ends."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", startup_timeout: float = 60.0):
        self.app, self.startup_timeout = app, startup_timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.base_url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = make_server(app, host, self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="specdec-http", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server on {self.base_url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.app.state.server.loop.shutdown()
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.sock.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()
