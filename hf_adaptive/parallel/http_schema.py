"""What ``POST /generate`` accepts, checked before anything is allocated.

Contract: pure (pydantic, no torch, no server). ``parse_generate(body, limits)`` turns the raw body bytes into a
``GenerateRequest`` or raises ``RequestRefused`` carrying the HTTP status and a one-line message that names the
field, the value received, what is allowed and how to fix it. Every number is checked against ``ServeLimits``
here, so ``{"prompt_tokens": 1000000000}`` is refused before a single token id is built, and a non-finite or
fractional number is refused rather than rounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError


DEFAULT_NEW_TOKENS = 32


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask and how much the server holds at once.

    Args:
        max_prompt_tokens: longest prompt served; a longer one is refused, or cut to its last
            ``max_prompt_tokens`` tokens when the request sets ``"truncate": true`` (the response says so).
        max_new_tokens: most tokens one request may ask to generate.
        max_body_bytes: largest request body read; a larger one is refused with 413 before it is read.
        max_queued: requests accepted and not yet answered; one more is refused with 503 and ``Retry-After``.
        request_timeout_s: how long a request may wait for its tokens before a 504.
        body_timeout_s: how long a client may take to send its body before a 408 (a stalled body holds no
            handler for longer).
        retry_after_s: the ``Retry-After`` a refused caller is given.
    """

    max_prompt_tokens: int = 4096
    max_new_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    max_queued: int = 256
    request_timeout_s: float = 600.0
    body_timeout_s: float = 10.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_new_tokens", "max_body_bytes", "max_queued", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("request_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")


class RequestRefused(ValueError):
    """A request the server will not run; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class GenerateRequest(BaseModel):
    """The body of ``POST /generate``: exactly one of ``prompt`` (text) or ``prompt_tokens`` (a synthetic prompt
    of that many ids, seeded by ``seed``, else by ``id``, else by the server's id for the request)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = Field(default=None, min_length=1)
    prompt_tokens: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1, description="default: min(32, the server's limit)")
    id: str | None = Field(default=None, max_length=128, description="the caller's own label, echoed back")
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    truncate: bool = False


def parse_generate(body: bytes, limits: ServeLimits) -> GenerateRequest:
    """Validate a raw ``/generate`` body against the schema and ``limits``; raises ``RequestRefused``."""
    if len(body) > limits.max_body_bytes:
        raise RequestRefused(413, f"body is {len(body)} bytes, above the limit of {limits.max_body_bytes}; "
                                  "send a shorter prompt")
    try:
        request = GenerateRequest.model_validate_json(body or b"{}")
    except ValidationError as err:
        malformed = any(e["type"] == "json_invalid" for e in err.errors())
        raise RequestRefused(400 if malformed else 422, _describe(err)) from None
    if (request.prompt is None) == (request.prompt_tokens is None):
        raise RequestRefused(422, "give exactly one of 'prompt' (text) or 'prompt_tokens' (int >= 1), got "
                                  f"{'both' if request.prompt is not None else 'neither'}")
    if request.max_new_tokens is None:
        request = request.model_copy(update={"max_new_tokens": min(DEFAULT_NEW_TOKENS, limits.max_new_tokens)})
    if request.max_new_tokens > limits.max_new_tokens:
        raise RequestRefused(422, f"max_new_tokens: {request.max_new_tokens} is above this server's limit of "
                                  f"{limits.max_new_tokens}; ask for at most that many")
    if request.prompt_tokens is not None and request.prompt_tokens > limits.max_prompt_tokens \
            and not request.truncate:
        raise prompt_too_long(request.prompt_tokens, limits)
    return request


def prompt_too_long(n_tokens: int, limits: ServeLimits) -> RequestRefused:
    """The refusal of a prompt of ``n_tokens`` above ``limits.max_prompt_tokens`` (413)."""
    return RequestRefused(413, f"prompt: {n_tokens} tokens is above this server's limit of "
                               f"{limits.max_prompt_tokens}; shorten it, or send \"truncate\": true to keep its last "
                               f"{limits.max_prompt_tokens} tokens")


def _describe(err: ValidationError) -> str:
    """One line per pydantic error: field, what was wrong, and the value received (shortened)."""
    parts = []
    for e in err.errors(include_url=False):
        field = ".".join(str(x) for x in e["loc"]) or "body"
        received = repr(e.get("input"))
        received = received if len(received) <= 60 else received[:57] + "..."
        parts.append(f"{field}: {e['msg']} (got {received})")
    allowed = ", ".join(GenerateRequest.model_fields)
    return "; ".join(parts) + f"; fields allowed: {allowed}"
