"""Two real gloo processes on CPU: TP=2, PP=2 and DP=2 of tiny models give one process's greedy tokens,
and the adaptive serving loop re-shards live (trace + HTTP) without losing or changing any request.

One pair of forked processes runs everything; CPU only (no CUDA is initialised before the fork).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import make_tiny_model

PROMPT_LENS = (12, 9, 5, 12)
NEW_TOKENS = 10


def _prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of 4 prompts of different lengths."""
    gen = torch.Generator().manual_seed(7)
    width = max(PROMPT_LENS)
    ids = torch.zeros(len(PROMPT_LENS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(PROMPT_LENS):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, width - n:] = 1
    return ids, mask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _equivalence(rank: int, model_dir: str) -> dict:
    from hf_adaptive.parallel.engine import Engine
    from hf_adaptive.parallel.plans import ParallelPlan
    from hf_adaptive.parallel.requests import Request, route
    from hf_adaptive.parallel.worker import load_host_model

    model, _ = load_host_model(model_dir, "float32")
    ids, mask = _prompts(model.config.vocab_size)
    plans = [ParallelPlan(tp=2), ParallelPlan(pp=2), ParallelPlan(dp=2)]
    engine = Engine(model, rank, 2, torch.device("cpu"), plans)
    out = {}
    for plan in plans:
        engine.reshard(plan)
        rows = list(range(len(PROMPT_LENS)))
        if plan.dp > 1:  # each replica decodes only the rows the router gives it
            reqs = [Request(str(i), 0.0, NEW_TOKENS, prompt_ids=[0] * PROMPT_LENS[i]) for i in rows]
            rows = [int(r.id) for r in route(reqs, plan.dp)[engine.shard.dp_index]]
        tokens = engine.generate(ids[rows], mask[rows], NEW_TOKENS)
        gathered = [None, None]
        dist.all_gather_object(gathered, dict(zip(rows, tokens.tolist())))
        out[plan.name] = {k: v for part in gathered for k, v in part.items()}
    return out


def _serve(rank: int, model_dir: str, trace: str, http_port: int) -> dict | None:
    from hf_adaptive.parallel.worker import main

    argv = ["--model", model_dir, "--dtype", "float32", "--trace", trace, "--out", os.path.dirname(trace),
            "--cooldown-s", "0", "--min-dwell-s", "0", "--confirm-s", "0", "--long-context-tokens", "40",
            "--dp-concurrency", "6", "--max-batch", "4", "--http-port", str(http_port), "--serve-seconds", "2"]
    if rank == 0:
        import threading

        def poke() -> None:  # one request through HTTP while the trace is being served
            body = json.dumps({"prompt_tokens": 7, "max_new_tokens": 5, "id": "http-1"}).encode()
            for _ in range(100):
                try:
                    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/generate", data=body)
                    reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
                    metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics").read().decode()
                    with open(trace + ".http.json", "w") as f:
                        json.dump({"reply": reply, "metrics": metrics}, f)
                    return
                except OSError:
                    import time

                    time.sleep(0.1)

        threading.Thread(target=poke, daemon=True).start()
    main(argv)  # re-initialises its own process group (the equivalence part destroyed ours)


def _worker(rank: int, port: int, model_dirs: list[str], trace: str, http_port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), HF_ADAPTIVE_BACKEND="gloo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {d: _equivalence(rank, d) for d in model_dirs}
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port + 1)
    _serve(rank, model_dirs[0], trace, http_port)
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)


def _reference(model, ids, mask) -> list[list[int]]:
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, ids.shape[1]:].tolist()


