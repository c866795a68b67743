"""A small HTTP front end on 127.0.0.1 for the controller: ``POST /generate``, ``GET /metrics``, ``POST /shutdown``.

Contract: runs in a background thread of rank 0 and only talks to the ``Controller`` through
``submit`` (thread-safe) and its telemetry. ``/generate`` takes ``{"prompt": str}`` or
``{"prompt_tokens": int}`` plus ``"max_new_tokens"`` and answers ``{"id", "tokens", "text", "plan"}``.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hf_adaptive.parallel.requests import Request
from hf_adaptive.parallel.serve import Controller

logger = logging.getLogger(__name__)


def make_server(controller: Controller, prepare: Callable[[Request], None], decode: Callable[[list[int]], str],
                port: int, stop_event: threading.Event, timeout_s: float = 600.0) -> ThreadingHTTPServer:
    """Bind ``127.0.0.1:port`` (0 picks a free port; read ``server.server_address``)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args) -> None:  # route access logs through logging
            logger.debug(fmt, *args)

        def _reply(self, code: int, body: str, ctype: str = "application/json") -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._reply(200, controller.telemetry.prometheus(), "text/plain; version=0.0.4")
            else:
                self._reply(404, json.dumps({"error": f"unknown path {self.path}; use /generate or /metrics"}))

        def do_POST(self) -> None:
            if self.path == "/shutdown":
                stop_event.set()
                self._reply(200, json.dumps({"stopping": True}))
                return
            if self.path != "/generate":
                self._reply(404, json.dumps({"error": f"unknown path {self.path}; use /generate or /metrics"}))
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                request = _request_from(body)
                prepare(request)
            except (ValueError, TypeError) as err:
                self._reply(400, json.dumps({"error": str(err)}))
                return
            pending = controller.submit(request)
            if not pending.done.wait(timeout_s):
                self._reply(504, json.dumps({"error": f"no result within {timeout_s}s"}))
                return
            if pending.error is not None:  # cannot fit any layout's memory: refused, with the reason and the fix
                self._reply(507, json.dumps({"id": request.id, "error": pending.error}))
                return
            self._reply(200, json.dumps({"id": request.id, "tokens": pending.tokens,
                                         "text": decode(pending.tokens), "plan": pending.plan}))

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def _request_from(body: dict) -> Request:
    if ("prompt" in body) == ("prompt_tokens" in body):
        raise ValueError(f"give exactly one of 'prompt' (text) or 'prompt_tokens' (int); got keys {sorted(body)}")
    max_new = int(body.get("max_new_tokens", 32))
    if max_new < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    return Request(id=str(body.get("id") or uuid.uuid4().hex[:12]), arrival_s=0.0, max_new_tokens=max_new,
                   prompt=body.get("prompt"), prompt_tokens=body.get("prompt_tokens"))
