"""The HTTP endpoint under hostile input: a real ``Controller`` on a one-process gloo group (the tiny random-weights
llama) behind the real FastAPI app and uvicorn, on an ephemeral loopback port.

Each test names the fault of the hand-written ``http.server`` endpoint it guards. A hypothesis property test
fuzzes the request parser (``http_schema.parse_generate``) with 10,000 bodies.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import psutil
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import make_tiny_model
from hf_adaptive.parallel.engine import Engine
from hf_adaptive.parallel.http_app import HttpSettings, build_app
from hf_adaptive.parallel.http_schema import GenerateRequest, RequestRefused, ServeLimits, parse_generate
from hf_adaptive.parallel.http_server import HttpServer
from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.parallel.rendezvous import DistributedEnv, loopback_store
from hf_adaptive.parallel.requests import Request, tokenize_request
from hf_adaptive.parallel.serve import Controller, Lifecycle, ServeConfig

LIMITS = ServeLimits(max_prompt_tokens=64, max_new_tokens=16, max_body_bytes=4096, max_queued=8,
                     request_timeout_s=60.0, body_timeout_s=1.0)
TOKEN = "t" * 32


@dataclass
class Served:
    base: str
    port: int
    controller: Controller
    lifecycle: Lifecycle
    stop: threading.Event
    run: threading.Thread | None = None


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[Engine, object]]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = make_tiny_model("llama", seed=3)
        yield Engine(model, 0, 1, torch.device("cpu"), [ParallelPlan()]), dist.new_group(backend="gloo")
    finally:
        dist.destroy_process_group()  # later modules fork workers that start their own groups


def _tokenize(vocab: int):
    def tokenize(request: Request) -> None:  # a byte-level text encoding stands in for a checkpoint's tokenizer
        tokenize_request(request, lambda text: [3 + b % (vocab - 3) for b in text.encode()], vocab)
    return tokenize


@contextmanager
def serve(engine, http: HttpSettings = HttpSettings(), limits: ServeLimits = LIMITS, running: bool = True,
          drain_seconds: float = 30.0) -> Iterator[Served]:
    eng, group = engine
    controller = Controller(eng, group, ServeConfig(max_batch_per_replica=4), lambda s: ParallelPlan(),
                            policy=None, static_plan=ParallelPlan())
    controller.start()
    lifecycle = Lifecycle(drain_seconds)
    app = build_app(controller, _tokenize(eng.host_model.config.vocab_size), lambda ids: "", limits, http, lifecycle)
    server = HttpServer(app, http, limits.max_queued).start()
    served = Served(f"http://127.0.0.1:{server.port}", server.port, controller, lifecycle, threading.Event())
    if running:
        served.run = start_controller(served)
    lifecycle.ready.set()
    try:
        yield served
    finally:
        served.stop.set()
        lifecycle.begin_drain("test over")
        if served.run is None:
            served.run = start_controller(served)
        served.run.join(30)
        server.stop()
        assert not served.run.is_alive(), "the controller did not stop"


def start_controller(served: Served) -> threading.Thread:
    thread = threading.Thread(target=served.controller.run,
                              args=(served.stop.is_set, served.lifecycle.drain_deadline_passed), daemon=True)
    thread.start()
    return thread


def _reference(engine, prompt_tokens: int, seed: int, new_tokens: int) -> list[int]:
    """One process's greedy tokens for the synthetic prompt of ``seed``."""
    model = engine[0].host_model
    request = Request("ref", 0.0, new_tokens, prompt_tokens=prompt_tokens, seed=str(seed))
    tokenize_request(request, None, model.config.vocab_size)
    ids = torch.tensor([request.prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_equal_client_ids_never_receive_each_others_tokens(engine):
    """Guards crossed answers: results were keyed by the client's "id", so 4 concurrent requests with one id
    got each other's tokens. Now the server issues the id and results come back by position."""
    seeds = [11, 22, 33, 44]
    refs = {s: _reference(engine, 9 + i, s, 8) for i, s in enumerate(seeds)}
    assert len({tuple(r) for r in refs.values()}) == len(seeds), "the prompts must give distinct outputs"
    with serve(engine) as served:
        def call(i: int) -> dict:
            body = {"id": "same", "seed": seeds[i], "prompt_tokens": 9 + i, "max_new_tokens": 8}
            return httpx.post(f"{served.base}/generate", json=body, timeout=60).json()

        for _ in range(3):
            with ThreadPoolExecutor(4) as pool:
                replies = list(pool.map(call, range(4)))
            assert [r["tokens"] for r in replies] == [refs[s] for s in seeds]
            assert all(r["client_id"] == "same" for r in replies) and len({r["id"] for r in replies}) == 4


@pytest.mark.parametrize("body, status, words", [
    ({"prompt_tokens": 1_000_000_000, "max_new_tokens": 1}, 413, "above this server's limit of 64"),
    ({"prompt_tokens": -5}, 422, "prompt_tokens"),
    ({"prompt_tokens": 5, "max_new_tokens": 17}, 422, "max_new_tokens: 17 is above"),
    ({"prompt_tokens": 5, "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt_tokens": 5, "max_new_tokens": 2.5}, 422, "valid integer"),
    ({"prompt_tokens": True}, 422, "prompt_tokens"),
    ({"prompt": "x", "prompt_tokens": 5}, 422, "exactly one"),
    ({}, 422, "exactly one"),
    ({"prompt_tokens": 5, "admin": True}, 422, "admin: Extra inputs"),
])
def test_bad_values_are_refused_before_any_allocation(engine, body, status, words):
    """Guards the one request that killed the server: {"prompt_tokens": 1e9} built 1e9 token ids before any
    limit applied (rank 0 was OOM-killed); -5 was served. Refusals are immediate and name the field."""
    with serve(engine) as served:
        start = time.perf_counter()
        reply = httpx.post(f"{served.base}/generate", json=body, timeout=10)
        assert time.perf_counter() - start < 2.0
        assert reply.status_code == status and words in reply.json()["error"], reply.text
        assert served.controller.telemetry.requests == []


def _raw(port: int, payload: bytes, timeout_s: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes or answers; a hang fails the test via the timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no answer within {timeout_s}s to {payload[:60]!r}") from None
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks):
                break
    return b"".join(chunks)


@pytest.mark.parametrize("payload, status", [
    (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n", b"400"),
    (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", b"400"),
    (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999\r\n\r\n", b"413"),
    (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\n\xff\xfe\x00", b"400"),
    (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 8\r\n\r\n{\"prom", b"408"),  # stalled
    (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\n[1]", b"422"),
    (b'POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 42\r\n\r\n'
     b'{"prompt_tokens": 5, "max_new_tokens": 1e400}', b"422"),
    (b"GARBAGE\r\n\r\n", b"400"),
])
def test_malformed_http_is_answered_never_hangs(engine, payload, status):
    """Guards Content-Length -1 blocking a handler until the client gave up, and max_new_tokens 1e400 dropping
    the connection with no reply: every malformed request gets a status line."""
    with serve(engine) as served:
        if payload.endswith(b'{"prompt_tokens": 5, "max_new_tokens": 1e400}'):
            payload = payload.replace(b"42", str(len(b'{"prompt_tokens": 5, "max_new_tokens": 1e400}')).encode())
        answer = _raw(served.port, payload)
        assert answer.split(b" ")[1] == status, answer[:200]


def test_full_queue_answers_503_with_retry_after_then_serves_what_it_took(engine):
    """Guards the listen backlog of 5 that reset clients: past ``max_queued`` requests the server answers 503 with
    Retry-After at once, and every request it accepted is served once the controller runs."""
    with serve(engine, running=False) as served:
        body = {"prompt_tokens": 4, "max_new_tokens": 2}
        with ThreadPoolExecutor(LIMITS.max_queued) as pool:
            held = [pool.submit(httpx.post, f"{served.base}/generate", json=body, timeout=60)
                    for _ in range(LIMITS.max_queued)]
            deadline = time.monotonic() + 20
            while served.controller.queued() < LIMITS.max_queued:
                assert time.monotonic() < deadline, [f.result().text for f in held if f.done()]
                time.sleep(0.01)
            extra = httpx.post(f"{served.base}/generate", json=body, timeout=10)
            assert extra.status_code == 503 and extra.headers["retry-after"] == "1", extra.text
            served.run = start_controller(served)
            assert [f.result().status_code for f in held] == [200] * LIMITS.max_queued


def test_drain_deadline_refuses_what_is_left_with_503(engine):
    """Guards the drain: once the deadline passes, queued requests are answered 503 + Retry-After (not dropped)."""
    with serve(engine, running=False, drain_seconds=0.2) as served:
        body = {"prompt_tokens": 3, "max_new_tokens": 2}
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(httpx.post, f"{served.base}/generate", json=body, timeout=60) for _ in range(2)]
            deadline = time.monotonic() + 20
            while served.controller.queued() < 2:
                assert time.monotonic() < deadline, [f.result().text for f in held if f.done()]
                time.sleep(0.01)
            served.lifecycle.begin_drain("test")
            assert httpx.post(f"{served.base}/generate", json=body).status_code == 503
            assert httpx.get(f"{served.base}/ready").status_code == 503
            time.sleep(0.3)
            served.run = start_controller(served)
            replies = [f.result() for f in held]
        assert [r.status_code for r in replies] == [503, 503] and "drain deadline" in replies[0].json()["error"]
        assert all(r.headers["retry-after"] == "1" for r in replies)


def test_shutdown_is_off_by_default_and_token_guarded(engine):
    """Guards the unauthenticated /shutdown that any web page could call."""
    with serve(engine) as served:
        off = httpx.post(f"{served.base}/shutdown")
        assert off.status_code == 404 and "HF_ADAPTIVE_ADMIN_TOKEN" in off.json()["error"]
        assert httpx.get(f"{served.base}/ready").status_code == 200
    with serve(engine, HttpSettings(admin_token=TOKEN)) as served:
        assert httpx.post(f"{served.base}/shutdown", headers={"Authorization": "Bearer wrong"}).status_code == 401
        browser = httpx.post(f"{served.base}/shutdown", headers={"Authorization": f"Bearer {TOKEN}",
                                                                  "Origin": "https://evil.example"})
        assert browser.status_code == 403 and served.lifecycle.draining.is_set() is False
        ok = httpx.post(f"{served.base}/shutdown", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 202 and served.lifecycle.draining.is_set()
        assert httpx.get(f"{served.base}/ready").status_code == 503
    with pytest.raises(ValueError, match="at least 16 characters"):
        HttpSettings(admin_token="short")


@pytest.mark.parametrize("headers, status", [
    ({"Host": "evil.example"}, 403),  # DNS rebinding: a browser on evil.example resolving to 127.0.0.1
    ({"Origin": "http://localhost:8000"}, 403),  # any page, even on this machine
    ({"Origin": "null"}, 403),
    ({"Host": "localhost"}, 200),
])
def test_host_and_origin_are_checked(engine, headers, status):
    """Guards a web page in a local browser driving the server: foreign Host or any Origin is refused."""
    with serve(engine) as served:
        reply = httpx.post(f"{served.base}/generate", json={"prompt_tokens": 3, "max_new_tokens": 1}, headers=headers)
        assert reply.status_code == status, reply.text
    with serve(engine, HttpSettings(allowed_origins=("http://localhost:8000",))) as served:
        reply = httpx.get(f"{served.base}/health", headers={"Origin": "http://localhost:8000"})
        assert reply.status_code == 200


def test_over_long_prompt_is_refused_or_truncated_on_request(engine):
    """Guards the silent cut of a long prompt to its last tokens with a 200 OK: refused (413) unless the request
    sets truncate, and then the answer says how many tokens were dropped."""
    with serve(engine) as served:
        url = f"{served.base}/generate"
        assert httpx.post(url, json={"prompt_tokens": 100}).status_code == 413
        text = "a" * 100  # 100 byte-level tokens
        refused = httpx.post(url, json={"prompt": text})
        assert refused.status_code == 413 and "100 tokens" in refused.json()["error"]
        for body in ({"prompt": text, "truncate": True}, {"prompt_tokens": 100, "truncate": True}):
            reply = httpx.post(url, json=body | {"max_new_tokens": 2}).json()
            assert reply["prompt_tokens"] == 64 and reply["truncated_prompt_tokens"] == 36, reply
        reply = httpx.post(url, json={"prompt": "short", "max_new_tokens": 2}).json()
        assert reply["truncated_prompt_tokens"] == 0 and reply["prompt_tokens"] == 5


def test_readiness_and_prometheus_metrics(engine):
    """Guards the hand-written /metrics: served through prometheus-client, parseable, with the serving counters."""
    from prometheus_client.parser import text_string_to_metric_families

    with serve(engine) as served:
        served.lifecycle.ready.clear()
        assert httpx.get(f"{served.base}/ready").status_code == 503
        assert httpx.post(f"{served.base}/generate", json={"prompt_tokens": 3, "max_new_tokens": 2}).status_code == 503
        served.lifecycle.ready.set()
        assert httpx.get(f"{served.base}/ready").json() == {"ready": True, "plan": "single"}
        assert httpx.post(f"{served.base}/generate", json={"prompt_tokens": 3, "max_new_tokens": 2}).status_code == 200
        text = httpx.get(f"{served.base}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["hf_adaptive_requests"].samples[0].value == 1
    statuses = {(s.labels["route"], s.labels["status"]) for s in families["hf_adaptive_http_responses"].samples
                if s.name.endswith("_total")}
    assert {("/generate", "503"), ("/generate", "200"), ("/ready", "503")} <= statuses
    assert 'hf_adaptive_current_plan{plan="single"} 1.0' in text


def test_everything_binds_loopback_by_default(engine):
    """Guards listening on every interface: the HTTP server and the rendezvous store bind 127.0.0.1 unless told."""
    def listening(port: int) -> set[str]:
        return {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port}

    with serve(engine) as served:
        assert listening(served.port) == {"127.0.0.1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = loopback_store(DistributedEnv(rank=0, world_size=2, master_port=port))
    assert listening(port) == {"127.0.0.1"}
    del store
    assert DistributedEnv.from_environ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node0"}) \
        .single_machine


BODIES = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(list(GenerateRequest.model_fields) + ["x", ""]),
                    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                              st.lists(st.integers(), max_size=3)), max_size=6).map(lambda d: json.dumps(d).encode()),
    st.text(max_size=100).map(str.encode),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(st.lists(BODIES, min_size=20, max_size=20))
def test_request_parser_fuzz(bodies):
    """Property: any body is either a request within the limits or a RequestRefused with a 4xx status and a
    message; never another exception (500 examples of 20 bodies: 10,000 cases)."""
    for body in bodies:
        try:
            request = parse_generate(body, LIMITS)
        except RequestRefused as err:
            assert err.status in (400, 413, 422) and str(err)
            continue
        assert (request.prompt is None) != (request.prompt_tokens is None)
        assert 1 <= request.max_new_tokens <= LIMITS.max_new_tokens
        assert request.prompt_tokens is None or request.truncate or request.prompt_tokens <= LIMITS.max_prompt_tokens