def _write_trace(path: str) -> list[dict]:
    rows = [{"id": f"short{i}", "arrival_s": 0.0, "prompt_tokens": 6, "max_new_tokens": 4} for i in range(10)]
    rows += [{"id": f"long{i}", "arrival_s": 0.6, "prompt_tokens": 60, "max_new_tokens": 4} for i in range(3)]
    rows += [{"id": f"mid{i}", "arrival_s": 1.2, "prompt_tokens": 12, "max_new_tokens": 4} for i in range(3)]
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def test_tp_pp_dp_match_single_process_and_serving_reshards(tmp_path):
    """Guards sharding bugs (wrong KV-group slices, missing all-reduce, stage layer renumbering, pipeline
    send/recv order, DP routing) by comparing every plan's greedy tokens with one process's HF generate,
    and guards the serving loop against lost or corrupted requests across live re-shards (trace + HTTP)."""
    dirs, refs = [], {}
    for arch in ("llama", "qwen2"):
        model = make_tiny_model(arch, seed=3)
        d = str(tmp_path / arch)
        model.save_pretrained(d)
        dirs.append(d)
        refs[d] = _reference(model, *_prompts(model.config.vocab_size))
    trace = str(tmp_path / "trace.jsonl")
    rows = _write_trace(trace)
    result_path = str(tmp_path / "results.json")
    # fork: the children inherit the already imported torch/transformers (spawn re-imports them: ~20 s).
    mp.start_processes(_worker, args=(_free_port(), dirs, trace, _free_port(), result_path), nprocs=2,
                       join=True, start_method="fork")

    results = json.loads(open(result_path).read())
    for d in dirs:
        for plan, tokens in results[d].items():
            got = [tokens[str(i)] for i in range(len(PROMPT_LENS))]
            assert got == refs[d], f"{os.path.basename(d)} {plan} differs from single-process generate"

    report = json.loads((tmp_path / "serve.json").read_text())
    served = {r["id"]: r for r in report["requests"]}
    http = json.loads((tmp_path / "trace.jsonl.http.json").read_text())
    assert set(served) == {r["id"] for r in rows} | {http["reply"]["id"]}, "a request was lost across re-shards"
    plans_used = {r["plan"] for r in report["requests"]}
    assert report["overall"]["switches"] >= 2 and len(plans_used) >= 2, report["switches"]
    assert all(s["cost_s"] > 0 for s in report["switches"])
    # Re-sharding must not change what a request gets: each equals a lone single-process generate.
    from hf_adaptive.parallel.requests import Request, tokenize_request

    model = make_tiny_model("llama", seed=3)
    for row in rows:
        req = Request(row["id"], 0.0, row["max_new_tokens"], prompt_tokens=row["prompt_tokens"])
        tokenize_request(req, None, model.config.vocab_size)
        ids = torch.tensor([req.prompt_ids])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert served[row["id"]]["tokens"] == ref[0, ids.shape[1]:].tolist(), (row["id"], served[row["id"]]["plan"])
    assert http["reply"]["client_id"] == "http-1" and len(http["reply"]["tokens"]) == 5
    assert http["reply"]["id"] != "http-1"  # the server issues its own id
    assert "hf_adaptive_requests_total" in http["metrics"] and "hf_adaptive_current_plan{plan=" in http["metrics"]
    assert (tmp_path / "serve.png").stat().st_size > 0 and (tmp_path / "serve.md").exists()


def _hybrid_worker(rank: int, port: int, arch: str, result_path: str) -> None:
    from hf_adaptive.parallel.engine import Engine
    from hf_adaptive.parallel.plans import ParallelPlan

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=4)
    model = make_tiny_model(arch, seed=5)
    ids, mask = _prompts(model.config.vocab_size)
    plans = [ParallelPlan(tp=2, pp=2), ParallelPlan(pp=2, dp=2)]
    engine = Engine(model, rank, 4, torch.device("cpu"), plans)
    out = {}
    for plan in plans:
        engine.reshard(plan)
        tokens = [None] * 4
        dist.all_gather_object(tokens, engine.generate(ids, mask, NEW_TOKENS).tolist())  # every replica: all rows
        out[plan.name] = tokens
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_hybrid_tp_x_pp_on_four_processes(tmp_path, arch):
    """Guards the hybrid layout (TP groups inside pipeline stages, pipe groups across them, replicas): on 4
    gloo processes TP2xPP2 and PP2xDP2 must give one process's greedy tokens on every rank, including
    gemma3, whose sliding/full layer types must follow the layers into their stage."""
    model = make_tiny_model(arch, seed=5)
    ref = _reference(model, *_prompts(model.config.vocab_size))
    result_path = str(tmp_path / "hybrid.json")
    mp.start_processes(_hybrid_worker, args=(_free_port(), arch, result_path), nprocs=4, join=True,
                       start_method="fork")
    for plan, per_rank in json.loads(open(result_path).read()).items():
        assert all(tokens == ref for tokens in per_rank), f"{arch} {plan} differs from single-process generate"


def _budget_worker(rank: int, ports: list[int], model_dir: str, trace: str, out: str) -> None:
    from hf_adaptive.parallel.worker import main

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      HF_ADAPTIVE_BACKEND="gloo")
    torch.set_num_threads(1)
    common = ["--model", model_dir, "--dtype", "float32", "--trace", trace, "--out", out, "--max-batch", "4",
              "--device-memory-gb", str(2 / 1024), "--cooldown-s", "0", "--min-dwell-s", "0", "--confirm-s", "0",
              "--dp-concurrency", "6", "--long-context-tokens", "1000"]
    runs = (("static", "dp2", []), ("adaptive", "auto", ["--warmup"]),
            ("tp_per_device", "tp2", ["--max-batch-per", "device"]))
    for port, (name, plan, extra) in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        main(common + ["--name", name, "--plan", plan] + extra)


