"""The per-process entry point that ``hf-adaptive launch`` starts (via ``accelerate launch -m``).

Contract: joins the process group the launcher prepared (``rendezvous.py``: NCCL on GPU, gloo on CPU;
``HF_ADAPTIVE_BACKEND`` overrides; the store on loopback when all ranks are local), loads the full model on the
host once (the copy every re-shard starts from), then serves a JSONL trace and/or the HTTP endpoint
(``http_app.py``, see docs/serving.md) with a fixed plan or the adaptive policy. SIGTERM or SIGINT makes rank 0
drain: no new requests, queued ones finish within ``--drain-seconds``, then every rank stops and rank 0 writes
``serve.json/.md/.png`` under ``--out``; other ranks ignore the signal and follow rank 0's stop.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from hf_adaptive.parallel.cost_model import Calibration, queue_drain_predictor
from hf_adaptive.parallel.engine import Engine
from hf_adaptive.parallel.plans import ModelDims, ParallelPlan, all_plans, plan_for_strategy, validate_plan
from hf_adaptive.parallel.http_schema import ServeLimits
from hf_adaptive.parallel.rendezvous import init_distributed
from hf_adaptive.parallel.requests import Request, load_trace, tokenize_request
from hf_adaptive.parallel.serve import Controller, Lifecycle, ServeConfig, follow, replay_trace
from hf_adaptive.parallel.telemetry import write_report
from hf_adaptive.parallel.policy_args import add_batch_arguments, add_policy_arguments, policy_config_from_args
from hf_adaptive.policy.parallel_policy import STRATEGIES, ParallelPolicy, ParallelPolicyConfig, cost_aware_rule

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf_adaptive.parallel.worker", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint dir, embedded model name, or Hub id (org/name)")
    p.add_argument("--random-weights", action="store_true",
                   help="the model's architecture (config.json) with seeded random weights, same on every rank")
    p.add_argument("--plan", default="auto", help="auto | tp | pp | dp | hybrid | a plan name like tp2xpp2")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trace", help="JSONL trace to replay")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply trace arrival times by this")
    add_http_arguments(p)
    add_batch_arguments(p)
    add_policy_arguments(p)
    p.add_argument("--warmup", action="store_true",
                   help="before the clock starts, build every layout the run may use and run one full batch on it")
    p.add_argument("--rule", choices=["threshold", "cost"], default="threshold",
                   help="threshold: the threshold rule; cost: fastest predicted plan (needs --calibration)")
    p.add_argument("--calibration", help="eval/calibrate_parallel.py JSON for --rule cost (same world size)")
    p.add_argument("--device-memory-gb", type=float, default=None,
                   help="memory budget per device in GiB, for the memory signal and batch admission (default: the "
                        "card's memory on GPU, 16 on CPU); on GPU a smaller budget is enforced on the allocator")
    p.add_argument("--memory-headroom", type=float, default=0.15,
                   help="batch admission keeps each device under (1 - this) of the budget")
    p.add_argument("--pin-host", action=argparse.BooleanOptionalAction, default=True,
                   help="page-lock the host copy of the weights once at start (GPU), so re-sharding copies at full "
                        "link speed; --no-pin-host keeps it pageable (slower switches, no page-locked memory)")
    p.add_argument("--out", default="runs/serve", help="directory for serve.json/.md/.png")
    p.add_argument("--name", default="serve", help="report file stem")
    return p


def add_http_arguments(p: argparse.ArgumentParser) -> None:
    """The endpoint's address, limits and shutdown (docs/serving.md)."""
    p.add_argument("--http-port", type=int, help="serve /generate, /ready, /metrics on --http-host:PORT (0: free)")
    p.add_argument("--http-host", default="127.0.0.1",
                   help="bind address (default loopback only; 0.0.0.0 serves every interface)")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="a Host header name accepted besides loopback names (repeatable; '*': any)")
    p.add_argument("--allowed-origin", action="append", default=[],
                   help="a browser Origin allowed to call (repeatable; default none: browser pages are refused)")
    p.add_argument("--serve-seconds", type=float, default=0.0, help="with --http-port: drain and stop after this")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM/SIGINT/shutdown: finish queued requests for at most this long, then refuse them")
    p.add_argument("--max-prompt-tokens", type=int, default=4096,
                   help="longest prompt served (longer: refused, or cut if the request sets truncate)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="most tokens one request may ask for")
    p.add_argument("--max-queued", type=int, default=256,
                   help="HTTP requests held at once; more get 503 with Retry-After")
    p.add_argument("--request-timeout-s", type=float, default=600.0, help="a request waiting longer gets 504")


def load_host_model(spec: str, dtype: str, random_weights: bool = False, device: torch.device | None = None):
    """The host copy every plan is sharded from, and its tokenizer (None if the checkpoint has none).

    ``random_weights``: ``spec``'s architecture from its config.json with seeded random weights (no weights file
    read), identical on every rank, for speed runs of models whose checkpoint cannot reach the GPU host. On a
    CUDA ``device`` they are drawn there (seconds for a 7B model, where a CPU init takes minutes) and copied to
    the host; every rank draws the same values (same seed, same kernels, same card type).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_adaptive.models import resolve_model_dir

    if random_weights:
        from hf_adaptive.evaluation.random_model import load_random_model

        if device is not None and device.type == "cuda":
            try:
                model, tokenizer = load_random_model(spec, str(device), dtype, seed=0)
                model.to("cpu")
            except torch.OutOfMemoryError:  # larger than one card: draw on the host (slower, same shapes)
                model = None
            torch.cuda.empty_cache()
            # Every rank must draw the same way (GPU and CPU generators give different values): all or none.
            ok = torch.tensor([0 if model is None else 1], device=device)
            if dist.is_initialized():
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if bool(ok.item()):
                return model, tokenizer
            logger.warning("random weights do not fit every card; drawing them on the host")
        return load_random_model(spec, "cpu", dtype, seed=0)
    path = resolve_model_dir(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # tiny test checkpoints have none; their traces use prompt_tokens
    return model, tokenizer


def policy_config(args: argparse.Namespace, world: int, dims: ModelDims) -> ParallelPolicyConfig:
    config = policy_config_from_args(args, args.memory_headroom)
    if args.rule == "threshold":
        return config
    if not args.calibration:
        raise ValueError("--rule cost needs --calibration FILE (from eval/calibrate_parallel.py)")
    calib = Calibration.load(args.calibration)
    if calib.world_size != world:
        raise ValueError(f"--calibration was measured on world_size={calib.world_size}, this run has {world}; "
                         f"calibrate with --nproc_per_node {world}")
    predictor = queue_drain_predictor(calib, lambda s: plan_for_strategy(s, world, dims), args.max_batch,
                                      args.queue_head, args.max_batch_per)
    return dataclasses.replace(config, rule=cost_aware_rule(predictor))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limits = serve_limits(args)  # bad limits fail before any process group or model is built
    # Before the first CUDA allocation: long-prompt batches of varying width fragmented the default allocator by
    # 3.6 GiB under a 20 GiB budget (TP=2, Qwen2.5-7B shape, H200) and ran it out of memory.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    lifecycle = Lifecycle(args.drain_seconds)
    rank, world, device = init_distributed()
    install_stop_handlers(rank, lifecycle)
    model, tokenizer = load_host_model(args.model, args.dtype, args.random_weights, device)
    budget = None if args.device_memory_gb is None else int(args.device_memory_gb * 2**30)
    if budget is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if budget > total:
            raise ValueError(f"--device-memory-gb {args.device_memory_gb} exceeds this card's "
                             f"{total / 2**30:.1f} GiB; pass at most that, or leave it out")
        torch.cuda.set_per_process_memory_fraction(budget / total, device)  # the budget is real, not advisory
    dims = ModelDims.from_config(model.config)
    plans = all_plans(world, dims) or [ParallelPlan()]
    static = None
    if args.plan != "auto":
        static = (plan_for_strategy(args.plan, world, dims) if args.plan in STRATEGIES
                  else ParallelPlan.parse(args.plan))
        validate_plan(static, dims, world)
        plans = list(dict.fromkeys(plans + [static]))
    engine = Engine(model, rank, world, device, plans, pin_host=args.pin_host)
    control = dist.new_group(backend="gloo")
    config = ServeConfig(max_batch_per_replica=args.max_batch, batch_cap_per=args.max_batch_per,
                         pad_token_id=(tokenizer.pad_token_id or 0) if tokenizer else 0,
                         eos_token_id=None, device_memory_bytes=budget, memory_headroom=args.memory_headroom)
    if rank != 0:
        follow(engine, control, config)
    else:
        serve_rank0(args, engine, control, config, tokenizer, dims, static, limits, lifecycle)
    dist.barrier(group=control)
    dist.destroy_process_group()
    return 0


def serve_limits(args: argparse.Namespace) -> ServeLimits:
    """The request limits from the command line (``ServeLimits`` names a bad one)."""
    return ServeLimits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                       max_queued=args.max_queued, request_timeout_s=args.request_timeout_s)


def install_stop_handlers(rank: int, lifecycle: Lifecycle) -> None:
    """SIGTERM/SIGINT: rank 0 drains (see ``Lifecycle``); other ranks carry on until rank 0 broadcasts stop."""

    def on_signal(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if rank == 0:
            lifecycle.begin_drain(name)
        else:
            logger.info("rank %d got %s: it stops when rank 0 has drained", rank, name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def serve_rank0(args, engine: Engine, control, config: ServeConfig, tokenizer, dims: ModelDims,
                static: ParallelPlan | None, limits: ServeLimits, lifecycle: Lifecycle) -> None:
    world = engine.world_size
    policy = None if static else ParallelPolicy(policy_config(args, world, dims))
    controller = Controller(engine, control, config, lambda s: plan_for_strategy(s, world, dims), policy, static)
    warmup_s = controller.warm_up() if args.warmup else 0.0
    controller.start()
    tokenize = tokenizer_for(engine, tokenizer)
    feeder = None
    if args.trace:
        requests = load_trace(args.trace)
        for r in requests:
            tokenize(r)
            _check_trace_prompt(r, limits)
        feeder = replay_trace(controller, requests, args.time_scale, stop=lifecycle.draining)
    server = start_http(args, controller, tokenize, tokenizer, limits, lifecycle)
    lifecycle.ready.set()
    if server is not None and args.serve_seconds:
        threading.Timer(args.serve_seconds, lifecycle.begin_drain, args=("--serve-seconds",)).start()

    def should_stop() -> bool:
        trace_done = feeder is None or not feeder.is_alive()
        return trace_done and (server is None or lifecycle.draining.is_set())

    controller.run(should_stop, give_up=lifecycle.drain_deadline_passed)
    if server is not None:
        server.stop()
    meta = run_meta(args, engine, policy, static) | {"warmup_s": round(warmup_s, 3)}
    write_report(controller.telemetry, Path(args.out), meta, name=args.name)


def tokenizer_for(engine: Engine, tokenizer) -> Callable[[Request], None]:
    """Fills a request's prompt ids: its text through the checkpoint's tokenizer, or synthetic ids."""
    vocab = engine.host_model.config.get_text_config().vocab_size
    encode = tokenizer.encode if tokenizer else None

    def tokenize(request: Request) -> None:
        if request.prompt is not None and encode is None:
            raise ValueError("this checkpoint has no tokenizer; send 'prompt_tokens' instead of 'prompt'")
        tokenize_request(request, encode, vocab)

    return tokenize


def _check_trace_prompt(request: Request, limits: ServeLimits) -> None:
    if len(request.prompt_ids) > limits.max_prompt_tokens:
        raise ValueError(f"trace request {request.id!r} has {len(request.prompt_ids)} prompt tokens, above "
                         f"--max-prompt-tokens {limits.max_prompt_tokens}; raise --max-prompt-tokens to at least "
                         f"{len(request.prompt_ids)}")


def start_http(args, controller: Controller, tokenize: Callable[[Request], None], tokenizer, limits: ServeLimits,
               lifecycle: Lifecycle):
    """The HTTP endpoint on ``--http-host:--http-port`` (None without ``--http-port``)."""
    if args.http_port is None:
        return None
    from hf_adaptive.parallel.http_app import ADMIN_TOKEN_ENV, HttpSettings, build_app
    from hf_adaptive.parallel.http_server import HttpServer

    settings = HttpSettings(host=args.http_host, port=args.http_port,
                            admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None,
                            allowed_hosts=tuple(args.allowed_host), allowed_origins=tuple(args.allowed_origin))
    decode = tokenizer.decode if tokenizer else (lambda ids: "")
    app = build_app(controller, tokenize, decode, limits, settings, lifecycle)
    return HttpServer(app, settings, limits.max_queued).start()


def run_meta(args, engine: Engine, policy: ParallelPolicy | None, static: ParallelPlan | None) -> dict:
    """What a report needs to be reproduced: card, versions, command line, and the policy's switch log."""
    on_gpu = engine.device.type == "cuda"
    return {"mode": "adaptive" if policy else f"static {static.name}", "world_size": engine.world_size,
            "device": torch.cuda.get_device_name(engine.device) if on_gpu else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "model": args.model, "random_weights": args.random_weights, "dtype": args.dtype,
            "trace": args.trace, "time_scale": args.time_scale,
            "rule": args.rule, "calibration": args.calibration, "max_batch": args.max_batch,
            "max_batch_per": args.max_batch_per,
            "device_memory_gb": args.device_memory_gb, "memory_headroom": args.memory_headroom,
            "queue_head": args.queue_head,
            "memory_bands": ((policy.config.hybrid_memory.enter, policy.config.pipeline_memory.enter)
                             if policy else None),
            "warmup": args.warmup, "pinned_host_bytes": engine.pinned_bytes,
            "command": " ".join([sys.executable, "-m", "hf_adaptive.parallel.worker"] + sys.argv[1:]),
            "time": time.strftime("%FT%TZ", time.gmtime()),
            "policy_switches": [e.__dict__ | {"summary": e.summary.__dict__} for e in policy.history] if policy else []}


if __name__ == "__main__":
    raise SystemExit(main())
