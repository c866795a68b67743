"""The HTTP front end of rank 0 (FastAPI): ``POST /generate``, ``GET /health``, ``/ready``, ``/metrics``, and the
admin route ``POST /shutdown`` (off unless a token is set).

Contract: talks to the ``Controller`` only through ``submit`` (thread-safe, with a completion callback) and its
telemetry. Every request gets an id issued here (``X-Request-Id`` and ``"id"`` of the answer); the caller's own
``"id"`` is only echoed as ``"client_id"``, so equal client ids cannot mix answers. Before anything is allocated:
the Host and Origin headers are checked (a web page in a local browser cannot drive the server), the body size
and the number of requests in flight are bounded (413; 503 with ``Retry-After``), and the body is validated
(``http_schema.py``: 400/422/413). A prompt longer than the limit is refused (413) unless the request sets
``"truncate": true``; then its last tokens are kept and ``"truncated_prompt_tokens"`` says how many were dropped.
Serving (``http_server.py``) runs this app under uvicorn in a thread of rank 0.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from hf_adaptive.parallel.http_metrics import ServeMetrics
from hf_adaptive.parallel.http_schema import (
    GenerateRequest,
    RequestRefused,
    ServeLimits,
    parse_generate,
    prompt_too_long,
)
from hf_adaptive.parallel.requests import Request
from hf_adaptive.parallel.serve import Controller, Lifecycle, Pending

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
ADMIN_TOKEN_ENV = "HF_ADAPTIVE_ADMIN_TOKEN"


@dataclass(frozen=True)
class HttpSettings:
    """Where the server listens and whom it answers.

    Args:
        host: bind address; loopback by default. Binding a wildcard (``0.0.0.0``) serves every interface.
        port: TCP port; 0 picks a free one (read ``HttpServer.port``).
        admin_token: enables ``POST /shutdown`` for callers sending ``Authorization: Bearer <token>``; None
            (the default) leaves admin routes off (404).
        allowed_hosts: Host header names accepted besides loopback names and ``host`` itself; ``"*"``: any.
        allowed_origins: browser origins (``scheme://host:port``) allowed to call; none by default, so a request
            carrying any ``Origin`` header is refused.
    """

    host: str = "127.0.0.1"
    port: int = 0
    admin_token: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port < 2**16:
            raise ValueError(f"port must be an int in [0, 65535] (0: pick a free one), got {self.port!r}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError(f"admin_token must be at least 16 characters, got {len(self.admin_token)}; "
                             f"e.g. {ADMIN_TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_hex(16))')")

    def host_allowed(self, header: str) -> bool:
        """Whether a Host header (``name[:port]``) names this server (DNS-rebinding guard)."""
        if "*" in self.allowed_hosts:
            return True
        name = header.rsplit("]", 1)[0].lstrip("[") if header.startswith("[") else header.rsplit(":", 1)[0]
        own = set() if self.host in WILDCARD_HOSTS else {self.host}
        return name.lower() in LOOPBACK_HOSTS | own | {h.lower() for h in self.allowed_hosts}


@dataclass
class _Server:
    """What the routes share: the controller and its callbacks, the limits, the settings, the counters."""

    controller: Controller
    tokenize: Callable[[Request], None]
    decode: Callable[[list[int]], str]
    limits: ServeLimits
    settings: HttpSettings
    lifecycle: Lifecycle
    in_flight: int = 0  # requests accepted and not yet answered (touched only from the event loop's thread)
    metrics: ServeMetrics | None = None


def build_app(controller: Controller, tokenize: Callable[[Request], None], decode: Callable[[list[int]], str],
              limits: ServeLimits, settings: HttpSettings, lifecycle: Lifecycle) -> FastAPI:
    """The FastAPI app; ``tokenize`` fills ``request.prompt_ids`` (from text, or synthetic ids)."""
    app = FastAPI(title="hf_adaptive parallel server", docs_url=None, redoc_url=None, openapi_url=None)
    server = _Server(controller, tokenize, decode, limits, settings, lifecycle)
    server.metrics = ServeMetrics(controller, lambda: server.in_flight)

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        response = _check_caller(request, settings) or await call_next(request)
        route = request.url.path if request.url.path in _ROUTES else "other"
        server.metrics.responses.labels(route, str(response.status_code)).inc()
        return response

    _add_status_routes(app, server)
    _add_admin_routes(app, server)
    _add_generate_route(app, server)
    return app


def _add_status_routes(app: FastAPI, server: _Server) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"alive": True}

    @app.get("/ready")
    async def ready() -> Response:
        lifecycle = server.lifecycle
        if lifecycle.ready.is_set() and not lifecycle.draining.is_set():
            return JSONResponse({"ready": True, "plan": server.controller.telemetry.current_plan})
        state = "draining" if lifecycle.draining.is_set() else "starting"
        return _error(503, f"not ready: {state}", server.limits)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)


def _add_admin_routes(app: FastAPI, server: _Server) -> None:
    @app.post("/shutdown")
    async def shutdown(request: HttpRequest) -> Response:
        token = server.settings.admin_token
        if token is None:
            return _error(404, f"admin routes are off; start the server with {ADMIN_TOKEN_ENV} set to enable "
                               "POST /shutdown", server.limits)
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "POST /shutdown needs 'Authorization: Bearer <token>' with the server's admin token",
                          server.limits)
        server.lifecycle.begin_drain("POST /shutdown")
        return JSONResponse({"stopping": True}, status_code=202)


def _add_generate_route(app: FastAPI, server: _Server) -> None:
    @app.post("/generate")
    async def generate(request: HttpRequest) -> Response:
        limits, lifecycle = server.limits, server.lifecycle
        if lifecycle.draining.is_set() or not lifecycle.ready.is_set():
            return _error(503, "the server is not accepting requests (starting or shutting down)", limits)
        if server.in_flight >= limits.max_queued:
            return _error(503, f"the server holds {server.in_flight} requests, its limit (--max-queued); retry "
                               "after the Retry-After seconds", limits)
        server.in_flight += 1
        start = time.perf_counter()
        try:
            return await _generate(request, server)
        except RequestRefused as err:
            return _error(err.status, str(err), limits)
        finally:
            server.in_flight -= 1
            server.metrics.latency.labels("/generate").observe(time.perf_counter() - start)


_ROUTES = frozenset({"/generate", "/health", "/ready", "/metrics", "/shutdown"})


def _check_caller(request: HttpRequest, settings: HttpSettings) -> Response | None:
    host = request.headers.get("host", "")
    if not settings.host_allowed(host):
        return JSONResponse({"error": f"Host {host!r} is not this server's; call it by 127.0.0.1 or localhost, or "
                                      "start it with --allowed-host NAME"}, status_code=403)
    origin = request.headers.get("origin")
    if origin is not None and origin not in settings.allowed_origins:
        return JSONResponse({"error": f"Origin {origin!r} may not call this server (browser pages are refused); "
                                      "start it with --allowed-origin ORIGIN to allow one"}, status_code=403)
    return None


async def _generate(request: HttpRequest, server: _Server) -> Response:
    controller, limits = server.controller, server.limits
    body = await _read_body(request, limits)
    spec = parse_generate(body, limits)
    job, dropped = await run_in_threadpool(_prepare, spec, server.tokenize, limits)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[Pending] = loop.create_future()
    controller.submit(job, on_done=lambda pending: _resolve(loop, answer, pending))
    try:
        pending = await asyncio.wait_for(asyncio.shield(answer), limits.request_timeout_s)
    except TimeoutError:
        raise RequestRefused(504, f"no result within {limits.request_timeout_s} s (--request-timeout-s); "
                                  "the server is overloaded, retry later") from None
    if pending.error is not None:
        status = 503 if pending.refused_for == "shutdown" else 507
        return _error(status, pending.error, limits, request_id=job.id)
    reply = {"id": job.id, "client_id": spec.id, "tokens": pending.tokens,
             "text": await run_in_threadpool(server.decode, pending.tokens), "plan": pending.plan,
             "prompt_tokens": len(job.prompt_ids), "truncated_prompt_tokens": dropped}
    return JSONResponse(reply, headers={"X-Request-Id": job.id})


def _prepare(spec: GenerateRequest, tokenize: Callable[[Request], None],
             limits: ServeLimits) -> tuple[Request, int]:
    """The engine's request for ``spec`` under a fresh server id, and how many prompt tokens truncation dropped."""
    server_id = uuid.uuid4().hex
    seed = str(spec.seed) if spec.seed is not None else spec.id
    n_synthetic = None if spec.prompt_tokens is None else min(spec.prompt_tokens, limits.max_prompt_tokens)
    job = Request(id=server_id, arrival_s=0.0, max_new_tokens=spec.max_new_tokens, prompt=spec.prompt,
                  prompt_tokens=n_synthetic, seed=seed)
    try:
        tokenize(job)
    except ValueError as err:  # e.g. text for a checkpoint without a tokenizer
        raise RequestRefused(422, str(err)) from None
    dropped = (spec.prompt_tokens or 0) - (n_synthetic or 0)
    if len(job.prompt_ids) > limits.max_prompt_tokens:
        if not spec.truncate:
            raise prompt_too_long(len(job.prompt_ids), limits)
        dropped = len(job.prompt_ids) - limits.max_prompt_tokens
        job.prompt_ids = job.prompt_ids[-limits.max_prompt_tokens:]
    return job, dropped


async def _read_body(request: HttpRequest, limits: ServeLimits) -> bytes:
    """The body, read only up to ``limits.max_body_bytes`` (a longer one is refused before it is all read) and
    within ``limits.body_timeout_s`` (a stalled one gets 408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RequestRefused(413, f"Content-Length {declared} is above the limit of {limits.max_body_bytes} bytes")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestRefused(413, f"body is above the limit of {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), limits.body_timeout_s)
    except TimeoutError:
        raise RequestRefused(408, f"the body did not arrive within {limits.body_timeout_s} s") from None
    except ClientDisconnect:
        raise RequestRefused(400, "the client disconnected before sending its whole body") from None


def _resolve(loop: asyncio.AbstractEventLoop, answer: asyncio.Future, pending: Pending) -> None:
    """From the controller's thread: hand ``pending`` to the waiting handler (if its loop still runs)."""
    def settle() -> None:
        if not answer.done():
            answer.set_result(pending)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the server stopped while the request ran: nobody waits for it
        logger.debug("request %s finished after the HTTP server stopped", pending.request.id)


def _error(status: int, message: str, limits: ServeLimits, request_id: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(limits.retry_after_s)} if status in (429, 503) else {}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return JSONResponse({"error": message} | ({"id": request_id} if request_id else {}), status_code=status,
                        headers=headers)