def test_memory_budget_admission_rejects_or_reshards_instead_of_running_out(tmp_path):
    """Guards requests that do not fit a layout's memory: under a 2 MiB budget per process a 450-token prompt
    needs ~1.7 MB on a DP replica (the whole tiny model is there) but ~1.1 MB per TP rank. Static DP must refuse
    it with the reason and the fix (and serve the rest); the adaptive engine must switch to a layout that splits
    the model and serve it, with the same tokens as one process."""
    model = make_tiny_model("llama", seed=3)
    model_dir = str(tmp_path / "llama")
    model.save_pretrained(model_dir)
    rows = [{"id": f"short{i}", "arrival_s": 0.0, "prompt_tokens": 6, "max_new_tokens": 4} for i in range(10)]
    rows.append({"id": "long", "arrival_s": 0.0, "prompt_tokens": 450, "max_new_tokens": 4})
    rows += [{"id": f"short{i}", "arrival_s": 0.0, "prompt_tokens": 6, "max_new_tokens": 4} for i in range(10, 20)]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    mp.start_processes(_budget_worker, args=([_free_port() for _ in range(3)], model_dir, str(trace), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")

    static = json.loads((tmp_path / "static.json").read_text())
    assert {r["id"] for r in static["requests"]} == {f"short{i}" for i in range(20)}
    assert [r["id"] for r in static["rejected"]] == ["long"] and static["overall"]["rejected"] == 1
    assert "dp2" in static["rejected"][0]["reason"] and "--device-memory-gb" in static["rejected"][0]["reason"]

    adaptive = json.loads((tmp_path / "adaptive.json").read_text())
    served = {r["id"]: r for r in adaptive["requests"]}
    # --warmup ran a batch on every layout before the clock started: none of it is in the records.
    assert adaptive["meta"]["warmup_s"] > 0 and len(adaptive["requests"]) == len(rows)
    assert set(served) == {r["id"] for r in rows} and adaptive["overall"]["rejected"] == 0
    assert served["long"]["plan"] == "tp2" and served["short0"]["plan"] == "dp2"
    assert any("needs ~" in s["reason"] and s["to_plan"] == "tp2" for s in adaptive["switches"]), adaptive["switches"]
    from hf_adaptive.parallel.requests import Request, tokenize_request

    req = Request("long", 0.0, 4, prompt_tokens=450)
    tokenize_request(req, None, model.config.vocab_size)
    ids = torch.tensor([req.prompt_ids])
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert served["long"]["tokens"] == ref[0, ids.shape[1]:].tolist()
    # --max-batch-per device: TP2 batches 2 x 4 short requests at once, as DP2 does over its two replicas
    per_device = json.loads((tmp_path / "tp_per_device.json").read_text())
    assert per_device["meta"]["max_batch_per"] == "device" and per_device["overall"]["rejected"] == 0
    assert max(b["size"] for b in per_device["batches"]) == 8
    assert max(b["size"] for b in static["batches"]) == 8 and max(b["size"] for b in adaptive["batches"]) <= 8


def _latency_worker(rank: int, port: int, result_path: str) -> None:
    import time

    from hf_adaptive.parallel.engine import Engine
    from hf_adaptive.parallel.plans import ParallelPlan
    from hf_adaptive.parallel.requests import Request
    from hf_adaptive.parallel.serve import Controller, ServeConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it can deadlock)
    dist.init_process_group("gloo", rank=0, world_size=1)
    engine = Engine(make_tiny_model("llama", seed=5), 0, 1, torch.device("cpu"), [ParallelPlan()])
    controller = Controller(engine, dist.new_group(backend="gloo"), ServeConfig(), lambda s: ParallelPlan(),
                            policy=None, static_plan=ParallelPlan())
    controller.start()
    controller.submit(Request("late", 0.0, 3, prompt_ids=[5, 6, 7]))
    time.sleep(0.3)  # the controller is busy elsewhere (a running batch): the request waits in the inbox
    controller.run(lambda: True)
    record = controller.telemetry.requests[0]
    with open(result_path, "w") as f:
        json.dump({"latency_s": record.latency_s, "arrival_s": record.arrival_s, "start_s": record.start_s}, f)
    dist.destroy_process_group()


def test_latency_counts_the_wait_in_the_inbox(tmp_path):
    """Guards the latency the serving benchmark reports: it runs from ``submit``, not from when the controller
    next looks at its inbox (that clock starts after the running batch: on 2 H200s it hid up to one batch,
    ~10 s, of every document's p99)."""
    result_path = str(tmp_path / "latency.json")
    mp.start_processes(_latency_worker, args=(_free_port(), result_path), nprocs=1, join=True, start_method="fork")
    result = json.loads(open(result_path).read())
    assert result["start_s"] - result["arrival_s"] >= 0.3 and result["latency_s"] >= 0.3, result
