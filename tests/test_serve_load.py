"""Load: 200 concurrent clients against the real 2-process gloo server (adaptive policy, tiny random-weights llama)
while it switches layouts. Every request is answered exactly once, with the tokens of its own prompt, or refused
with a status; none is lost, none crossed, no connection reset. Client-side p50/p99 are printed and written to
``load.json`` in the test's folder.

Guards the hand-written endpoint's faults under load: a listen backlog of 5 reset 10 of 60 concurrent clients,
and results keyed by the client's id crossed between requests (every client here sends the same id).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections import Counter

import httpx
import torch
import torch.multiprocessing as mp

from helpers import make_tiny_model
from hf_adaptive.parallel.requests import Request, tokenize_request
from hf_adaptive.policy.parallel_policy import percentile

CLIENTS = 200
PROMPTS = 40  # distinct (seed, length) prompts; client i sends prompt i % PROMPTS
NEW_TOKENS = 6
TOKEN = "load-test-admin-token-0123456789"


def _prompt(k: int) -> tuple[int, int]:
    """(seed, prompt tokens) of prompt ``k``: every fifth is long, so the policy leaves DP for a splitting layout."""
    return 2000 + k, (60 if k % 5 == 0 else 6 + k % 7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(rank: int, master_port: int, http_port: int, model_dir: str, out: str) -> None:
    from hf_adaptive.parallel.http_app import ADMIN_TOKEN_ENV
    from hf_adaptive.parallel.worker import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), HF_ADAPTIVE_BACKEND="gloo", **{ADMIN_TOKEN_ENV: TOKEN})
    torch.set_num_threads(1)
    main(["--model", model_dir, "--dtype", "float32", "--out", out, "--http-port", str(http_port),
          "--cooldown-s", "0", "--min-dwell-s", "0", "--confirm-s", "0", "--long-context-tokens", "40",
          "--dp-concurrency", "6", "--max-batch", "8", "--drain-seconds", "60"])


def _references(model) -> dict[int, list[int]]:
    refs = {}
    for k in range(PROMPTS):
        seed, n = _prompt(k)
        request = Request("ref", 0.0, NEW_TOKENS, prompt_tokens=n, seed=str(seed))
        tokenize_request(request, None, model.config.vocab_size)
        ids = torch.tensor([request.prompt_ids])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False)
        refs[k] = out[0, ids.shape[1]:].tolist()
    return refs


async def _clients(base: str) -> list[tuple[int, int | None, dict | str, float]]:
    """Fire every client at once; returns (client, status or None on a transport error, body, seconds)."""
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    # long prompts are sent once the first short one is answered: the server has then chosen its layout for the short
    # burst (DP) and is still serving it, so the policy must switch for them, however fast or loaded the host is
    # (a fixed delay let a loaded host see both kinds at once and start on a splitting layout, never switching)
    short_answered = asyncio.Event()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(180.0)) as client:
        async def one(i: int):
            seed, n = _prompt(i % PROMPTS)
            body = {"id": "same-for-all", "seed": seed, "prompt_tokens": n, "max_new_tokens": NEW_TOKENS}
            if n > 40:
                await short_answered.wait()
            start = time.perf_counter()
            try:
                reply = await client.post(f"{base}/generate", json=body)
            except httpx.TransportError as err:
                return i, None, repr(err), time.perf_counter() - start
            finally:
                if n <= 40:
                    short_answered.set()
            return i, reply.status_code, reply.json(), time.perf_counter() - start

        return await asyncio.gather(*(one(i) for i in range(CLIENTS)))


def _wait_ready(base: str, ctx) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert all(p.is_alive() for p in ctx.processes), "a server process died while starting"
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server never became ready")


def test_200_concurrent_clients_across_a_plan_switch(tmp_path):
    model = make_tiny_model("llama", seed=3)
    model_dir = str(tmp_path / "llama")
    model.save_pretrained(model_dir)
    refs = _references(model)
    assert len({tuple(r) for r in refs.values()}) == PROMPTS, "prompts must give distinct outputs to catch crossing"
    http_port = _free_port()
    base = f"http://127.0.0.1:{http_port}"
    ctx = mp.start_processes(_server, args=(_free_port(), http_port, model_dir, str(tmp_path)), nprocs=2,
                             join=False, start_method="fork")
    try:
        _wait_ready(base, ctx)
        results = asyncio.run(_clients(base))
        stop = httpx.post(f"{base}/shutdown", headers={"Authorization": f"Bearer {TOKEN}"})
        assert stop.status_code == 202
        while not ctx.join(timeout=120):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

    resets = [body for _, status, body, _ in results if status is None]
    assert resets == [], f"{len(resets)} transport errors, e.g. {resets[:3]}"
    served = [(i, body) for i, status, body, _ in results if status == 200]
    refused = Counter(status for _, status, _, _ in results if status != 200)
    assert set(refused) <= {429, 503}, refused
    crossed = [i for i, body in served if body["tokens"] != refs[i % PROMPTS]]
    assert crossed == [], f"{len(crossed)} clients got another prompt's tokens"
    report = json.loads((tmp_path / "serve.json").read_text())
    ids = [r["id"] for r in report["requests"]]
    assert sorted(ids) == sorted(body["id"] for _, body in served), "served exactly once, none lost"
    assert len(served) + sum(refused.values()) == CLIENTS
    plans = {body["plan"] for _, body in served}
    assert report["overall"]["switches"] >= 1 and len(plans) >= 2, (report["switches"], plans)
    latencies = [seconds for _, status, _, seconds in results if status == 200]
    summary = {"clients": CLIENTS, "served": len(served), "refused": dict(refused), "lost": 0, "crossed": 0,
               "resets": 0, "plans": sorted(plans), "switches": report["overall"]["switches"],
               "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99)}
    (tmp_path / "load.json").write_text(json.dumps(summary, indent=1))
    print(f"\nload: {summary}")
