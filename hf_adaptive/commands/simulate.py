"""`hf-adaptive simulate`: replay traces through the parallelism policy with a calibrated cost model.

Compares every calibrated static plan with the adaptive policy (throughput, p50/p99 latency,
utilisation, switches) and writes ``<trace>.json/.md/.png`` per trace under ``--out``.

Example:
    hf-adaptive simulate --trace eval/traces/mixed.jsonl \\
        --calibration eval/calibration/parallel_cpu_gloo_2proc.json --out runs/sim
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from pathlib import Path

from tqdm import tqdm

from hf_adaptive.parallel.cost_model import Calibration, queue_drain_predictor
from hf_adaptive.parallel.plans import ModelDims, plan_for_strategy
from hf_adaptive.parallel.requests import Request, load_trace
from hf_adaptive.parallel.sim_report import compare_plans, write_sim_report
from hf_adaptive.parallel.simulator import SimConfig
from hf_adaptive.parallel.policy_args import add_batch_arguments, add_policy_arguments, policy_config_from_args
from hf_adaptive.policy.parallel_policy import cost_aware_rule
from hf_adaptive.validation import arg_number

DEFAULT_CALIBRATION = "eval/calibration/parallel_cpu_gloo_2proc.json"


def simulate_command_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("simulate", help="replay traces: static plans vs the adaptive policy",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", nargs="+", required=True, help="JSONL trace file(s)")
    p.add_argument("--calibration", default=DEFAULT_CALIBRATION, help="per-plan cost JSON")
    p.add_argument("--out", default="runs/simulate")
    p.add_argument("--device-memory-gb", type=arg_number(minimum=0.0, min_open=True),
                   help="override the calibration's device memory")
    p.add_argument("--arrival-scale", type=arg_number(minimum=0.0, min_open=True), default=1.0,
                   help="multiply arrival times (e.g. 100 to replay GPU-rate traces on a CPU calibration)")
    p.add_argument("--rule", choices=["threshold", "cost"], default="threshold",
                   help="threshold: the threshold rule; cost: fastest predicted plan from the calibration")
    add_batch_arguments(p)
    add_policy_arguments(p)
    p.set_defaults(func=simulate_command)
    return p


def scaled_trace(path: str, arrival_scale: float) -> list[Request]:
    """The trace's requests with arrival times times ``arrival_scale``; an empty trace or an overflowing
    product is refused (the simulator would report nothing, or wait forever)."""
    requests = load_trace(path)
    if not requests:
        raise ValueError(f"{path}: the trace holds no requests. Fix: one JSON object per line, e.g. "
                         '{"id": "r1", "arrival_s": 0.5, "prompt_tokens": 128, "max_new_tokens": 32}')
    for r in requests:
        r.arrival_s *= arrival_scale
        if not math.isfinite(r.arrival_s):
            raise ValueError(f"--arrival-scale {arrival_scale} times request {r.id!r}'s arrival_s overflows to "
                             f"{r.arrival_s}. Fix: a smaller --arrival-scale, e.g. 100.")
    return requests


def simulate_command(args: argparse.Namespace) -> int:
    calib = Calibration.load(args.calibration)
    if args.device_memory_gb is not None:
        calib = dataclasses.replace(calib, device_memory_bytes=args.device_memory_gb * 2**30)
    if "dims" not in calib.meta:
        raise ValueError(f"{args.calibration}: meta.dims (num_layers, num_heads, num_kv_heads, intermediate_size) "
                         f"is missing. Fix: re-run eval/calibrate_parallel.py")
    dims = ModelDims(**calib.meta["dims"])
    policy_config = policy_config_from_args(args, calib.memory_headroom)
    if args.rule == "cost":
        plan_for = functools.partial(plan_for_strategy, n_devices=calib.world_size, dims=dims)
        predictor = queue_drain_predictor(calib, plan_for, args.max_batch, args.queue_head, args.max_batch_per)
        policy_config = dataclasses.replace(policy_config, rule=cost_aware_rule(predictor))
    meta = {"command": " ".join(["hf-adaptive"] + sys.argv[1:]), "calibration": args.calibration,
            "policy": {k: getattr(args, k) for k in ("cooldown_s", "min_dwell_s", "confirm_s", "long_context_tokens",
                                                     "dp_concurrency", "dp_short_tokens", "queue_head")},
            "max_batch_per_replica": args.max_batch, "max_batch_per": args.max_batch_per,
            "arrival_scale": args.arrival_scale, "rule": args.rule}
    traces = {trace: scaled_trace(trace, args.arrival_scale) for trace in args.trace}  # all checked before any run
    for trace, requests in tqdm(traces.items(), desc="traces"):
        results = compare_plans(requests, calib, dims, policy_config, SimConfig(args.max_batch, args.max_batch_per))
        payload = write_sim_report(Path(trace).stem, results, calib, Path(args.out), meta)
        for row in payload["results"]:
            print(f"{Path(trace).stem:>14} {row['name']:>10}: {row['throughput_tok_s']:9.1f} tok/s  "
                  f"p50 {row['latency_p50_s']:8.3f}s  p99 {row['latency_p99_s']:8.3f}s  "
                  f"util {row['utilisation']:.2f}  switches {row['switches']}")
    return 0
