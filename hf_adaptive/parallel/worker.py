"""The per-process entry point that ``hf-adaptive launch`` starts (via ``accelerate launch -m``).

Contract: reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), joins the process
group (NCCL on GPU, gloo on CPU; ``HF_ADAPTIVE_BACKEND`` overrides), loads the full model on the host
once (the copy every re-shard starts from), then serves a JSONL trace and/or the HTTP endpoint with a
fixed plan or the adaptive policy. Rank 0 writes ``serve.json/.md/.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hf_adaptive.parallel.cost_model import Calibration, queue_drain_predictor
from hf_adaptive.parallel.engine import Engine
from hf_adaptive.parallel.plans import ModelDims, ParallelPlan, all_plans, plan_for_strategy, validate_plan
from hf_adaptive.parallel.requests import load_trace, tokenize_request
from hf_adaptive.parallel.serve import Controller, ServeConfig, follow, replay_trace
from hf_adaptive.parallel.telemetry import write_report
from hf_adaptive.parallel.policy_args import add_batch_arguments, add_policy_arguments, policy_config_from_args
from hf_adaptive.policy.parallel_policy import STRATEGIES, ParallelPolicy, ParallelPolicyConfig, cost_aware_rule

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf_adaptive.parallel.worker", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint dir or embedded model name")
    p.add_argument("--random-weights", action="store_true",
                   help="the model's architecture (config.json) with seeded random weights, same on every rank")
    p.add_argument("--plan", default="auto", help="auto | tp | pp | dp | hybrid | a plan name like tp2xpp2")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trace", help="JSONL trace to replay")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply trace arrival times by this")
    p.add_argument("--http-port", type=int, help="serve /generate and /metrics on 127.0.0.1:PORT")
    p.add_argument("--serve-seconds", type=float, default=0.0, help="with --http-port: stop after this long")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
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


def init_distributed() -> tuple[int, int, torch.device]:
    backend = os.environ.get("HF_ADAPTIVE_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=10),
                            **({"device_id": device} if device.type == "cuda" else {}))
    return rank, world, device


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
    # Before the first CUDA allocation: long-prompt batches of varying width fragmented the default allocator by
    # 3.6 GiB under a 20 GiB budget (TP=2, Qwen2.5-7B shape, H200) and ran it out of memory.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rank, world, device = init_distributed()
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
        serve_rank0(args, engine, control, config, tokenizer, dims, static)
    dist.barrier(group=control)
    dist.destroy_process_group()
    return 0


def serve_rank0(args, engine: Engine, control, config: ServeConfig, tokenizer, dims: ModelDims,
                static: ParallelPlan | None) -> None:
    world = engine.world_size
    policy = None if static else ParallelPolicy(policy_config(args, world, dims))
    controller = Controller(engine, control, config, lambda s: plan_for_strategy(s, world, dims), policy, static)
    warmup_s = controller.warm_up() if args.warmup else 0.0
    controller.start()
    vocab = engine.host_model.config.get_text_config().vocab_size
    encode = tokenizer.encode if tokenizer else None

    def prepare(request) -> None:
        if request.prompt is not None and encode is None:
            raise ValueError("this checkpoint has no tokenizer; send 'prompt_tokens' instead of 'prompt'")
        tokenize_request(request, encode, vocab, args.max_prompt_tokens)

    stop = threading.Event()
    feeder, server = None, None
    if args.trace:
        requests = load_trace(args.trace)
        for r in requests:
            prepare(r)
        feeder = replay_trace(controller, requests, args.time_scale)
    if args.http_port is not None:
        from hf_adaptive.parallel.endpoint import make_server

        decode = tokenizer.decode if tokenizer else (lambda ids: "")
        server = make_server(controller, prepare, decode, args.http_port, stop)
        logger.info("serving on http://127.0.0.1:%d", server.server_address[1])
        if args.serve_seconds:
            threading.Timer(args.serve_seconds, stop.set).start()
    deadline_free = args.http_port is None

    def should_stop() -> bool:
        trace_done = feeder is None or not feeder.is_alive()
        return trace_done and (deadline_free or stop.is_set())

    controller.run(should_stop)
    if server is not None:
        server.shutdown()
    meta = run_meta(args, engine, policy, static) | {"warmup_s": round(warmup_s, 3)}
    write_report(controller.telemetry, Path(args.out), meta, name=args.name)


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
