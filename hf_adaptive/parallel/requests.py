"""Requests, JSONL traces and the DP router.

Contract: plain data, no torch and no processes. A trace line is
``{"id": str, "arrival_s": float, "prompt": str | "prompt_tokens": int, "max_new_tokens": int}``;
``prompt_tokens`` asks for a synthetic prompt of that many token ids (deterministic per id), which is
how the long-document and batch scenarios are sized without shipping text.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hf_adaptive.parallel.trace_file import trace_rows


@dataclass
class Request:
    """One generation request; ``prompt_ids`` are token ids (filled in before it reaches the engine)."""

    id: str
    arrival_s: float
    max_new_tokens: int
    prompt: str | None = None
    prompt_tokens: int | None = None
    prompt_ids: list[int] = field(default_factory=list)
    seed: str | None = None  # seeds a synthetic ``prompt_tokens`` prompt; None: the id does

    @property
    def total_tokens(self) -> int:
        """Prompt plus new tokens: the token ids once filled in, else the trace's ``prompt_tokens``."""
        return (len(self.prompt_ids) or int(self.prompt_tokens or 0)) + self.max_new_tokens


def load_trace(path: str | Path) -> list[Request]:
    """Read a JSONL trace, sorted by arrival time; every field is checked (``trace_file.trace_rows``)."""
    return sorted((Request(**fields) for fields in trace_rows(path)), key=lambda r: r.arrival_s)


def write_trace(path: str | Path, requests: Sequence[Request]) -> None:
    """Write requests as JSONL (the inverse of ``load_trace``)."""
    lines = []
    for r in requests:
        row = {"id": r.id, "arrival_s": round(r.arrival_s, 4), "max_new_tokens": r.max_new_tokens}
        row.update({"prompt": r.prompt} if r.prompt is not None else {"prompt_tokens": r.prompt_tokens})
        lines.append(json.dumps(row))
    Path(path).write_text("\n".join(lines) + "\n")


def tokenize_request(request: Request, encode: Callable[[str], list[int]], vocab_size: int,
                     max_prompt_tokens: int | None = None) -> None:
    """Fill ``request.prompt_ids`` from its text, or synthetic ids (seeded by the id) for ``prompt_tokens``."""
    if request.prompt is not None:
        ids = encode(request.prompt)
    else:
        rng = random.Random(zlib.crc32((request.seed or request.id).encode()))
        ids = [rng.randrange(3, vocab_size) for _ in range(int(request.prompt_tokens))]
    if max_prompt_tokens is not None:
        ids = ids[-max_prompt_tokens:]
    request.prompt_ids = ids or [0]


def route(requests: Sequence[Request], replicas: int) -> list[list[Request]]:
    """Split a batch over ``replicas`` DP replicas, balancing total tokens (longest first, least loaded)."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    buckets: list[list[Request]] = [[] for _ in range(replicas)]
    loads = [0] * replicas
    for r in sorted(requests, key=lambda r: -r.total_tokens):
        i = loads.index(min(loads))
        buckets[i].append(r)
        loads[i] += r.total_tokens
    return buckets
