"""Measure per-plan latency/memory on N processes and fit the simulator's cost model.

Run one process per device (GPU: NCCL; CPU: gloo), e.g.
    python -m hf_adaptive.parallel.run_script --processes 2 eval/calibrate_parallel.py --model PATH \
        --out runs/calib_h100x2
    python -m hf_adaptive.parallel.run_script --processes 2 --cpu eval/calibrate_parallel.py --model PATH \
        --dtype float32 --batches 1 4 --prompt-lens 32 256 --new-tokens 8 --out eval/calibration

For every valid plan it times greedy generation over a grid of (rows per replica B, prompt length L),
once with 1 new token (prefill) and once with G, then least-squares fits ``PlanCost``
(hf_adaptive/parallel/cost_model.py). Re-shard times between plans give the switch cost. Writes
``parallel_<tag>.json`` (the calibration) and ``parallel_<tag>.md`` under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import environment  # first: sets the offline default
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from hf_adaptive.evaluation.report import device_description
from hf_adaptive.parallel.engine import Engine
from hf_adaptive.parallel.plans import ModelDims, all_plans
from hf_adaptive.parallel.policy_args import add_host_model_arguments
from hf_adaptive.parallel.worker import init_distributed, load_host_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_host_model_arguments(p)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[64, 512, 2048])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per point (the minimum is kept)")
    p.add_argument("--device-memory-gb", type=float, default=16.0, help="CPU only: memory per rank to model")
    p.add_argument("--tag", help="file name tag (default: <device>_<world>proc)")
    p.add_argument("--out", required=True)
    return p.parse_args()


def timed_generate(engine: Engine, rows: int, prompt_len: int, new_tokens: int, repeats: int) -> float:
    """Seconds (minimum over repeats) for each replica to greedy-decode ``rows`` x ``prompt_len``."""
    gen = torch.Generator().manual_seed(prompt_len * 1000 + rows)
    vocab = engine.host_model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (rows, prompt_len), generator=gen)
    mask = torch.ones_like(ids)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up kernels and allocator
        dist.barrier()
        start = time.perf_counter()
        engine.generate(ids, mask, new_tokens)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        dist.barrier()
        best = min(best, time.perf_counter() - start)
    return best


def fit_plan(points: list[dict], new_tokens: int) -> dict[str, float]:
    """Least-squares fit of the prefill and per-step decode coefficients from the measured grid."""
    b = np.array([p["rows"] for p in points], float)
    L = np.array([p["prompt_len"] for p in points], float)
    t1 = np.array([p["prefill_s"] for p in points]) * 1e3
    tg = np.array([p["total_s"] for p in points]) * 1e3
    pre, *_ = np.linalg.lstsq(np.stack([np.ones_like(b), b * L], 1), t1, rcond=None)
    step = (tg - t1) / max(new_tokens - 1, 1)
    ctx = L + new_tokens / 2.0
    dec, *_ = np.linalg.lstsq(np.stack([np.ones_like(b), b, b * ctx], 1), step, rcond=None)
    # Negative coefficients are fit noise on flat curves; clamp so the model never predicts savings.
    pre, dec = np.clip(pre, 0, None), np.clip(dec, 0, None)
    return {"prefill_ms_base": pre[0], "prefill_ms_per_token": pre[1], "decode_ms_base": dec[0],
            "decode_ms_per_seq": dec[1], "decode_ms_per_ctx_token": dec[2]}


def kv_bytes_per_token(engine: Engine) -> int:
    model = engine.shard.model
    kv_heads = sum(layer.self_attn.k_proj.out_features for layer in model.model.layers)  # heads x head_dim
    return 2 * kv_heads * model.dtype.itemsize


def measure_plan(engine: Engine, args: argparse.Namespace) -> dict:
    points = []
    grid = [(b, L) for b in args.batches for L in args.prompt_lens]
    for rows, prompt_len in tqdm(grid, desc=engine.plan.name, disable=engine.rank != 0):
        prefill = timed_generate(engine, rows, prompt_len, 1, args.repeats)
        total = timed_generate(engine, rows, prompt_len, args.new_tokens, args.repeats)
        points.append({"rows": rows, "prompt_len": prompt_len, "prefill_s": prefill, "total_s": total})
    per_rank = [None] * engine.world_size
    dist.all_gather_object(per_rank, (engine.shard.param_bytes(), kv_bytes_per_token(engine)))
    coeffs = fit_plan(points, args.new_tokens)
    coeffs["weights_bytes_per_device"] = max(w for w, _ in per_rank)
    coeffs["kv_bytes_per_token_per_device"] = max(k for _, k in per_rank)
    return {"coeffs": coeffs, "points": points}


def main() -> int:
    args = parse_args()
    rank, world, device = init_distributed()
    model, _ = load_host_model(args.model, args.dtype, args.random_weights)
    dims = ModelDims.from_config(model.config)
    plans = all_plans(world, dims)
    engine = Engine(model, rank, world, device, plans)
    results, switch_s = {}, []
    for plan in plans:
        cost = engine.reshard(plan)
        if results:  # the first build is a cold start, not a switch
            switch_s.append(cost)
        results[plan.name] = measure_plan(engine, args)
    costs = [None] * world
    dist.all_gather_object(costs, switch_s)
    if rank == 0:
        write(args, world, device, dims, results, [max(c) for c in zip(*costs)] if switch_s else [0.0])
    dist.barrier()
    dist.destroy_process_group()
    return 0


def write(args, world: int, device: torch.device, dims: ModelDims, results: dict, switch_s: list[float]) -> None:
    on_gpu = device.type == "cuda"
    name = device_description(device)
    memory = torch.cuda.get_device_properties(device).total_memory if on_gpu else args.device_memory_gb * 2**30
    tag = args.tag or f"{'gpu' if on_gpu else 'cpu_gloo'}_{world}proc"
    meta = {**environment(str(device)), "measured_on": "GPU (NCCL)" if on_gpu else "CPU (gloo processes) - NOT a "
            "GPU measurement", "device": name, "model": args.model, "random_weights": args.random_weights,
            "dtype": args.dtype, "dims": dims.__dict__, "switch_s": switch_s}
    payload = {"world_size": world, "device_memory_bytes": memory, "switch_cost_ms": 1e3 * float(np.mean(switch_s)),
               "plans": {k: {kk: float(vv) for kk, vv in v["coeffs"].items()} for k, v in results.items()},
               "points": {k: v["points"] for k, v in results.items()}, "meta": meta}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"parallel_{tag}.json").write_text(json.dumps(payload, indent=1))
    lines = [f"# Parallel calibration ({meta['measured_on']})", "", f"- device: {name} x {world}",
             f"- torch {meta['torch']}, transformers {meta['transformers']}, {args.model} {args.dtype}",
             f"- command: `{meta['command']}`", f"- switch cost (mean): {payload['switch_cost_ms']:.1f} ms", "",
             "| plan | rows | prompt | prefill ms | total ms |", "|---|---|---|---|---|"]
    for plan, res in results.items():
        lines += [f"| {plan} | {p['rows']} | {p['prompt_len']} | {1e3 * p['prefill_s']:.1f} | {1e3 * p['total_s']:.1f} |"
                  for p in res["points"]]
    (out / f"parallel_{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'parallel_{tag}.json'}")


if __name__ == "__main__":
    raise SystemExit(main())
