"""Run the FastAPI app (``http_app.py``) under uvicorn in a background thread of rank 0.

Contract: ``HttpServer.start`` binds the socket itself (so a port in use fails here, with the address, and
port 0 resolves before serving starts), then serves it from a daemon thread; ``stop`` asks uvicorn to finish
open responses and waits for the thread. uvicorn answers past ``concurrency_limit`` connections with 503 rather
than letting the kernel reset them; the listen backlog is ``backlog``.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn
from fastapi import FastAPI

from hf_adaptive.parallel.http_app import LOOPBACK_HOSTS, HttpSettings

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 2048
EXTRA_CONNECTIONS = 64  # above max_queued: room for /health, /ready and /metrics while /generate is full
START_TIMEOUT_S = 30.0


class HttpServer:
    """One uvicorn server on ``settings.host:settings.port``; ``port`` is the bound one."""

    def __init__(self, app: FastAPI, settings: HttpSettings, max_queued: int) -> None:
        self.settings = settings
        self._socket = _bind(settings.host, settings.port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", backlog=LISTEN_BACKLOG, timeout_keep_alive=5,
                                limit_concurrency=max_queued + EXTRA_CONNECTIONS, lifespan="off",
                                timeout_graceful_shutdown=10)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http", daemon=True)

    def start(self) -> HttpServer:
        self._thread.start()
        for _ in range(int(START_TIMEOUT_S / 0.01)):
            if self._server.started or not self._thread.is_alive():
                break
            self._thread.join(0.01)
        if not self._server.started:
            raise RuntimeError(f"the HTTP server on {self.settings.host}:{self.port} did not start within "
                               f"{START_TIMEOUT_S} s; see the log above")
        logger.info("serving on http://%s:%d", _url_host(self.settings.host), self.port)
        if self.settings.host not in LOOPBACK_HOSTS:
            logger.warning("listening on %s, not loopback: every host that reaches this address can send requests "
                           "(put an authenticating proxy in front; see docs/serving.md)", self.settings.host)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop accepting, let open responses finish, and wait for the server thread."""
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --http-port "
                         "(0 picks a free one) or --http-host") from None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
